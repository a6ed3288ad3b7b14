"""Parameter specs of mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) from an HF-style config dict.

Experts are tensor-parallel the way vLLM shards them without expert parallelism: every TP rank holds every expert
and each expert's intermediate dim is split (FusedMoE in vllm/model_executor/layers/fused_moe/layer.py: `_load_w13`
narrows gate and up separately on their output dim and stacks them, `_load_w2` narrows down_proj on its input dim).
With E experts of intermediate size I, hidden size h, degree t:

  fused=True (default, vLLM's parameters)
    {moe}.experts.w13_weight   (E, 2 * I, h)   per expert [gate; up], each split on I: rank r holds
                                               (E, 2 * I / t, h) = [gate_r; up_r] of every expert
    {moe}.experts.w2_weight    (E, h, I)       split on I (row-parallel): (E, h, I / t)
  fused=False (HF checkpoint names)
    {moe}.experts.{e}.{gate,up,down}_proj.weight   (Mixtral: w1 = gate, w3 = up, w2 = down), column / row
  always
    {moe}.gate.weight          (E, h)          the router, replicated (vLLM: ReplicatedLinear)

Qwen2-MoE adds a shared expert, an ordinary TP MLP ({moe}.shared_expert.gate_up_proj / down_proj, or HF's
gate_proj / up_proj / down_proj), and its gate {moe}.shared_expert_gate.weight (1, h), replicated
(vllm/model_executor/models/qwen2_moe.py). DeepSeek's shared experts ({moe}.shared_experts.*) are the same kind of MLP
(vllm/model_executor/models/deepseek_v2.py); DeepSeek-V3's router adds {moe}.gate.e_score_correction_bias (E,),
float32, replicated.

{moe} is model.layers.{i}.block_sparse_moe for Mixtral and model.layers.{i}.mlp otherwise. Layers that are not
sparse (Qwen: mlp_only_layers and decoder_sparse_step; DeepSeek: the first first_k_dense_replace layers) keep the
dense MLP of llama_param_specs. Attention and everything else are Llama's (layout/llama.py) or Qwen3's
(layout/qwen3.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ..errors import ConfigError
from . import specs as S
from .llama import llama_param_specs
from .qwen3 import insert_qk_norms

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class MoEDims:
    """What a config says about its MoE feed-forward layers (shared by the spec builders and the reference engine).

    num_experts, intermediate (per expert), top_k, renormalize (top-k weights divided by their sum),
    routed_scale (factor on the routed experts' weights), shared_intermediate (0: no shared expert),
    shared_gate (a sigmoid gate on the shared expert, Qwen2-MoE), sparse_layers (layer indices with an MoE block),
    module (the block's name under model.layers.{i}.), expert_names (HF names of gate, up, down per expert),
    shared_module (name of the shared expert under the block), correction_bias (DeepSeek-V3's
    e_score_correction_bias on the router).
    """

    num_experts: int
    intermediate: int
    top_k: int
    renormalize: bool
    routed_scale: float
    shared_intermediate: int
    shared_gate: bool
    sparse_layers: Tuple[int, ...]
    module: str
    expert_names: Tuple[str, str, str]
    shared_module: str = "shared_expert"
    correction_bias: bool = False

    def prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.module}."


def _require(config: Mapping, keys) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise ConfigError(f"{config.get('model_type')} config lacks {missing}")


def moe_dims(config: Mapping) -> Optional[MoEDims]:
    """MoEDims of a Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V2 / DeepSeek-V3 config; None for a dense model."""
    mt = config.get("model_type")
    layers = int(config["num_hidden_layers"])
    if mt == "mixtral":
        _require(config, ("num_local_experts", "num_experts_per_tok", "intermediate_size"))
        return MoEDims(int(config["num_local_experts"]), int(config["intermediate_size"]),
                       int(config["num_experts_per_tok"]), True, 1.0, 0, False, tuple(range(layers)),
                       "block_sparse_moe", ("w1", "w3", "w2"))
    if mt in ("qwen2_moe", "qwen3_moe"):
        _require(config, ("num_experts", "num_experts_per_tok", "moe_intermediate_size"))
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or ())
        sparse = tuple(i for i in range(layers)
                       if i not in dense and int(config["num_experts"]) > 0 and (i + 1) % step == 0)
        shared = int(config.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
        return MoEDims(int(config["num_experts"]), int(config["moe_intermediate_size"]),
                       int(config["num_experts_per_tok"]), bool(config.get("norm_topk_prob", False)), 1.0, shared,
                       shared > 0, sparse, "mlp", ("gate_proj", "up_proj", "down_proj"))
    if mt in ("deepseek_v2", "deepseek_v3"):
        if not config.get("n_routed_experts"):
            return None
        _require(config, ("num_experts_per_tok", "moe_intermediate_size"))
        first = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        sparse = tuple(i for i in range(layers) if i >= first and i % freq == 0)
        inter = int(config["moe_intermediate_size"])
        shared = inter * int(config.get("n_shared_experts") or 0)
        return MoEDims(int(config["n_routed_experts"]), inter, int(config["num_experts_per_tok"]),
                       bool(config.get("norm_topk_prob", False)), float(config.get("routed_scaling_factor", 1.0)),
                       shared, False, sparse, "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts",
                       mt == "deepseek_v3")
    return None


def mlp_specs(prefix: str, hidden: int, intermediate: int, dtype: str, fused: bool) -> list:
    """A SwiGLU MLP under `prefix` (ending in '.'): gate_up_proj = [gate; up] merged column-parallel (fused) or
    gate_proj / up_proj column-parallel (HF), down_proj row-parallel."""
    if fused:
        out = [S.merged_column(prefix + "gate_up_proj.weight", (2 * intermediate, hidden), dtype,
                               (intermediate, intermediate), ("gate", "up"))]
    else:
        out = [S.column(prefix + "gate_proj.weight", (intermediate, hidden), dtype),
               S.column(prefix + "up_proj.weight", (intermediate, hidden), dtype)]
    return out + [S.row(prefix + "down_proj.weight", (hidden, intermediate), dtype)]


def moe_block_specs(m: MoEDims, layer: int, hidden: int, dtype: str, fused: bool) -> list:
    """Specs of one layer's MoE block (router, experts, shared expert and its gate), in checkpoint order."""
    p = m.prefix(layer)
    E, I = m.num_experts, m.intermediate
    out = [S.replicated(p + "gate.weight", (E, hidden), dtype)]
    if m.correction_bias:
        out.append(S.replicated(p + "gate.e_score_correction_bias", (E,), "float32"))
    if fused:
        out.append(S.ParamSpec(p + "experts.w13_weight", (E, 2 * I, hidden), dtype, S.MERGED_COLUMN, 1,
                               (S.Section("gate", I), S.Section("up", I))))
        out.append(S.row(p + "experts.w2_weight", (E, hidden, I), dtype))
    else:
        gate, up, down = m.expert_names
        for e in range(E):
            q = f"{p}experts.{e}."
            out += [S.column(q + f"{gate}.weight", (I, hidden), dtype),
                    S.column(q + f"{up}.weight", (I, hidden), dtype),
                    S.row(q + f"{down}.weight", (hidden, I), dtype)]
    if m.shared_intermediate:
        out += mlp_specs(p + m.shared_module + ".", hidden, m.shared_intermediate, dtype, fused)
    if m.shared_gate:
        out.append(S.replicated(p + "shared_expert_gate.weight", (1, hidden), dtype))
    return out


def _llama_view(config: Mapping) -> dict:
    """The config as llama_param_specs reads it: Qwen2-MoE's qkv_bias means q/k/v biases without an o_proj bias
    (Qwen2's rule); Mixtral and Qwen3(-MoE) follow Llama's attention_bias."""
    if config.get("model_type") == "qwen2_moe":
        if config.get("qkv_bias", True):
            return dict(config, model_type="qwen2", attention_bias=False, architectures=[])
        return dict(config, model_type="llama", attention_bias=False, architectures=[])
    return dict(config, architectures=[])


def moe_param_specs(config: Mapping, dtype: Optional[str] = None, fused: bool = True) -> list:
    """Specs of every parameter of a Mixtral / Qwen2-MoE / Qwen3-MoE decoder, in checkpoint order.

    config: HF-style dict (model_type "mixtral", "qwen2_moe" or "qwen3_moe" and that family's fields; see
            moe_dims). dtype / fused: as llama_param_specs (fused=True: vLLM's names, see the module doc).
    """
    m = moe_dims(config)
    if m is None or config.get("model_type") not in MOE_MODEL_TYPES:
        raise ConfigError(f"moe_param_specs expects model_type in {MOE_MODEL_TYPES}, got {config.get('model_type')!r}")
    dt = dtype or str(config.get("torch_dtype") or "float32").replace("torch.", "")
    hidden = int(config["hidden_size"])
    base = llama_param_specs(_llama_view(config), dtype=dt, fused=fused)
    if config.get("model_type") == "qwen3_moe":
        base = insert_qk_norms(base, config, dt)
    sparse = set(m.sparse_layers)
    out = []
    for spec in base:
        parts = spec.name.split(".")
        layer = int(parts[2]) if spec.name.startswith("model.layers.") else -1
        if layer in sparse and parts[3] == "mlp":
            if parts[4] in ("gate_up_proj", "gate_proj"):  # the first dense-MLP spec: the MoE block goes here
                out += moe_block_specs(m, layer, hidden, dt, fused)
            continue
        out.append(spec)
    return out
