"""The reference engine's forward passes for the families beyond Llama: Qwen3's per-head q/k norms, MoE
feed-forwards (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE, DeepSeek-V2), DeepSeek-V2's multi-head
latent attention over the MLA cache, and block-quantized FP8 weights (dequantized at use).

Each rank computes with its own shards, as vLLM does (see amoeba_core.layout.moe / mla for the sharding):
  * MoE: the router is replicated, so every rank routes every token identically; each rank runs every expert on its
    slice of the intermediate dim (w13 rows [gate_r; up_r], w2 columns) and the partial outputs of the experts and
    the shared expert are summed with one all-reduce over the instance.
  * MLA: every rank computes the whole latent [kv_a_layernorm(kv_c); rotary(k_pe)] (replicated down-projections)
    and stores it in its cache (all ranks of an instance hold the same latent); its heads' queries, keys and values
    come from its rows of q_b_proj / kv_b_proj, applied to the cached latent (the plain, non-absorbed form), and
    o_proj is row-parallel.
Activations are float32, as in model.py. Shapes: T tokens of one step, h hidden, E experts, Hl heads of this rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kv import KVLayout
from ..layout.families import fp8_block_of
from ..layout.llama import model_dims
from ..layout.mla import MLA_MODEL_TYPES, MLADims, mla_dims
from ..layout.moe import MoEDims, moe_dims
from ..layout.quant import dequantize_fp8_blocks
from .model import attend, linear, rms_norm

ROUTINGS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class ModelFamily:
    """What the engine needs to know about a model beyond Llama's dimensions.

    moe: MoE feed-forward (None: dense); mla: latent attention (None: GQA); qk_norm: Qwen3's q_norm / k_norm;
    routing: DeepSeek's top-k method ("greedy" or "group_limited_greedy" over n_group groups, keeping topk_group);
    fp8_block: (bn, bk) of block-quantized FP8 weights, or None.
    """

    model_type: str
    moe: Optional[MoEDims]
    mla: Optional[MLADims]
    qk_norm: bool
    routing: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    fp8_block: Optional[Tuple[int, int]] = None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.sparse_layers


def family_of(config: Mapping) -> ModelFamily:
    """The ModelFamily of an HF config; raises ConfigError for what the reference engine does not implement."""
    mt = config.get("model_type") or "llama"
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"the reference engine implements SwiGLU (silu) MLPs, not {config.get('hidden_act')!r}")
    if config.get("use_sliding_window") or (mt == "mixtral" and config.get("sliding_window")):
        raise ConfigError("the reference engine does not implement sliding-window attention")
    routing = config.get("topk_method") or "greedy"
    if mt in MLA_MODEL_TYPES and (routing not in ROUTINGS or config.get("scoring_func", "softmax") != "softmax"):
        raise ConfigError(f"the reference engine implements softmax routing with {ROUTINGS}, not "
                          f"{routing!r} / {config.get('scoring_func')!r} (DeepSeek-V3's noaux_tc)")
    return ModelFamily(mt, moe_dims(config), mla_dims(config) if mt in MLA_MODEL_TYPES else None,
                       mt in ("qwen3", "qwen3_moe"), routing, int(config.get("n_group") or 1),
                       int(config.get("topk_group") or 1), fp8_block_of(config))


def kv_layout_for(config: Mapping, engine: str, order: str, block_size: int) -> KVLayout:
    """The paged KV cache layout of a model: `engine` / `order` for GQA models; vLLM's MLA cache ("vllm_mla",
    one latent of kv_lora_rank + qk_rope_head_dim per token) for DeepSeek, whatever `engine` says."""
    dims, dtype = model_dims(config), config["torch_dtype"]
    if config.get("model_type") in MLA_MODEL_TYPES:
        a = mla_dims(config)
        return KVLayout.mla(dims["layers"], a.kv_lora, a.rope, block_size, dtype)
    return KVLayout(engine, order, dims["layers"], dims["kv_heads"], dims["head_dim"], block_size, dtype)


def weight(engine, name: str) -> Optional[torch.Tensor]:
    """A weight shard as computed with: block-quantized FP8 shards are dequantized with their scale shards
    (`<name>_scale_inv`), float32; others are returned as stored."""
    w = engine.weights.get(name)
    scale = engine.weights.get(name + "_scale_inv")
    if w is None or scale is None:
        return w
    return dequantize_fp8_blocks(w, scale, engine.family.fp8_block)


# ---- Qwen3 ---------------------------------------------------------------------------------------------------
def qk_norms(engine, prefix: str, q: torch.Tensor, k: torch.Tensor):
    """q (T, Hq, d), k (T, Hkv, d) -> each head's vector RMS-normalised with q_norm / k_norm (before rotary)."""
    return (rms_norm(q, engine.w(prefix + "q_norm.weight"), engine.eps),
            rms_norm(k, engine.w(prefix + "k_norm.weight"), engine.eps))


# ---- MoE -----------------------------------------------------------------------------------------------------
def route(family: ModelFamily, logits: torch.Tensor):
    """Router logits (T, E) fp32 -> (weights (T, k) fp32, experts (T, k) long): softmax over experts, top-k (DeepSeek
    group-limited: only among the topk_group groups with the best expert), renormalised if the config says so,
    times the routed scaling factor (HF MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, DeepseekV2MoEGate)."""
    m = family.moe
    scores = logits.softmax(dim=-1)
    if family.routing == "group_limited_greedy":
        groups = scores.view(scores.shape[0], family.n_group, -1)
        best = groups.max(dim=-1).values.topk(family.topk_group, dim=-1).indices     # (T, topk_group)
        keep = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1.0).bool()       # (T, n_group)
        scores = groups.masked_fill(~keep[..., None], 0.0).view_as(scores)
    weights, experts = scores.topk(m.top_k, dim=-1)
    if m.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * m.routed_scale, experts


def swiglu_partial(engine, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """This rank's share of a TP SwiGLU MLP under `prefix` (gate_up_proj, down_proj), not yet all-reduced."""
    gate, up = linear(x, engine.w(prefix + "gate_up_proj.weight")).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, engine.w(prefix + "down_proj.weight"))


def moe_mlp(engine, li: int, x: torch.Tensor) -> torch.Tensor:
    """x (T, h) -> (T, h): routed experts (each on this rank's slice of its intermediate dim) plus the shared expert
    (Qwen2-MoE: times sigmoid(shared_expert_gate x)), summed over the instance with one all-reduce."""
    m = engine.family.moe
    p = m.prefix(li)
    weights, experts = route(engine.family, linear(x, engine.w(p + "gate.weight")))
    w13, w2 = engine.w(p + "experts.w13_weight"), engine.w(p + "experts.w2_weight")  # (E, 2 I_r, h), (E, h, I_r)
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():
        tokens, slot = (experts == e).nonzero(as_tuple=True)
        gate, up = linear(x[tokens], w13[e]).chunk(2, dim=-1)
        out.index_add_(0, tokens, linear(F.silu(gate) * up, w2[e]) * weights[tokens, slot, None])
    if m.shared_intermediate:
        shared = swiglu_partial(engine, p + m.shared_module + ".", x)
        if m.shared_gate:  # a per-token scalar: gating each rank's partial sum gates the total
            shared = torch.sigmoid(linear(x, engine.w(p + "shared_expert_gate.weight"))) * shared
        out = out + shared
    return engine.all_reduce(out)


# ---- MLA -----------------------------------------------------------------------------------------------------
def rotary_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-J style rotary embedding (pairs (x[2i], x[2i+1]); vLLM is_neox_style=False, HF DeepSeek-V2's complex
    rotation) of x (T, H, d) fp32 at positions (T,)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def mla_write(layout: KVLayout, cache: torch.Tensor, table: torch.Tensor, positions: torch.Tensor,
              latent: torch.Tensor) -> None:
    """Store latent (n, kv_lora + rope) of tokens at `positions` of a sequence with block table `table` (long) in
    one layer's MLA cache (num_blocks, block_size, kv_lora + rope)."""
    cache[table[positions // layout.block_size], positions % layout.block_size] = latent.to(cache.dtype)


def mla_read(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The latents of the first `length` tokens of a sequence: (length, kv_lora + rope) fp32."""
    return cache[table].reshape(-1, cache.shape[-1])[:length].float()


def mla_attention(engine, li: int, x: torch.Tensor, positions: torch.Tensor, batch: list) -> torch.Tensor:
    """x (T, h) -> (T, h) for one layer of multi-head latent attention; writes each token's latent into the cache.
    batch: [(table (long), slice of x, start position)] per sequence."""
    a: MLADims = engine.family.mla
    p = f"model.layers.{li}.self_attn."
    heads = a.heads // engine.slot.degree
    if a.q_lora is not None:
        q_c, kv = linear(x, engine.w(p + "fused_qkv_a_proj.weight")).split([a.q_lora, a.latent], dim=-1)
        q = linear(rms_norm(q_c, engine.w(p + "q_a_layernorm.weight"), engine.eps), engine.w(p + "q_b_proj.weight"))
    else:
        q = linear(x, engine.w(p + "q_proj.weight"))
        kv = linear(x, engine.w(p + "kv_a_proj_with_mqa.weight"))
    q_nope, q_pe = q.view(-1, heads, a.qk).split([a.nope, a.rope], dim=-1)
    q = torch.cat([q_nope, rotary_interleaved(q_pe, positions, engine.theta)], dim=-1)      # (T, Hl, qk)
    kv_c, k_pe = kv.split([a.kv_lora, a.rope], dim=-1)
    latent = torch.cat([rms_norm(kv_c, engine.w(p + "kv_a_layernorm.weight"), engine.eps),
                        rotary_interleaved(k_pe[:, None, :], positions, engine.theta)[:, 0]], dim=-1)
    kv_b = engine.w(p + "kv_b_proj.weight").float().view(heads, a.nope + a.v, a.kv_lora)  # this rank's heads
    out = torch.empty(x.shape[0], heads, a.v)
    cache = engine.layers[li]
    for table, span, start in batch:
        mla_write(engine.layout, cache, table, positions[span], latent[span])
        ctx = mla_read(cache, table, start + span.stop - span.start)                       # (ctx, latent)
        k_nope, v = torch.einsum("cl,hdl->chd", ctx[:, : a.kv_lora], kv_b).split([a.nope, a.v], dim=-1)
        k = torch.cat([k_nope, ctx[:, None, a.kv_lora:].expand(-1, heads, -1)], dim=-1)   # (ctx, Hl, qk)
        out[span] = attend(q[span], k, v, positions[span])                                # scale qk ** -0.5
    return engine.all_reduce(linear(out.reshape(-1, heads * a.v), engine.w(p + "o_proj.weight")))
