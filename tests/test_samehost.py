"""The same-host transport (transport.samehost): every rank pulls what it receives straight from its peers' memory.

Specified here: the pull engine copies exactly the boxes across processes and fails cleanly when the peer is gone;
pull programs read every byte the plan moves exactly once, and every rank waits for exactly the peers that read
its memory; retp over it is bit-for-bit what retp over torch.distributed gives, counts per peer what the plan
says, and stages nothing where nothing needs staging. The rest of the suite runs through it too (it is the default
on one host; `pytest --transport torch` runs everything over gloo instead)."""
import multiprocessing as mp
import os
import random

import numpy as np
import pytest
import torch

import amoeba_core as A
from amoeba_core import _C
from amoeba_core.execution.copy import copy_boxes, make_boxes
from amoeba_core.kv import KVLayout
from amoeba_core.planning.kv_program import build_kv_program
from amoeba_core.planning.weight_program import build_weight_program
from amoeba_core.verify import random_sequences

import samehost_fns
from models import GQA
from test_programs import plan_for

MODEL = dict(GQA, num_key_value_heads=4)


# ---- the pull engine, between two processes ------------------------------------------------------------------
def _hold_buffer(conn, nbytes, seed):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    counter = np.array([41], dtype=np.int64)
    conn.send((os.getpid(), data.data_ptr(), counter.ctypes.data))
    conn.recv()  # hold the memory until told to exit


@pytest.fixture(scope="module")
def peer():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    nbytes, seed = 1 << 20, 7
    proc = ctx.Process(target=_hold_buffer, args=(child, nbytes, seed), daemon=True)
    proc.start()
    pid, address, counter = parent.recv()
    expected = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    yield {"pid": pid, "address": address, "counter": counter, "nbytes": nbytes, "data": expected, "proc": proc,
           "conn": parent}
    if proc.is_alive():
        parent.send("exit")
        proc.join(10)


def _random_boxes(rng: random.Random, nbytes: int, n: int) -> np.ndarray:
    """Non-overlapping destinations (each box in its own slice of the destination), any sources."""
    rows, slice_bytes = [], nbytes // n
    for k in range(n):
        run = rng.choice([1, 3, 64, 500, 1024, 4096, 9000])
        count = rng.randint(1, max(1, min(40, slice_bytes // max(run, 1))))
        d_stride = run if count == 1 else rng.randint(run, slice_bytes // count)
        s_stride = rng.randint(run, max(run, (nbytes - run) // max(1, count)))
        if run * count > slice_bytes or s_stride * (count - 1) + run > nbytes:
            continue
        src = rng.randint(0, nbytes - (s_stride * (count - 1) + run))
        rows.append(make_boxes(src, k * slice_bytes, run, count, s_stride, d_stride))
    return np.concatenate(rows)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threads", [1, 2])
def test_pull_copies_exactly_the_boxes_from_another_process(peer, seed, threads):
    rng = random.Random(seed)
    boxes = _random_boxes(rng, peer["nbytes"], rng.choice([1, 8, 60]))
    got = torch.full((peer["nbytes"],), 0xAB, dtype=torch.uint8)
    expected = got.clone()
    copy_boxes(expected, peer["data"], boxes)  # the local box engine on a copy of the peer's bytes
    n = _C.pull_boxes(peer["pid"], peer["address"], peer["nbytes"], got.data_ptr(), got.numel(), boxes, threads)
    assert n == int((boxes[:, 2] * boxes[:, 3]).sum())
    assert torch.equal(got, expected)


def test_pull_rejects_boxes_outside_either_buffer(peer):
    local = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError):
        _C.pull_boxes(peer["pid"], peer["address"], peer["nbytes"], local.data_ptr(), local.numel(),
                      make_boxes(0, 1000, 100), 1)
    with pytest.raises(ValueError):
        _C.pull_boxes(peer["pid"], peer["address"], peer["nbytes"], local.data_ptr(), local.numel(),
                      make_boxes(peer["nbytes"] - 10, 0, 100), 1)


def test_a_gone_peer_raises_pull_error_not_a_hang(peer):
    assert _C.peek_int64(peer["pid"], peer["counter"]) == 41
    peer["conn"].send("exit")
    peer["proc"].join(10)
    local = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(_C.PullError, match="gone"):
        _C.pull_boxes(peer["pid"], peer["address"], peer["nbytes"], local.data_ptr(), 64, make_boxes(0, 0, 64), 1)
    with pytest.raises(_C.PullError):
        _C.peek_int64(peer["pid"], peer["counter"])


# ---- pull programs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_pull_programs_read_each_planned_byte_once_and_wait_for_exactly_their_readers(seed):
    rng = random.Random(seed)
    world = rng.choice([4, 8])
    t0 = rng.choice([d for d in (1, 2, 4, 8) if world % d == 0])
    t1 = rng.choice([d for d in (1, 2, 4) if world % d == 0])
    layout = rng.choice([("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "HND"), ("sglang", "NHD")])
    plan = plan_for(world, t0, t1, *layout, fill=rng.uniform(0.1, 0.4), scratch=rng.choice([1 << 12, 1 << 15]),
                    seed=seed)
    layers = plan.kv.layout.num_layers
    weights = [build_weight_program(plan, r, pull=True) for r in range(world)]
    kv = [build_kv_program(plan, r, pull=True) for r in range(world)]
    pulled = np.zeros((world, world), dtype=np.int64)  # [src, dst]
    for r in range(world):
        assert weights[r].scratch_bytes == 0, "weight pulls go straight from the old shard to the new one"
        torch_kv = build_kv_program(plan, r)
        assert kv[r].scratch_bytes <= torch_kv.scratch_bytes
        for rounds, times in (([w.round for w in weights[r].rounds], 1), (kv[r].rounds, layers)):
            for rnd in rounds:
                assert not rnd.sends and not rnd.recvs
                for p in rnd.pulls:
                    pulled[p.peer, r] += p.nbytes * times
    assert np.array_equal(pulled, plan.pair_bytes()), "pulls must read exactly the plan's bytes per pair"
    for programs in ([[w.round for w in weights[r].rounds] for r in range(world)], [kv[r].rounds for r in range(world)]):
        assert len({len(p) for p in programs}) == 1, "every rank passes every round"
        for g in range(len(programs[0])):
            for lender in range(world):
                readers = {r for r in range(world) if any(p.peer == lender for p in programs[r][g].pulls)}
                assert set(programs[lender][g].readers) == readers, (g, lender)
                lent = sum(p.nbytes for r in range(world) for p in programs[r][g].pulls if p.peer == lender)
                assert programs[lender][g].lent_bytes == lent


# ---- retp over it ----------------------------------------------------------------------------------------------
LAYOUTS = [("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "HND"), ("sglang", "NHD"), ("vllm_mla", "NHD")]


def _layout(engine, order, layers=2):
    heads = 1 if engine == "vllm_mla" else MODEL["num_key_value_heads"]
    return KVLayout(engine, order, layers, heads, 8, 4, "float32")


@pytest.mark.parametrize("engine, order", LAYOUTS)
@pytest.mark.parametrize("old_degree, new_degree", [(1, 4), (4, 1), (2, 4), (4, 2), (2, 1)])
def test_samehost_and_torch_give_the_same_bytes(pools, engine, order, old_degree, new_degree):
    """The mixed run: the same transition forced through torch.distributed and through the same-host transport
    leaves identical weights, KV buffers and block tables on every rank, and each counts what the plan says per
    peer."""
    world = 4
    layout = _layout(engine, order)
    old = A.TPConfig.contiguous(world, old_degree)
    sequences = random_sequences(world // old_degree, 24, 0.2, seed=old_degree * 10 + new_degree)
    specs = A.llama_param_specs(MODEL)
    runs = {t: pools(world).run(samehost_fns.transition, specs, layout, 24, old, new_degree, sequences, t)
            for t in ("torch", "samehost")}
    for rank in range(world):
        a, b = runs["torch"][rank], runs["samehost"][rank]
        assert (a["transport"], b["transport"]) == ("torch", "samehost")
        assert a["weights"] == b["weights"] and a["kv"] == b["kv"] and a["tables"] == b["tables"], rank
        for r in (a, b):
            assert r["received_from"] == r["planned_from"] and r["received"] == sum(r["planned_from"])


def test_samehost_stages_nothing_for_weights(pools):
    """A split moves weights only: over the same-host transport no scratch is laid out or allocated (the bound
    is the largest new shard alone), while torch.distributed stages strided transfers through scratch."""
    world = 4
    old = A.TPConfig.contiguous(world, 4)
    specs = A.llama_param_specs(MODEL)
    runs = {t: pools(world).run(samehost_fns.transition, specs, None, 0, old, 1, None, t, with_kv=False)
            for t in ("torch", "samehost")}
    for a, b in zip(runs["torch"], runs["samehost"]):
        assert a["weights"] == b["weights"]
        assert b["scratch_allocated"] == 0 and b["memory_bound"] == b["largest_new_shard"]
        assert a["scratch_allocated"] > 0
    assert sum(r["received"] for r in runs["samehost"]) == sum(r["received"] for r in runs["torch"]) > 0


def test_auto_picks_samehost_on_one_host(pools):
    res = pools(2).run(samehost_fns.host_identity_differs, "auto")
    # rank 1 pretends to be elsewhere: auto falls back to torch.distributed, on both ranks
    assert res == [("ok", "torch"), ("ok", "torch")]


def test_samehost_is_refused_across_hosts_before_anything_moves(pools):
    for kind, message in pools(2).run(samehost_fns.host_identity_differs, "samehost"):
        assert kind == "ConfigError" and "one host" in message and "ranks [1]" in message


def test_an_unknown_transport_is_a_config_error_on_every_rank(pools):
    config = A.TPConfig.contiguous(2, 1)
    specs = A.llama_param_specs(MODEL)
    results = pools(2).run(_call_with_transport, specs, config, "carrier-pigeon")
    assert all(kind == "ConfigError" and "transport must be one of" in msg for kind, msg in results), results


def _call_with_transport(rank, world, specs, config, transport):
    import rank_fns
    weights = rank_fns.local_shards(specs, config, rank)
    try:
        A.retp(None, 2, config=config, specs=specs, weights=weights, transport=transport)
        return "ok", ""
    except A.AmoebaError as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("old_degree, new_degree", [(1, 2), (2, 1), (4, 2)])
def test_a_slow_reader_is_waited_for_before_its_bytes_are_overwritten(pools, old_degree, new_degree):
    """In-place safety with pulls: a rank that reads late (here: 20 ms before each pull) still reads the old
    bytes, because its lenders wait for it before writing (small scratch: many rounds, blocks reused in place)."""
    world = 4
    layout = _layout("vllm_flash_attn", "NHD")
    old = A.TPConfig.contiguous(world, old_degree)
    sequences = random_sequences(world // old_degree, 24, 0.8 if new_degree > old_degree else 0.3, seed=3)
    specs = A.llama_param_specs(MODEL)
    ref = pools(world).run(samehost_fns.transition, specs, layout, 24, old, new_degree, sequences, "torch",
                           scratch_bytes=1 << 11)
    slow = pools(world).run(samehost_fns.slow_reader_transition, specs, layout, 24, old, new_degree, sequences, 1,
                            0.02)
    for a, b in zip(ref, slow):
        assert a["weights"] == b["weights"] and a["kv"] == b["kv"]
