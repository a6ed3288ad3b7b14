"""retp for every newer family on 4 CPU ranks: weights (MoE experts, q/k norms, MLA projections, FP8 weights with
their block scales) and the MLA latent KV cache end bit-exact, moving exactly the independent minimum."""
import pytest

import amoeba_core as A
from amoeba_core.kv import KVLayout
from amoeba_core.verify import kv_min_bytes, weight_min_bytes

import family_models as M
import kv_fns
import rank_fns

pytestmark = pytest.mark.timeout(240)
DEGREES = (1, 2, 4)
WEIGHT_CASES = {"mixtral": M.MIXTRAL, "qwen2_moe": M.QWEN2_MOE, "qwen3_moe": M.QWEN3_MOE, "qwen3": M.QWEN3,
                "deepseek_v2": M.DEEPSEEK_V2, "fp8_qwen3_moe": M.FP8_QWEN3_MOE}


def check_weights(pool, specs, old, new_degree, scratch_bytes):
    results = pool.run(rank_fns.retp_weights_and_check, specs, old, new_degree, scratch_bytes)
    for rank, r in enumerate(results):
        assert r["bad"] == [], f"rank {rank}: tensors differ from shard(): {r['bad'][:5]}"
        assert r["received"] == r["planned_received"] and r["sent"] == r["planned_sent"]
        assert r["peak"] <= r["largest"] + scratch_bytes
    return sum(r["received"] for r in results)


@pytest.mark.parametrize("family", sorted(WEIGHT_CASES))
def test_weights_every_transition_bit_exact_and_minimal(pools, family):
    specs = A.model_param_specs(WEIGHT_CASES[family])
    for t0 in DEGREES:
        for t1 in DEGREES:
            old = A.TPConfig.contiguous(4, t0)
            moved = check_weights(pools(4), specs, old, t1, scratch_bytes=1 << 16)
            assert moved == weight_min_bytes(specs, old.slots, t1), (t0, t1)


def test_fp8_weights_and_scales_move_together_from_a_scattered_placement(pools):
    """A non-contiguous starting placement and a scratch budget smaller than one expert tensor."""
    specs = A.model_param_specs(M.FP8_QWEN3_MOE)
    old = A.TPConfig.from_instances([[0, 2], [3, 1]])
    for t1 in (4, 1):
        moved = check_weights(pools(4), specs, old, t1, scratch_bytes=8192)
        assert moved == weight_min_bytes(specs, old.slots, t1)


def test_fp8_degree_that_cuts_a_block_fails_on_every_rank_before_anything_moves(pools):
    """Experts of intermediate size 256 at degree 4 would hold 64 rows of each 128-row block of w13: every rank
    raises InvalidDegreeError naming that tensor, and no weight changed. (Unquantized, degree 4 is fine.)"""
    cfg = dict(M.FP8_QWEN3_MOE, moe_intermediate_size=256)
    specs = A.model_param_specs(cfg)
    A.plan_retp(A.TPConfig.contiguous(4, 1), 4, A.model_param_specs(cfg, quantized=False))
    old = A.TPConfig.contiguous(4, 1)
    for kind, msg, unchanged in pools(4).run(rank_fns.retp_expect_error, [specs] * 4, [old] * 4, [4] * 4):
        assert kind == "InvalidDegreeError", msg
        assert "model.layers.0.mlp.experts.w13_weight" in msg and "quantization block of 128" in msg, msg
        assert unchanged


# ---- the MLA latent cache ------------------------------------------------------------------------------------
SMALL_ALLOWANCE = 4 << 20  # the interpreter's own allocations, which these tiny pools do not dwarf
MLA = KVLayout.mla(num_layers=2, kv_lora_rank=32, rope_dim=8, block_size=4, dtype="float32")


def run_mla(pool, old, new_degree, sequences, num_blocks, scratch=1 << 14):
    specs = A.model_param_specs(M.DEEPSEEK_V2)
    results = pool.run(kv_fns.kv_transition, None, MLA, num_blocks, old, new_degree, sequences, scratch, specs=specs)
    for rank, r in enumerate(results):
        assert r["bad_kv"] == [], f"rank {rank}: blocks differ (seq, position, layer): {r['bad_kv'][:5]}"
        assert r["bad_w"] == [], f"rank {rank}: weights differ: {r['bad_w'][:5]}"
        assert r["kv_received"] == r["kv_planned"] and r["in_place"]
        assert r["kv_measured"] <= scratch + SMALL_ALLOWANCE, r["kv_measured"]
        assert r["num_blocks"] == num_blocks  # the latent does not shrink with the degree: same blocks per rank
    return results


def test_mla_layout_is_one_latent_on_every_rank():
    assert MLA.logical_shape(10, 4) == (10, 4, 40)
    assert [MLA.head_range(r, 4) for r in range(4)] == [(0, 1)] * 4
    assert MLA.block_bytes(1) == MLA.block_bytes(4) == 4 * 40 * 4
    with pytest.raises(A.ConfigError):
        KVLayout("vllm_mla", "NHD", 2, 2, 40, 4, "float32")


@pytest.mark.parametrize("t0, t1", [(t0, t1) for t0 in DEGREES for t1 in DEGREES])
def test_mla_every_transition_world_4(pools, t0, t1):
    """Merges replicate: every rank of a merged instance receives the other old instances' blocks of its sequences
    (each rank of the old instance keeps its own). Splits de-duplicate: each new instance's ranks already hold a
    copy, nothing moves. Bytes moved = the exhaustive minimum and the closed form."""
    num_blocks = 48
    merging = max(1, t1 // t0)  # old instances per new instance
    seqs = kv_fns.make_sequences(4 // t0, num_blocks, 0.8 / merging, seed=10 * t0 + t1)
    old = A.TPConfig.contiguous(4, t0)
    results = run_mla(pools(4), old, t1, seqs, num_blocks)
    moved = sum(r["kv_received"] for r in results)
    flat = {s: (i, t) for i in seqs for s, t in seqs[i].items()}
    assert moved == kv_min_bytes(MLA, old.slots, t1, flat, results[0]["destinations"])
    block_bytes = MLA.block_bytes(1) * MLA.num_layers
    live = [len({b for t in seqs[i].values() for b in t}) for i in seqs]
    if t1 > t0:  # the t0 ranks of old instance i in new instance g need the live blocks of g's other instances
        want = sum(t0 * (sum(live[g * merging:(g + 1) * merging]) - live[i])
                   for g in range(4 // t1) for i in range(g * merging, (g + 1) * merging))
        assert moved == want * block_bytes
    else:
        assert moved == 0


def test_mla_small_scratch_parks_and_rounds(pools):
    seqs = kv_fns.make_sequences(2, 40, 0.4, seed=5)
    results = run_mla(pools(4), A.TPConfig.contiguous(4, 2), 4, seqs, 40, scratch=4096)
    assert results[0]["rounds"] > 1
