"""Parameter specs of Qwen3 dense decoders: Llama's layout with an explicit head_dim and per-head RMSNorms on the
queries and keys.

  model.layers.{i}.self_attn.q_norm.weight   (head_dim,)   replicated
  model.layers.{i}.self_attn.k_norm.weight   (head_dim,)   replicated

They act on each head's head_dim vector (before rotary), so every rank applies the same weights to its own heads
(vllm/model_executor/models/qwen3.py: Qwen3Attention normalises q and k per head with plain RMSNorm layers).
Everything else, attention_bias (q, k, v and o biases) included, is llama_param_specs.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ..errors import ConfigError
from . import specs as S
from .llama import llama_param_specs, model_dims


def insert_qk_norms(specs: list, config: Mapping, dtype: str) -> list:
    """specs with q_norm / k_norm (head_dim,) inserted after each layer's o_proj (its last attention spec)."""
    d = model_dims(config)["head_dim"]
    out = []
    for spec in specs:
        out.append(spec)
        if spec.name.endswith(".self_attn.o_proj.weight"):
            p = spec.name[: -len("o_proj.weight")]
            out += [S.replicated(p + "q_norm.weight", (d,), dtype), S.replicated(p + "k_norm.weight", (d,), dtype)]
    return out


def qwen3_param_specs(config: Mapping, dtype: Optional[str] = None, fused: bool = True) -> list:
    """Specs of every parameter of a Qwen3 (dense) decoder, in checkpoint order. Arguments as llama_param_specs;
    config["model_type"] must be "qwen3"."""
    if config.get("model_type") != "qwen3":
        raise ConfigError(f"qwen3_param_specs expects model_type 'qwen3', got {config.get('model_type')!r}")
    dt = dtype or str(config.get("torch_dtype") or "float32").replace("torch.", "")
    return insert_qk_norms(llama_param_specs(config, dtype=dt, fused=fused), config, dt)
