"""Reference engine: an integration example of amoeba_core.retp inside a running TP inference loop.

NOT a production engine. It is a small, readable tensor-parallel decoder for Llama / Mistral / Qwen2 / Qwen3,
Mixtral / Qwen2-MoE / Qwen3-MoE and DeepSeek-V2 models in plain torch (CPU or any device torch.distributed
supports), written to show - and to test end to end - that a service keeps generating exactly the same tokens while
retp changes its TP degree between decode steps.

What it implements, following vLLM's sharding (amoeba_core.model_param_specs, fused names):
  * vocab-parallel embedding (ids outside a rank's rows masked, all-reduce) and LM head (logits all-gathered
    over the instance, vocabulary padding dropped); tied embeddings
  * RMSNorm, neox-style rotary embeddings (rope_theta, default 10000), GQA attention over a paged KV cache read
    through block tables (vllm_flash_attn by default; vllm_flashinfer and sglang, NHD or HND, work too)
  * fused QKV (Qwen2 / attention_bias q, k, v biases), row-parallel o_proj (bias added once) and down_proj with an
    all-reduce over the instance, SwiGLU MLP with gate_up_proj = [gate; up]
  * families.py: Qwen3's q_norm / k_norm; MoE blocks (replicated router, experts split on their intermediate dim,
    Qwen2-MoE's gated shared expert, DeepSeek's shared experts and group-limited routing); DeepSeek-V2 multi-head
    latent attention over vLLM's MLA cache (one latent per token, the same on every rank of an instance);
    block-quantized FP8 weights dequantized at use
  * a block manager (free list) and scheduler per instance: continuous batching (prefill of new prompts beside
    decode steps of the running ones), greedy sampling; activations in fp32 whatever the weight dtype
  * a TP change: TPEngine.change_degree() shares sequence metadata across the group, calls amoeba_core.retp with
    the engine's weights and KVCache, then adopts the new instance, block tables, cache views and free list.

Entry points:
  load_hf_checkpoint(model_dir, dtype=None) -> (config, full fused tensors)
  write_random_checkpoint(model_dir, config, seed=0)   a tiny random HF checkpoint (config.json + model.safetensors)
  run_generation(rank, world_size, *, prompts, max_new_tokens, schedule, ...)   run on every rank of a RankPool
"""
from .checkpoint import fuse_hf_tensors, load_hf_checkpoint, random_hf_tensors, write_random_checkpoint
from .model import SeqState, TPEngine, instance_group, kv_pools, kv_read, kv_write
from .run import load_model, run_generation, transition_steps

__all__ = ["load_hf_checkpoint", "write_random_checkpoint", "random_hf_tensors", "fuse_hf_tensors",
           "run_generation", "load_model", "transition_steps", "TPEngine", "SeqState", "instance_group",
           "kv_pools", "kv_read", "kv_write"]
