"""Layout math: shard() returns exactly what a vLLM-style engine loads at each TP degree."""
import pytest
import torch

import amoeba_core as A
from amoeba_core.errors import InvalidDegreeError, SpecMismatchError
from amoeba_core.layout import specs as S
from amoeba_core.layout.overlap import shard_pieces

from models import GQA, QWEN2, UNEVEN


def arange(shape, dtype=torch.float32):
    return torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(dtype)


def test_column_parallel_splits_rows_and_bias():
    w = arange((8, 3))
    spec = S.column("w", (8, 3), "float32")
    assert torch.equal(A.shard(w, spec, 1, 4), w[2:4])
    b = arange((8,))
    assert torch.equal(A.shard(b, S.column("b", (8,), "float32"), 3, 4), b[6:8])


def test_row_parallel_splits_input_columns():
    w = arange((3, 8))
    assert torch.equal(A.shard(w, S.row("w", (3, 8), "float32"), 1, 2), w[:, 4:])


def test_merged_column_splits_each_part_then_stacks():
    w = arange((8, 2))  # gate rows 0..3, up rows 4..7
    spec = S.merged_column("gate_up", (8, 2), "float32", (4, 4))
    assert torch.equal(A.shard(w, spec, 1, 2), torch.cat([w[2:4], w[6:8]]))


def test_qkv_gqa_shards_heads_and_replicates_kv_past_num_kv_heads():
    hq, hkv, d = 8, 2, 2
    w = arange(((hq + 2 * hkv) * d, 3))
    spec = S.qkv("qkv", tuple(w.shape), "float32", hq, hkv, d)
    q, k, v = w[:hq * d], w[hq * d:(hq + hkv) * d], w[(hq + hkv) * d:]
    # degree 2 <= 2 KV heads: one KV head each.
    assert torch.equal(A.shard(w, spec, 1, 2), torch.cat([q[8:16], k[2:4], v[2:4]]))
    # degree 8 > 2 KV heads: rank r holds KV head r // 4, so query group and KV head stay together.
    for r in range(8):
        j = r // 4
        assert torch.equal(A.shard(w, spec, r, 8), torch.cat([q[2 * r:2 * r + 2], k[2 * j:2 * j + 2],
                                                             v[2 * j:2 * j + 2]]))


def test_vocab_parallel_pads_to_multiple_of_64_with_zero_rows():
    w = arange((100, 2)) + 1
    spec = S.vocab("embed", (100, 2), "float32")
    assert spec.padded_split_size == 128
    last = A.shard(w, spec, 3, 4)  # ids [96, 128): 4 real rows, 28 zero rows
    assert last.shape == (32, 2)
    assert torch.equal(last[:4], w[96:100]) and not last[4:].any()
    assert torch.equal(A.shard(w, spec, 0, 4), w[:32])


def test_llama_specs_names_shapes_and_fused_modules():
    specs = {s.name: s for s in A.llama_param_specs(GQA)}
    assert specs["model.layers.0.self_attn.qkv_proj.weight"].shape == ((8 + 2 * 2) * 8, 64)
    assert specs["model.layers.1.mlp.gate_up_proj.weight"].shape == (192, 64)
    assert specs["model.layers.1.mlp.down_proj.weight"].kind == S.ROW
    assert specs["lm_head.weight"].kind == S.VOCAB and specs["model.norm.weight"].kind == S.REPLICATED
    assert "model.layers.0.self_attn.qkv_proj.bias" not in specs
    unfused = {s.name for s in A.llama_param_specs(GQA, fused=False)}
    assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= unfused


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    names = {s.name for s in A.llama_param_specs(QWEN2)}
    assert "model.layers.0.self_attn.qkv_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names


def test_unfused_and_fused_shards_agree():
    """A fused qkv shard is the concatenation of the unfused q/k/v shards, at every degree (vLLM loads it so)."""
    fused = {s.name: s for s in A.llama_param_specs(GQA)}
    unfused = {s.name: s for s in A.llama_param_specs(GQA, fused=False)}
    p = "model.layers.0.self_attn."
    from amoeba_core.verify import full_tensor
    parts = [full_tensor(unfused[p + f"{x}_proj.weight"]) for x in "qkv"]
    full = torch.cat(parts)
    for degree in (1, 2, 4, 8):
        for r in range(degree):
            want = torch.cat([A.shard(t, unfused[p + f"{x}_proj.weight"], r, degree) for t, x in zip(parts, "qkv")])
            assert torch.equal(A.shard(full, fused[p + "qkv_proj.weight"], r, degree), want)


@pytest.mark.parametrize("degree, tensor, section", [
    (8, "model.layers.0.self_attn.qkv_proj.weight", "'q' (12 units"),   # 12 heads
    (8, "model.layers.0.mlp.gate_up_proj.weight", "'gate' (100 elements"),
    (8, "model.layers.0.mlp.down_proj.weight", "'in' (100 elements"),
    (3, "model.embed_tokens.weight", "'vocab' (1024 elements"),          # 1000 padded to 1024
])
def test_degrees_that_do_not_divide_raise_naming_tensor_and_sizes(degree, tensor, section):
    spec = {s.name: s for s in A.llama_param_specs(UNEVEN)}[tensor]
    with pytest.raises(InvalidDegreeError) as e:
        spec.check_degree(degree)
    assert tensor in str(e.value) and f"degree {degree}" in str(e.value) and section in str(e.value)
    spec.check_degree(4)


def test_kv_replication_needs_a_multiple_of_num_kv_heads():
    spec = S.qkv("qkv", ((6 + 2 * 3) * 2, 4), "float32", 6, 3, 2)
    spec.check_degree(6)
    with pytest.raises(InvalidDegreeError, match="multiple"):
        S.kv_heads("k", (3 * 2, 4), "float32", 3, 2).check_degree(4)


def test_shard_rejects_wrong_shape_and_dtype():
    spec = S.column("w", (8, 3), "float32")
    with pytest.raises(SpecMismatchError, match=r"\(8, 4\)"):
        A.shard(torch.zeros(8, 4), spec, 0, 2)
    with pytest.raises(SpecMismatchError, match="float16"):
        A.shard(torch.zeros(8, 3, dtype=torch.float16), spec, 0, 2)


def test_pieces_are_the_finest_common_split():
    spec = S.qkv("qkv", ((8 + 4) * 2, 3), "float32", 8, 2, 2)
    pieces = shard_pieces(spec, 2, 0, 1)  # new TP1 shard = everything, cut where the old TP2 shards meet
    assert [(p.new_start, p.length, p.holders) for p in pieces] == [
        (0, 8, ((0, 0),)), (8, 8, ((1, 0),)), (16, 2, ((0, 8),)), (18, 2, ((1, 8),)), (20, 2, ((0, 10),)),
        (22, 2, ((1, 10),))]


@pytest.mark.parametrize("degree", [1, 2, 4, 8])
def test_unshard_inverts_shard(degree):
    from amoeba_core.layout import unshard
    from amoeba_core.verify import full_tensor
    for spec in A.llama_param_specs(GQA):
        full = full_tensor(spec)
        assert torch.equal(unshard([A.shard(full, spec, r, degree) for r in range(degree)], spec, degree), full)
