"""Parameter specs of DeepSeek-V2 / V3 decoders: multi-head latent attention (MLA) and an MoE feed-forward.

MLA as vLLM shards it (vllm/model_executor/models/deepseek_v2.py, DeepseekV2MLAAttention), with H heads, head dims
nope (no rotary), rope (rotary) and v, latent ranks q_lora and kv_lora, hidden size h:

  low-rank down-projections, replicated (every rank computes the whole latent):
    self_attn.fused_qkv_a_proj.weight  (q_lora + kv_lora + rope, h)  [q_a_proj; kv_a_proj_with_mqa]  (fused=True)
    self_attn.q_a_proj.weight          (q_lora, h)                   HF's unfused halves (fused=False)
    self_attn.kv_a_proj_with_mqa.weight (kv_lora + rope, h)          (alone when q_lora_rank is None)
    self_attn.q_a_layernorm.weight     (q_lora,)   self_attn.kv_a_layernorm.weight (kv_lora,)
  up-projections, column-parallel by heads:
    self_attn.q_b_proj.weight          (H * (nope + rope), q_lora)   or q_proj (H * (nope + rope), h) without q_lora
    self_attn.kv_b_proj.weight         (H * (nope + v), kv_lora)     a rank holds its heads' K-nope and V rows
  self_attn.o_proj.weight              (h, H * v)                    row-parallel by heads

The KV cache holds one latent per token, [kv_c_normed (kv_lora); k_pe (rope)], the same on every TP rank of an
instance (KVLayout engine "vllm_mla"): only the heads' up-projections are split. The feed-forward is a dense SwiGLU
MLP in the first first_k_dense_replace layers and an MoE block with shared experts after (layout/moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import ConfigError
from . import specs as S
from .moe import mlp_specs, moe_block_specs, moe_dims

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class MLADims:
    """heads, q_lora (None: a plain q_proj), kv_lora, nope, rope, v: the attention's sizes; latent = kv_lora + rope
    is the KV cache's per-token width."""

    heads: int
    q_lora: Optional[int]
    kv_lora: int
    nope: int
    rope: int
    v: int

    @property
    def qk(self) -> int:
        return self.nope + self.rope

    @property
    def latent(self) -> int:
        return self.kv_lora + self.rope


def mla_dims(config: Mapping) -> MLADims:
    keys = ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise ConfigError(f"MLA config lacks {missing}")
    if config.get("attention_bias"):
        raise ConfigError("MLA with attention_bias is not described (DeepSeek checkpoints have none)")
    q_lora = config.get("q_lora_rank")
    return MLADims(int(config["num_attention_heads"]), None if q_lora is None else int(q_lora),
                   int(config["kv_lora_rank"]), int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"]),
                   int(config["v_head_dim"]))


def mla_param_specs(config: Mapping, dtype: Optional[str] = None, fused: bool = True) -> list:
    """Specs of every parameter of a DeepSeek-V2 / V3 decoder, in checkpoint order (names and shards: module doc).

    config: HF-style dict with model_type "deepseek_v2" / "deepseek_v3", hidden_size, num_attention_heads,
            q_lora_rank (None allowed), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
            intermediate_size, num_hidden_layers, vocab_size, MoE fields (moe.moe_dims), tie_word_embeddings.
    dtype / fused: as llama_param_specs.
    """
    if config.get("model_type") not in MLA_MODEL_TYPES:
        raise ConfigError(f"mla_param_specs expects model_type in {MLA_MODEL_TYPES}, got "
                          f"{config.get('model_type')!r}")
    a = mla_dims(config)
    m = moe_dims(config)
    dt = dtype or str(config.get("torch_dtype") or "float32").replace("torch.", "")
    h, H = int(config["hidden_size"]), a.heads
    out = [S.vocab("model.embed_tokens.weight", (int(config["vocab_size"]), h), dt)]
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        out.append(S.replicated(p + "input_layernorm.weight", (h,), dt))
        q = p + "self_attn."
        if a.q_lora is not None:
            if fused:
                out.append(S.replicated(q + "fused_qkv_a_proj.weight", (a.q_lora + a.latent, h), dt))
            else:
                out += [S.replicated(q + "q_a_proj.weight", (a.q_lora, h), dt),
                        S.replicated(q + "kv_a_proj_with_mqa.weight", (a.latent, h), dt)]
            out += [S.replicated(q + "q_a_layernorm.weight", (a.q_lora,), dt),
                    S.column(q + "q_b_proj.weight", (H * a.qk, a.q_lora), dt, unit=a.qk)]
        else:
            out += [S.column(q + "q_proj.weight", (H * a.qk, h), dt, unit=a.qk),
                    S.replicated(q + "kv_a_proj_with_mqa.weight", (a.latent, h), dt)]
        out += [S.replicated(q + "kv_a_layernorm.weight", (a.kv_lora,), dt),
                S.column(q + "kv_b_proj.weight", (H * (a.nope + a.v), a.kv_lora), dt, unit=a.nope + a.v),
                S.row(q + "o_proj.weight", (h, H * a.v), dt, unit=a.v),
                S.replicated(p + "post_attention_layernorm.weight", (h,), dt)]
        if m is not None and i in m.sparse_layers:
            out += moe_block_specs(m, i, h, dt, fused)
        else:
            out += mlp_specs(p + "mlp.", h, int(config["intermediate_size"]), dt, fused)
    out.append(S.replicated("model.norm.weight", (h,), dt))
    if not config.get("tie_word_embeddings", False):
        out.append(S.vocab("lm_head.weight", (int(config["vocab_size"]), h), dt))
    return out
