"""Per-rank programs (planning.program): what each rank executes is decided by the plan alone, so the two sides of
every message agree, scratch layouts fit, and the cost model counts what the programs do."""
import random

import numpy as np
import pytest

import amoeba_core as A
from amoeba_core.kv import KVLayout, KVRequest
from amoeba_core.planning.cost import Bandwidths, estimate, rank_costs
from amoeba_core.planning.kv_program import build_kv_program
from amoeba_core.planning.weight_program import build_weight_program
from amoeba_core.verify import random_sequences

from models import GQA

MODEL = dict(GQA, num_key_value_heads=4)


def plan_for(world, t0, t1, engine="vllm_flash_attn", order="NHD", fill=0.4, scratch=1 << 14, seed=0):
    layout = KVLayout(engine, order, 2, 4, 8, 4, "float32")
    seqs = random_sequences(world // t0, 40, fill, seed=seed)
    req = KVRequest(layout, 40, 40 * layout.block_bytes(t0) // layout.num_buffers,
                    tuple((i, s, tuple(t)) for i in seqs for s, t in seqs[i].items()))
    return A.plan_retp(A.TPConfig.contiguous(world, t0), t1, A.llama_param_specs(MODEL), kv=req,
                       scratch_bytes=scratch)


def message_sizes(rounds, rank, peer, direction):
    return [[m.nbytes for m in getattr(r, direction) if m.peer == peer] for r in rounds]


@pytest.mark.parametrize("seed", range(8))
def test_both_sides_of_every_message_agree(seed):
    """For every round and every pair of ranks, the sizes (and order) of what a sends b are what b receives from a,
    in the weight and in the KV programs: nothing left to convention between the two ranks."""
    rng = random.Random(seed)
    world = rng.choice([4, 8])
    t0, t1 = rng.choice([d for d in (1, 2, 4, 8) if world % d == 0]), rng.choice([d for d in (1, 2, 4) if world % d == 0])
    layout = rng.choice([("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "HND"), ("sglang", "NHD")])
    plan = plan_for(world, t0, t1, *layout, fill=rng.uniform(0.1, 0.3), scratch=rng.choice([1 << 13, 1 << 15]),
                    seed=seed)
    weights = [build_weight_program(plan, r) for r in range(world)]
    kv = [build_kv_program(plan, r) for r in range(world)]
    for a in range(world):
        for b in range(world):
            if a == b:
                continue
            assert message_sizes([w.round for w in weights[a].rounds], a, b, "sends") == \
                message_sizes([w.round for w in weights[b].rounds], b, a, "recvs"), (a, b)
            assert message_sizes(kv[a].rounds, a, b, "sends") == message_sizes(kv[b].rounds, b, a, "recvs"), (a, b)
    for r in range(world):
        assert kv[r].scratch_bytes <= plan.scratch_bytes and weights[r].scratch_bytes <= plan.scratch_bytes
        for rnd in kv[r].rounds:
            for m in rnd.sends + rnd.recvs:
                assert m.buffer == "scratch" and m.offset >= plan.kv.park_bytes
                assert m.offset + m.nbytes <= kv[r].scratch_bytes
    # The programs move exactly the plan's bytes.
    layers = plan.kv.layout.num_layers
    for r in range(world):
        assert sum(w.round.recv_bytes for w in weights[r].rounds) == plan.weight_bytes_received()[r]
        assert sum(x.recv_bytes for x in kv[r].rounds) * layers == plan.kv.received[r]


def test_transfers_table_behaves_like_a_list_of_records():
    plan = A.plan_retp(A.TPConfig.contiguous(4, 2), 1, A.llama_param_specs(MODEL), scratch_bytes=1 << 12)
    t = plan.transfers
    records = list(t)
    assert len(records) == len(t) > 0 and records[0].tensor == int(t.tensor[0])
    assert all(isinstance(r.direct, bool) for r in records)
    a, b = plan.rounds[0]
    assert len(t[a:b]) == b - a and sum(r.nbytes for r in records) == plan.weight_bytes_moved
    assert np.array_equal(plan.pair_bytes().sum(0), plan.weight_bytes_received())


def test_weight_rounds_group_small_tensors():
    """Several small tensors share a round (not one allocating tensor per round), within the in-flight cap: the new
    shards a rank allocates in one round add up to at most its largest new shard."""
    plan = A.plan_retp(A.TPConfig.contiguous(4, 2), 1, A.llama_param_specs(MODEL))
    allocating = {tp.index for tp in plan.tensors if "alloc" in tp.mode.values()}
    assert len(plan.rounds) < len(allocating)
    for r in range(4):
        cap = plan.largest_new_shard_bytes(r)
        for a, b in plan.rounds:
            touched = {t.tensor for t in plan.transfers[a:b] if r in (t.src, t.dst)}
            assert sum(plan.tensors[k].new_nbytes for k in touched if plan.tensors[k].mode[r] == "alloc") <= cap


def test_cost_model_counts_the_programs_work():
    plan = plan_for(4, 1, 4)
    slow = estimate(plan, Bandwidths(1e8, 1e9))
    fast = estimate(plan, Bandwidths(1e9, 1e10))
    assert slow.seconds > fast.seconds > 0
    for c in slow.ranks:
        assert c.bytes_received == plan.weight_bytes_received()[c.rank] + plan.kv.received[c.rank]
        assert c.exchanges > 0 and c.bytes_copied > 0
    assert "predicted" in slow.summary()


def _calibrate(rank, world):
    import dataclasses
    from amoeba_core.planning.cost import calibrate
    return dataclasses.asdict(calibrate(None, "cpu", nbytes=1 << 20, repeats=1))


def test_calibration_measures_the_group(pools):
    """Every rank gets the same, plausible figures (the slowest rank's view)."""
    results = pools(4).run(_calibrate)
    assert all(r == results[0] for r in results)
    bw = results[0]
    assert 1e6 < bw["link_bytes_per_s"] < 1e12 and 1e7 < bw["copy_bytes_per_s"] < 1e13
    assert 0 < bw["round_s"] < 1 and 0 < bw["call_s"] < 5
    assert 0 < bw["kv_move_s"] < 1e-2 and bw["page_move_bytes_per_s"] > 0


def test_cost_model_counts_page_moves_of_a_merge_compaction():
    """A merge compacts fused column weights in place: the cost model counts the moved bytes (runs that stay put
    cost nothing) once, split into pages the CPU executor remaps and bytes it copies, and prices the page moves at
    their own speed (copied like the rest when that speed is unknown)."""
    dims = dict(MODEL, hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8)
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, A.llama_param_specs(dims))
    for r in range(4):
        [weights] = rank_costs(plan, r)
        assert weights.bytes_page_moved > 0    # gate_up's second half moves down by whole pages (>= 1 MiB)
        assert weights.bytes_copied + weights.bytes_page_moved == plan.local_relocation_bytes(r)
    copy_only = estimate(plan, Bandwidths(1e9, 1e9))
    remapping = estimate(plan, Bandwidths(1e9, 1e9, page_move_bytes_per_s=1e11))
    assert remapping.seconds < copy_only.seconds
    assert copy_only.seconds == pytest.approx(max(plan.local_relocation_bytes(r) for r in range(4)) / 1e9)


def test_cost_model_charges_host_work_per_kv_block_move():
    plan = plan_for(4, 1, 4)
    base = estimate(plan, Bandwidths(1e9, 1e10))
    with_kv = estimate(plan, Bandwidths(1e9, 1e10, kv_move_s=1e-6))
    assert with_kv.seconds == pytest.approx(base.seconds + 1e-6 * plan.kv.num_moves)
