"""HF checkpoints for the reference engine: read (and fuse into vLLM's names), and write small random ones.

Fused names follow amoeba_core.model_param_specs(config) (fused=True): q/k/v_proj -> qkv_proj = [q; k; v] along
the output dim, gate/up_proj -> gate_up_proj = [gate; up], MLA's q_a_proj / kv_a_proj_with_mqa -> fused_qkv_a_proj,
and per-expert tensors -> experts.w13_weight = stack over experts of [gate_e; up_e] and experts.w2_weight = stack
of down_e (Mixtral: w1, w3, w2). FP8 scales (`*_scale_inv`) are fused like their weights. Everything else keeps its
HF name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..errors import ConfigError, SpecMismatchError
from ..layout import model_param_specs
from ..layout.families import fp8_block_of
from ..layout.moe import moe_dims
from ..layout.quant import SCALE_SUFFIX, quantize_fp8_blocks
from ..verify import full_tensor

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}
_FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
                  "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}


def _dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _hf_parts(config: Mapping, name: str):
    """How the fused tensor `name` is built from HF tensors: ("cat", [names]) concatenated along dim 0, or
    ("stack", [[names] per expert]) each expert's parts concatenated, then stacked over experts."""
    for module, parts in _FUSED_MODULES.items():
        if f".{module}." in name:
            return "cat", [name.replace(f".{module}.", f".{p}.") for p in parts]
    for fused, roles in (("experts.w13_weight", (0, 1)), ("experts.w2_weight", (2,))):
        if f".{fused}" in name:
            m = moe_dims(config)
            prefix, suffix = name.split(f".{fused}")  # suffix: "" or "_scale_inv"
            return "stack", [[f"{prefix}.experts.{e}.{m.expert_names[r]}.weight{suffix}" for r in roles]
                             for e in range(m.num_experts)]
    return "cat", [name]


def fuse_hf_tensors(config: Mapping, hf: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF (unfused) tensors -> the fused dict of model_param_specs(config): name -> full tensor.

    Checks that every fused spec gets a tensor of its shape; a tied model's lm_head.weight is dropped.
    """
    specs = model_param_specs(config, dtype="float32")  # shapes only; dtypes are the caller's
    out: Dict[str, torch.Tensor] = {}
    for spec in specs:
        name = spec.name
        how, parts = _hf_parts(config, name)
        flat = [p for group in parts for p in (group if how == "stack" else [group])]
        missing = [p for p in flat if p not in hf]
        if missing:
            raise SpecMismatchError(f"checkpoint lacks {missing[:4]}{'...' if len(missing) > 4 else ''} "
                                    f"(needed for {name})")
        if how == "stack":
            t = torch.stack([torch.cat([hf[p] for p in group], dim=0) for group in parts])
        else:
            t = torch.cat([hf[p] for p in parts], dim=0) if len(parts) > 1 else hf[parts[0]]
        if tuple(t.shape) != tuple(spec.shape):
            raise SpecMismatchError(f"{name}: checkpoint gives shape {tuple(t.shape)}, config says {spec.shape}")
        out[name] = t.contiguous()
    return out


def convert_full(full: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Full tensors converted to `dtype`, contiguous; block-quantized FP8 weights and their float32 scales
    (`*_scale_inv`) stay as stored."""
    return {k: v.contiguous() if k.endswith(SCALE_SUFFIX) or v.dtype == torch.float8_e4m3fn
            else v.to(dtype).contiguous() for k, v in full.items()}


def load_hf_checkpoint(model_dir: str,
                       dtype: Union[None, str, torch.dtype] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read config.json and model.safetensors (or a sharded model.safetensors.index.json) of a
    checkpoint of one of ARCHITECTURES (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 / V3).

    Returns (config, full): config is the HF config dict with "torch_dtype" set to the tensors' dtype (so
    model_param_specs(config) matches them); full maps every fused name of model_param_specs(config) to the full
    (unsharded) CPU tensor, converted to `dtype` if given (else the checkpoint's dtype; block-quantized FP8 weights
    and their scales keep theirs). Shard with amoeba_core.shard(full[spec.name], spec, tp_rank, degree).
    """
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    archs = config.get("architectures") or [ARCHITECTURES.get(config.get("model_type"), "?")]
    if not any(a in ARCHITECTURES.values() for a in archs):
        raise ConfigError(f"unsupported architecture {archs}; expected one of {sorted(ARCHITECTURES.values())}")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    hf: Dict[str, torch.Tensor] = {}
    for name in files:
        hf.update(load_file(os.path.join(model_dir, name)))
    full = fuse_hf_tensors(config, hf)
    dt = _dtype(dtype) or full["model.embed_tokens.weight"].dtype
    return dict(config, torch_dtype=dtype_name(dt)), convert_full(full, dt)


def random_hf_tensors(config: Mapping, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic random weights with HF's unfused names (model_param_specs(config, fused=False)), in
    config["torch_dtype"] (default float32); with a block-wise FP8 quantization_config, the matrices FP8 checkpoints
    quantize are stored as float8_e4m3fn with their `weight_scale_inv` (quantize_fp8_blocks).

    Values come from amoeba_core.verify.full_tensor (N(0, 0.02^2), a pure function of seed and name) drawn in fp32
    and rescaled so activations stay O(1): embeddings std 1, linear weights std 1/sqrt(fan_in), norm weights
    1 + N(0, 0.02^2), biases std 0.1. Then rounded once to the dtype.
    """
    dt = _dtype(config.get("torch_dtype") or "float32")
    block = fp8_block_of(config)
    names = {s.name for s in model_param_specs(config, fused=False)}  # with the scales when quantized
    out = {}
    for spec in model_param_specs(config, dtype="float32", fused=False, quantized=False):
        t = full_tensor(dataclasses.replace(spec, dtype="float32"), seed) / 0.02  # ~N(0, 1)
        if spec.name.endswith("norm.weight"):
            t = 1.0 + 0.02 * t
        elif spec.name.endswith(".bias"):
            t = 0.1 * t
        elif "embed_tokens" not in spec.name:
            t = t / spec.shape[-1] ** 0.5
        if spec.name + SCALE_SUFFIX in names:
            out[spec.name], out[spec.name + SCALE_SUFFIX] = quantize_fp8_blocks(t, block)
        else:
            out[spec.name] = t.to(dt).contiguous()
    return out


def write_random_checkpoint(model_dir: str, config: Mapping, seed: int = 0) -> str:
    """Write a small random HF checkpoint (config.json + model.safetensors, unfused HF names) to model_dir.

    config: HF-style dict (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size,
    num_hidden_layers, vocab_size, ...); model_type defaults to "llama" and architectures follow it. Weights are
    random_hf_tensors(config, seed). Returns model_dir.
    """
    from safetensors.torch import save_file

    config = dict(config)
    config.setdefault("model_type", "llama")
    config.setdefault("architectures", [ARCHITECTURES.get(config["model_type"], "LlamaForCausalLM")])
    config.setdefault("torch_dtype", "float32")
    config.setdefault("rms_norm_eps", 1e-6)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("tie_word_embeddings", False)
    os.makedirs(model_dir, exist_ok=True)
    tensors = random_hf_tensors(config, seed)
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return model_dir
