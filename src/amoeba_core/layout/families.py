"""One entry point for every supported model family: the parameter specs of an HF-style config.

  model_type                         builder             family
  llama, mistral, qwen2              llama_param_specs   dense, GQA (layout/llama.py)
  qwen3                              qwen3_param_specs   dense, q_norm / k_norm (layout/qwen3.py)
  mixtral, qwen2_moe, qwen3_moe      moe_param_specs     mixture of experts (layout/moe.py)
  deepseek_v2, deepseek_v3           mla_param_specs     MLA + MoE (layout/mla.py)

A config with a quantization_config of quant_method "fp8" and a weight_block_size gets the block-quantized FP8
specs of the same model (layout/quant.py), unless quantized=False.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ..errors import ConfigError
from .llama import llama_param_specs
from .mla import MLA_MODEL_TYPES, mla_param_specs
from .moe import MOE_MODEL_TYPES, moe_param_specs
from .quant import fp8_block_specs
from .qwen3 import qwen3_param_specs

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = LLAMA_MODEL_TYPES + ("qwen3",) + MOE_MODEL_TYPES + MLA_MODEL_TYPES


def fp8_block_of(config: Mapping) -> Optional[tuple]:
    """(bn, bk) of a config's block-wise FP8 quantization_config, or None."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8" or not q.get("weight_block_size"):
        return None
    bn, bk = q["weight_block_size"]
    return int(bn), int(bk)


def model_param_specs(config: Mapping, dtype: Optional[str] = None, fused: bool = True,
                      quantized: bool = True) -> list:
    """Specs of every parameter of a supported decoder (see the module table), in checkpoint order.

    dtype / fused as llama_param_specs (dtype is that of the unquantized tensors). A config without model_type is
    read as Llama.
    """
    mt = config.get("model_type") or "llama"
    if mt in LLAMA_MODEL_TYPES:
        specs = llama_param_specs(config, dtype, fused)
    elif mt == "qwen3":
        specs = qwen3_param_specs(config, dtype, fused)
    elif mt in MOE_MODEL_TYPES:
        specs = moe_param_specs(config, dtype, fused)
    elif mt in MLA_MODEL_TYPES:
        specs = mla_param_specs(config, dtype, fused)
    else:
        raise ConfigError(f"model_type {mt!r} is not supported; supported: {MODEL_TYPES}")
    block = fp8_block_of(config) if quantized else None
    return fp8_block_specs(specs, block) if block else specs
