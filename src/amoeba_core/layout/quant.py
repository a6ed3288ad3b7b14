"""Block-quantized FP8 weights (DeepSeek-V3 style, vLLM's Fp8LinearMethod with weight_block_size) as specs.

A quantized weight W of shape (..., N, K) is stored as float8_e4m3fn together with a float32 tensor
`<name>_scale_inv` of shape (..., ceil(N / bn), ceil(K / bk)): element [i, j] of W dequantizes to
W[i, j] * scale_inv[i // bn, j // bk] (block = (bn, bk), (128, 128) in DeepSeek-V3 and Qwen3 FP8 checkpoints).
vLLM names the scales `weight_scale_inv` on linear layers and `w13_weight_scale_inv` / `w2_weight_scale_inv` on
FusedMoE, i.e. the weight's name + "_scale_inv" (vllm/model_executor/layers/quantization/fp8.py; the FusedMoE scale
loader narrows them like their weights, in block units).

Sharding rules (vLLM refuses other degrees with "... is not divisible by weight quantization block_n/block_k"):
  * a shard never cuts a block: each section of the weight's split dim carries the block along that dim
    (Section.block), and check_degree raises InvalidDegreeError naming the tensor when a shard boundary falls inside
    a block; at degree 1 nothing is cut, so sizes need not be multiples of the block (the last block is partial)
  * the scale is split like its weight, in block units: a spec of its own, same kind and split dim, whose sections
    are the weight's sections divided by the block; so retp moves scales with their weights, bit-exact
  * sections of a fused weight (qkv, gate_up, w13) other than the last must be whole blocks, so that the fused
    scale is the concatenation of the parts' scales
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .specs import ParamSpec, Section

FP8_DTYPE = "float8_e4m3fn"
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
_SKIP = ("embed_tokens", "lm_head", "norm")


def default_fp8_filter(spec: ParamSpec) -> bool:
    """Which specs FP8 checkpoints quantize: every matrix but the embeddings, the LM head, norms and routers
    (mlp.gate / block_sparse_moe.gate, shared_expert_gate), as in DeepSeek-V3 and Qwen3 FP8 checkpoints."""
    name = spec.name
    if len(spec.shape) < 2 or any(s in name for s in _SKIP):
        return False
    return not (name.endswith(".gate.weight") or name.endswith("shared_expert_gate.weight"))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _scale_section(s: Section, block: int) -> Section:
    """The scale's section for weight section s cut in blocks of `block` elements."""
    if s.unit % block == 0:
        unit = s.unit // block
    elif s.size == s.unit:      # a single unit smaller than a block (one replicated KV head): one scale unit
        unit = _ceil(s.size, block)
    else:
        unit = 1
    return Section(s.name, _ceil(s.size, block), unit, s.kind)


def fp8_block_specs(specs: Sequence[ParamSpec], block: Tuple[int, int] = DEFAULT_BLOCK,
                    quantize: Optional[Callable[[ParamSpec], bool]] = None) -> list:
    """The specs of the same model stored as block-quantized FP8: every spec that `quantize` selects (default:
    default_fp8_filter) becomes float8_e4m3fn with its block on the split dim and is followed by its
    `<name>_scale_inv` float32 spec; the others are returned unchanged.

    block: (bn, bk) elements along the last two dims (..., N, K). Raises ConfigError for a quantized spec whose
    padded (vocab) sections or non-last fused sections are not whole blocks.
    """
    bn, bk = block
    if bn < 1 or bk < 1:
        raise ConfigError(f"FP8 block {block} must be positive")
    quantize = quantize or default_fp8_filter
    out = []
    for spec in specs:
        if not quantize(spec):
            out.append(spec)
            continue
        nd = len(spec.shape)
        if nd < 2:
            raise ConfigError(f"{spec.name}: only matrices (..., N, K) are block-quantized, shape {spec.shape}")
        scale_shape = tuple(spec.shape[:-2]) + (_ceil(spec.shape[-2], bn), _ceil(spec.shape[-1], bk))
        scale_name = spec.name + SCALE_SUFFIX
        if not spec.is_sharded:
            out += [dataclasses.replace(spec, dtype=FP8_DTYPE),
                    ParamSpec(scale_name, scale_shape, "float32", spec.kind)]
            continue
        b = {nd - 2: bn, nd - 1: bk}.get(spec.split_dim, 1)
        for s in spec.sections:
            if s.full_size != s.size:
                raise ConfigError(f"{spec.name}: padded section {s.name!r} cannot be block-quantized")
        for s in spec.sections[:-1]:
            if s.size % b:
                raise ConfigError(f"{spec.name}: fused section {s.name!r} of {s.size} elements is not a whole "
                                  f"number of {b}-element quantization blocks")
        weight = dataclasses.replace(spec, dtype=FP8_DTYPE,
                                     sections=tuple(dataclasses.replace(s, block=b) for s in spec.sections))
        scale = ParamSpec(scale_name, scale_shape, "float32", spec.kind, spec.split_dim,
                          tuple(_scale_section(s, b) for s in spec.sections))
        out += [weight, scale]
    return out


# ---- block quantization (tests, random checkpoints, the reference engine's dequantization) --------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _expand(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """scale (..., ceil(N/bn), ceil(K/bk)) -> (..., N, K), each block's value repeated over the block."""
    bn, bk = block
    s = scale.repeat_interleave(bn, dim=-2)[..., : shape[-2], :]
    return s.repeat_interleave(bk, dim=-1)[..., : shape[-1]]


def quantize_fp8_blocks(w: torch.Tensor, block: Tuple[int, int] = DEFAULT_BLOCK):
    """(q, scale_inv): w (..., N, K) float -> q float8_e4m3fn of the same shape and scale_inv float32
    (..., ceil(N/bn), ceil(K/bk)) with q * scale_inv ~= w, each block scaled so its largest |w| maps to 448."""
    bn, bk = block
    n, k = w.shape[-2:]
    pad = torch.zeros(*w.shape[:-2], _ceil(n, bn) * bn, _ceil(k, bk) * bk, dtype=torch.float32)
    pad[..., :n, :k] = w.float()
    blocks = pad.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))      # (..., nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12)            # (..., nb, kb)
    scale_inv = (amax / FP8_MAX).float()
    q = (w.float() / _expand(scale_inv, w.shape, block)).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor,
                          block: Tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """q (..., N, K) float8 and scale_inv (..., ceil(N/bn), ceil(K/bk)) float32 -> (..., N, K) float32."""
    return q.float() * _expand(scale_inv.float(), q.shape, block)
