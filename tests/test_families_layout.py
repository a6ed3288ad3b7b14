"""Spec builders of the newer families: names and shapes match HF's checkpoints, shards match what vLLM loads, and
block-quantized FP8 never cuts a scale block."""
import pytest
import torch

import amoeba_core as A
from amoeba_core.errors import ConfigError, InvalidDegreeError
from amoeba_core.layout.moe import moe_dims
from amoeba_core.layout.quant import dequantize_fp8_blocks, fp8_block_specs, quantize_fp8_blocks
from amoeba_core.verify import full_tensor

import family_models as M


def by_name(specs):
    return {s.name: s for s in specs}


@pytest.mark.parametrize("family", sorted(M.FAMILIES))
def test_unfused_names_and_shapes_are_hf_checkpoints(family):
    """fused=False gives exactly the names, shapes and dtypes of the HF model's state_dict."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(M.FAMILIES[family])
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        want.pop("lm_head.weight")  # tied: the checkpoint stores the embedding once
    got = {s.name: (s.shape, s.torch_dtype) for s in A.model_param_specs(cfg, fused=False)}
    assert got == want


def test_sparse_layers_follow_each_family_rule():
    assert moe_dims(M.MIXTRAL).sparse_layers == (0, 1)
    assert moe_dims(M.QWEN2_MOE).sparse_layers == (0,)                     # mlp_only_layers=[1]
    assert moe_dims(dict(M.QWEN3_MOE, decoder_sparse_step=2)).sparse_layers == (1,)
    assert moe_dims(dict(M.DEEPSEEK_V2, num_hidden_layers=4)).sparse_layers == (1, 2, 3)  # first_k_dense_replace
    assert moe_dims(M.QWEN3) is None


def _experts(cfg, layer):
    m = moe_dims(cfg)
    p = m.prefix(layer)
    names = [[f"{p}experts.{e}.{n}.weight" for n in m.expert_names] for e in range(m.num_experts)]
    return m, p, names


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_fused_experts_shard_like_vllm_fused_moe(family):
    """w13 rank r = per expert [gate rows of rank r; up rows of rank r]; w2 rank r = the input columns of rank r.
    Expectations are built by slicing the HF per-expert tensors directly."""
    cfg = M.FAMILIES[family]
    fused, unfused = by_name(A.model_param_specs(cfg)), by_name(A.model_param_specs(cfg, fused=False))
    layer = moe_dims(cfg).sparse_layers[0]
    m, p, names = _experts(cfg, layer)
    hf = {n: full_tensor(unfused[n]) for e in names for n in e}
    w13 = torch.stack([torch.cat([hf[g], hf[u]]) for g, u, _ in names])
    w2 = torch.stack([hf[d] for _, _, d in names])
    assert w13.shape == fused[p + "experts.w13_weight"].shape and w2.shape == fused[p + "experts.w2_weight"].shape
    inter = m.intermediate
    for degree in (1, 2, 4):
        n = inter // degree
        for r in range(degree):
            rows = slice(r * n, (r + 1) * n)
            want13 = torch.stack([torch.cat([hf[g][rows], hf[u][rows]]) for g, u, _ in names])
            assert torch.equal(A.shard(w13, fused[p + "experts.w13_weight"], r, degree), want13)
            want2 = torch.stack([hf[d][:, rows] for _, _, d in names])
            assert torch.equal(A.shard(w2, fused[p + "experts.w2_weight"], r, degree), want2)
            for g, u, d in names:  # the unfused per-expert tensors are column / row parallel the same way
                assert torch.equal(A.shard(hf[g], unfused[g], r, degree), hf[g][rows])
                assert torch.equal(A.shard(hf[d], unfused[d], r, degree), hf[d][:, rows])


def test_routers_norms_and_shared_gates_are_replicated():
    for cfg in (M.MIXTRAL, M.QWEN2_MOE, M.QWEN3_MOE, M.QWEN3, M.DEEPSEEK_V2):
        for spec in A.model_param_specs(cfg):
            if spec.name.endswith((".gate.weight", "shared_expert_gate.weight", "norm.weight")):
                assert not spec.is_sharded, spec.name
    specs = by_name(A.model_param_specs(M.QWEN2_MOE))
    assert specs["model.layers.0.mlp.shared_expert.gate_up_proj.weight"].kind == "merged_column"
    assert specs["model.layers.0.mlp.shared_expert.down_proj.weight"].kind == "row"
    assert specs["model.layers.0.self_attn.qkv_proj.bias"].kind == "qkv"   # Qwen2-MoE keeps Qwen2's q/k/v biases
    assert specs["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)  # the dense layer
    q3 = by_name(A.model_param_specs(M.QWEN3))
    assert q3["model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert q3["model.layers.0.self_attn.qkv_proj.weight"].shape == ((8 + 2 * 2) * 16, 64)  # head_dim 16, not 64/8


@pytest.mark.parametrize("cfg", [M.DEEPSEEK_V2, M.DEEPSEEK_V2_LITE], ids=["q_lora", "no_q_lora"])
def test_mla_projections_split_by_heads(cfg):
    """kv_b_proj / q_b_proj (q_proj) rows and o_proj columns of rank r are exactly its heads; the down-projections
    and their norms are whole on every rank (fused_qkv_a_proj = [q_a_proj; kv_a_proj_with_mqa])."""
    specs = by_name(A.model_param_specs(cfg))
    H, nope, rope, v = 8, 16, 8, 16
    p = "model.layers.1.self_attn."
    q_name = p + ("q_b_proj.weight" if cfg["q_lora_rank"] else "q_proj.weight")
    assert (p + "fused_qkv_a_proj.weight" in specs) == bool(cfg["q_lora_rank"])
    for name, per_head, dim in ((p + "kv_b_proj.weight", nope + v, 0), (q_name, nope + rope, 0),
                                (p + "o_proj.weight", v, 1)):
        full = full_tensor(specs[name])
        for degree in (1, 2, 4):
            n = H // degree * per_head
            for r in range(degree):
                want = full.narrow(dim, r * n, n)
                assert torch.equal(A.shard(full, specs[name], r, degree), want), (name, r, degree)
    for name in (p + "kv_a_layernorm.weight", p + "kv_a_proj_with_mqa.weight", p + "fused_qkv_a_proj.weight"):
        if name in specs:
            assert not specs[name].is_sharded


def test_unknown_model_type_raises():
    with pytest.raises(ConfigError, match="falcon"):
        A.model_param_specs(dict(M.QWEN3, model_type="falcon"))


# ---- block-quantized FP8 -------------------------------------------------------------------------------------
def test_fp8_specs_pair_every_matrix_with_its_block_scales():
    specs = by_name(A.model_param_specs(M.FP8_QWEN3_MOE))
    p = "model.layers.0."
    w13, s13 = specs[p + "mlp.experts.w13_weight"], specs[p + "mlp.experts.w13_weight_scale_inv"]
    assert (w13.dtype, w13.shape, s13.dtype, s13.shape) == ("float8_e4m3fn", (2, 1024, 128), "float32", (2, 8, 1))
    qkv = specs[p + "self_attn.qkv_proj.weight_scale_inv"]
    assert qkv.shape == ((4 + 2 * 2) * 128 // 128, 1) and [s.size for s in qkv.sections] == [4, 2, 2]
    assert specs[p + "self_attn.o_proj.weight_scale_inv"].shape == (1, 4)
    for name in ("model.embed_tokens.weight", "lm_head.weight", p + "mlp.gate.weight", p + "input_layernorm.weight",
                 p + "self_attn.q_norm.weight"):
        assert specs[name].dtype == "float32" and name + "_scale_inv" not in specs
    unquantized = A.model_param_specs(M.FP8_QWEN3_MOE, quantized=False)
    assert all(s.dtype == "float32" for s in unquantized) and len(specs) == len(unquantized) + 8  # 4 matrices per layer


def _vllm_partition_scale_shape(weight_spec, degree, block=(128, 128)):
    """What vLLM allocates per rank: (ceil(N_p / bn), ceil(K_p / bk)) from the rank's weight shard shape."""
    shape = weight_spec.shard_shape(0, degree)
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def test_fp8_shards_keep_blocks_whole_and_scales_follow_their_weights():
    """For every quantized tensor and valid degree: dequantizing a rank's (weight, scale) shards gives the shard of
    the dequantized full tensor, and the scale shard has the shape vLLM allocates for that rank."""
    specs = A.model_param_specs(M.FP8_QWEN3_MOE)
    plain = by_name(A.model_param_specs(M.FP8_QWEN3_MOE, quantized=False))
    named = by_name(specs)
    checked = 0
    for spec in specs:
        scale = named.get(spec.name + "_scale_inv")
        if scale is None:
            continue
        q, s = quantize_fp8_blocks(full_tensor(plain[spec.name]))
        assert q.dtype == torch.float8_e4m3fn and s.shape == scale.shape
        deq = dequantize_fp8_blocks(q, s)
        for degree in (1, 2, 4):
            for r in range(degree):
                qs, ss = A.shard(q, spec, r, degree), A.shard(s, scale, r, degree)
                assert ss.shape == _vllm_partition_scale_shape(spec, degree)
                assert torch.equal(dequantize_fp8_blocks(qs, ss), A.shard(deq, plain[spec.name], r, degree))
        checked += 1
    assert checked == 8


@pytest.mark.parametrize("degree, tensor", [
    (8, "model.layers.0.mlp.experts.w13_weight"),   # 512 / 8 = 64 rows: half a block
    (8, "model.layers.1.mlp.down_proj.weight"),     # input 512 / 8 = 64 columns
])
def test_fp8_degree_that_cuts_a_block_raises_naming_the_tensor(degree, tensor):
    spec = by_name(A.model_param_specs(M.FP8_QWEN3_MOE))[tensor]
    with pytest.raises(InvalidDegreeError) as e:
        spec.check_degree(degree)
    assert tensor in str(e.value) and "quantization block of 128" in str(e.value)
    spec.check_degree(4)
    # The unquantized model allows the same degree: the block is the only reason.
    by_name(A.model_param_specs(M.FP8_QWEN3_MOE, quantized=False))[tensor].check_degree(degree)


def test_fp8_kv_heads_smaller_than_a_block():
    """64-dim KV heads with 128-row blocks: two heads per block. Degree 2 over 4 KV heads cuts at 128 rows (fine);
    degree 4 gives each rank one 64-row head, cutting a block; one KV head replicated (a partial block, whole on
    every rank) cuts nothing, and its one scale block is replicated with it."""
    base = A.layout.qkv("qkv", ((8 + 2 * 4) * 64, 128), "float32", 8, 4, 64)
    spec, scale = fp8_block_specs([base], quantize=lambda s: True)
    spec.check_degree(2)
    assert scale.shard_shape(1, 2) == ((4 + 2 + 2) // 2, 1)
    with pytest.raises(InvalidDegreeError, match="qkv"):
        spec.check_degree(4)
    one = A.layout.kv_heads("k_proj", (64, 128), "float32", 1, 64)
    spec1, scale1 = fp8_block_specs([one], quantize=lambda s: True)
    spec1.check_degree(4)
    assert [scale1.shard_ranges(r, 4) for r in range(4)] == [[(0, 1)]] * 4
    with pytest.raises(ConfigError, match="'k' of 64 elements"):  # fused, k would share a block with v
        fp8_block_specs([A.layout.qkv("qkv1", ((8 + 2) * 64, 128), "float32", 8, 1, 64)], quantize=lambda s: True)


def test_fp8_fused_sections_must_be_whole_blocks():
    odd = A.layout.merged_column("gate_up", (2 * 96, 128), "float32", (96, 96))
    with pytest.raises(ConfigError, match="gate_up"):
        fp8_block_specs([odd], quantize=lambda s: True)
    assert fp8_block_specs([A.layout.column("c", (96, 128), "float32")], quantize=lambda s: True)[1].shape == (1, 1)


@pytest.mark.parametrize("cfg", [M.MIXTRAL, M.QWEN2_MOE, M.DEEPSEEK_V2, M.FP8_QWEN3_MOE],
                         ids=["mixtral", "qwen2_moe", "deepseek_v2", "fp8_qwen3_moe"])
def test_checkpoint_loader_fuses_experts_mla_and_scales(tmp_path, cfg):
    """write_random_checkpoint (HF names) -> load_hf_checkpoint gives every fused spec in its dtype; fused tensors
    are the HF parts stacked as vLLM loads them (FP8: compared after dequantization, so the scales fused with
    their weights)."""
    from safetensors.torch import load_file
    from amoeba_core.reference import load_hf_checkpoint, write_random_checkpoint
    write_random_checkpoint(str(tmp_path), cfg, seed=2)
    hf = load_file(str(tmp_path / "model.safetensors"))
    config, full = load_hf_checkpoint(str(tmp_path), dtype="bfloat16")
    specs = by_name(A.model_param_specs(config))
    assert set(full) == set(specs)
    for name, spec in specs.items():
        assert full[name].dtype == spec.torch_dtype, name
    fp8 = "quantization_config" in cfg

    def part(name):  # an HF tensor as the engine sees it: FP8 dequantized, else in the loaded dtype
        return dequantize_fp8_blocks(hf[name], hf[name + "_scale_inv"]) if fp8 else hf[name].to(torch.bfloat16)

    def fused(name):
        return dequantize_fp8_blocks(full[name], full[name + "_scale_inv"]) if fp8 else full[name]
    m, p, names = _experts(cfg, moe_dims(cfg).sparse_layers[0])
    assert torch.equal(fused(p + "experts.w13_weight"),
                       torch.stack([torch.cat([part(g), part(u)]) for g, u, _ in names]))
    assert torch.equal(fused(p + "experts.w2_weight"), torch.stack([part(d) for _, _, d in names]))
    q = "model.layers.0.self_attn."
    if q + "fused_qkv_a_proj.weight" in specs:
        assert torch.equal(fused(q + "fused_qkv_a_proj.weight"),
                           torch.cat([part(q + "q_a_proj.weight"), part(q + "kv_a_proj_with_mqa.weight")]))
    if fp8:
        assert torch.equal(fused(q + "qkv_proj.weight"),
                           torch.cat([part(q + f"{x}_proj.weight") for x in "qkv"]))
