"""Tiny HF-style configs of every supported family (plain dicts; transformers.AutoConfig.for_model(**cfg) builds
the same model in HF). Every degree 1, 2, 4 divides their heads and intermediate sizes."""

_BASE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)

MIXTRAL = dict(_BASE, model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
               rope_theta=1_000_000.0, sliding_window=None)
# Layer 1 is dense (mlp_only_layers); a shared expert with a sigmoid gate; q/k/v biases.
QWEN2_MOE = dict(_BASE, model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                 mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True, use_sliding_window=False)
# Explicit head_dim (16 != 64 / 8), per-head q/k norms, renormalised top-k.
QWEN3_MOE = dict(_BASE, model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                 num_experts_per_tok=2, head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                 use_sliding_window=False)
QWEN3 = dict(_BASE, model_type="qwen3", intermediate_size=96, head_dim=16, use_sliding_window=False,
             tie_word_embeddings=True)
# MLA with a q low-rank projection; layer 0 dense, layer 1 MoE with one shared expert.
DEEPSEEK_V2 = dict(_BASE, model_type="deepseek_v2", num_key_value_heads=8, intermediate_size=96,
                   moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                   first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0)
# DeepSeek-V2-Lite style: no q_lora_rank (a plain column-parallel q_proj).
DEEPSEEK_V2_LITE = dict(DEEPSEEK_V2, q_lora_rank=None)

FAMILIES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE, "qwen3": QWEN3,
            "deepseek_v2": DEEPSEEK_V2, "deepseek_v2_lite": DEEPSEEK_V2_LITE}

# Block-quantized FP8 (128 x 128): head_dim 128, intermediate 512, so degrees 1, 2, 4 keep every block whole.
FP8_QWEN3_MOE = dict(_BASE, model_type="qwen3_moe", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=128, intermediate_size=512, moe_intermediate_size=512, num_experts=2,
                     num_experts_per_tok=1, norm_topk_prob=True, mlp_only_layers=[1],
                     quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]})
