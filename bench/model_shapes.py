"""Model shapes used by the capacity table and the simulator: the numbers of the public HF configs.

Sources (config.json of each model on the Hugging Face Hub):
  Llama-3-8B   https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
  Llama-3-70B  https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
  Qwen2.5-32B  https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json
Only the fields llama_param_specs reads are kept (no rope scaling: irrelevant to sizes).
"""

MODELS = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
        "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "llama3-70b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}

DISPLAY = {"llama3-8b": "Llama-3-8B", "qwen2.5-32b": "Qwen2.5-32B", "llama3-70b": "Llama-3-70B"}
