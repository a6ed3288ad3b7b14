"""Destinations that mean something before the placement (labels, WithSequence, OnRanks, WithRanksOf) and cached
blocks (a prefix cache) in the pure plan: constraints hold, the bytes moved are the exhaustive minimum among the
placements that satisfy them, and every cached block survives once per new instance."""
import itertools
import random

import numpy as np
import pytest

import amoeba_core as A
from amoeba_core.errors import CapacityError, ConfigError
from amoeba_core.kv import KVLayout, KVRequest, OnRanks, WithRanksOf, WithSequence
from amoeba_core.verify import kv_min_bytes, random_sequences

from models import GQA

MODEL = dict(GQA, num_key_value_heads=4)
SPECS = A.llama_param_specs(MODEL)
LAYOUT = KVLayout("vllm_flashinfer", "HND", 2, 4, 8, 4, "float32")
NUM_BLOCKS = 32


def request(tables, old_degree, destinations=None, cached=None, cached_destinations=None, num_blocks=NUM_BLOCKS):
    """tables: instance -> {seq: table}; cached: instance -> {key: block}."""
    seqs = tuple((i, s, tuple(t)) for i in sorted(tables) for s, t in tables[i].items())
    cached = tuple((i, k, b) for i in sorted(cached or {}) for k, b in cached[i].items())
    return KVRequest(LAYOUT, num_blocks, num_blocks * LAYOUT.region_bytes(old_degree) * LAYOUT.regions_per_buffer,
                     seqs, dict(destinations or {}), cached=cached, cached_destinations=dict(cached_destinations or {}))


def ranks_of(plan, label):
    return set(plan.new.instances()[label])


def admissible(world, new_degree, rules):
    """(world, world) bool: group rank g may take new slot s, written from the constraint definitions: rules are
    (label, rank set); the ranks of `label` contain the set (at most new_degree ranks) or lie within it (more)."""
    ok = np.ones((world, world), dtype=bool)
    for label, ranks in rules:
        for g in range(world):
            for s in range(world):
                inside = s // new_degree == label
                if len(ranks) <= new_degree and g in ranks and not inside:
                    ok[g, s] = False
                if len(ranks) >= new_degree and g not in ranks and inside:
                    ok[g, s] = False
    return ok


def minimum(plan, tables, rules=(), cached_moves=True):
    """The independent exhaustive KV minimum for the plan's destinations, with its surviving cached blocks as
    one-block sequences, among placements that satisfy `rules`."""
    seqs = {s: (i, t) for i in tables for s, t in tables[i].items()}
    dests = dict(plan.kv.destinations)
    if cached_moves:
        for i, key, b, d in plan.kv.cached:
            seqs[("cached", i, key, d)] = (i, [b])
            dests[("cached", i, key, d)] = d
    world = plan.world_size
    return kv_min_bytes(LAYOUT, plan.old.slots, plan.new.degree, seqs, dests,
                        admissible(world, plan.new.degree, rules) if rules else None)


# ---- labels and WithSequence -----------------------------------------------------------------------------------
def test_with_sequence_joins_a_sequence_of_another_instance():
    tables = random_sequences(4, NUM_BLOCKS, 0.3, seed=1)  # 4 x TP1 -> 2 x TP2
    a = next(iter(tables[0]))
    b = next(iter(tables[3]))
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS,
                       kv=request(tables, 1, {b: WithSequence(a)}))
    assert plan.kv.destinations[a] == plan.kv.destinations[b]
    assert plan.kv_bytes_moved == minimum(plan, tables)


def test_a_chain_of_with_sequence_follows_its_labelled_end():
    tables = {0: {"x": [1]}, 1: {"y": [2]}, 2: {"z": [3]}, 3: {"w": [4]}}
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS,
                       kv=request(tables, 1, {"x": WithSequence("y"), "y": WithSequence("w"), "w": 0}))
    assert plan.kv.destinations["x"] == plan.kv.destinations["y"] == plan.kv.destinations["w"] == 0


def test_a_cycle_of_with_sequence_is_one_unit_with_the_default_destination():
    tables = {0: {"x": [1]}, 1: {"y": [2]}, 2: {"z": [3]}, 3: {"w": [4]}}
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS,
                       kv=request(tables, 1, {"x": WithSequence("z"), "z": WithSequence("x")}))
    assert plan.kv.destinations["x"] == plan.kv.destinations["z"]


@pytest.mark.parametrize("dests, message", [
    ({"x": WithSequence("nope")}, "names no live sequence"),
    ({"x": 0, "v": 1}, "unknown sequences"),
    ({"x": 5}, "outside"),
    ({"x": OnRanks([7])}, "outside"),
    ({"x": WithRanksOf(9)}, "names no old instance"),
])
def test_bad_destinations_raise_config_errors(dests, message):
    tables = {0: {"x": [1]}, 1: {"y": [2]}, 2: {"z": [3]}, 3: {"w": [4]}}
    with pytest.raises(ConfigError, match=message):
        A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=request(tables, 1, dests))


# ---- rank constraints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t0, t1", [(1, 2), (1, 4), (2, 4), (2, 1), (4, 1), (4, 2)])
def test_on_ranks_is_honoured_at_the_minimum_bytes(t0, t1):
    """A sequence pinned to a rank set: its new instance contains the set (small sets) or lies within it (large
    ones), and no placement satisfying that moves fewer KV bytes for the same destinations."""
    world = 4
    rng = random.Random(t0 * 10 + t1)
    tables = random_sequences(world // t0, NUM_BLOCKS, 0.3, seed=t0 * 7 + t1)
    for size in sorted({1, t1, min(world, t1 + 1)}):
        ranks = set(rng.sample(range(world), size))
        inst = rng.randrange(world // t0)
        seq = next(iter(tables[inst]))
        plan = A.plan_retp(A.TPConfig.contiguous(world, t0), t1, SPECS,
                           kv=request(tables, t0, {seq: OnRanks(ranks)}))
        label = plan.kv.destinations[seq]
        got = ranks_of(plan, label)
        assert (ranks <= got) if size <= t1 else (got <= ranks), (ranks, got)
        assert plan.kv_bytes_moved == minimum(plan, tables, [(label, ranks)]), (size, ranks)


def test_with_ranks_of_keeps_a_sequence_on_the_gpus_of_its_old_instance_in_a_split():
    """1 x TP4 -> 4 x TP1: every sequence may go anywhere; WithRanksOf(0) is trivial, OnRanks({2}) is not."""
    tables = {0: {"a": [1, 2], "b": [3], "c": [4, 5, 6]}}
    plan = A.plan_retp(A.TPConfig.contiguous(4, 4), 1, SPECS,
                       kv=request(tables, 4, {"a": OnRanks({2}), "c": WithRanksOf(0)}))
    assert ranks_of(plan, plan.kv.destinations["a"]) == {2}


def test_with_ranks_of_merges_a_chosen_pair():
    """4 x TP1 -> 2 x TP2: by default instances 0+1 and 2+3 merge; WithRanksOf(3) on instance 0's sequence puts it
    into the instance that contains rank 3."""
    tables = random_sequences(4, NUM_BLOCKS, 0.3, seed=5)
    seq = next(iter(tables[0]))
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=request(tables, 1, {seq: WithRanksOf(3)}))
    label = plan.kv.destinations[seq]
    assert 3 in ranks_of(plan, label)
    assert plan.kv_bytes_moved == minimum(plan, tables, [(label, {3})])


def test_unsatisfiable_constraints_raise_before_planning_moves():
    tables = {0: {"a": [1]}, 1: {"b": [2]}, 2: {"c": [3]}, 3: {"d": [4]}}
    # At degree 2, {0, 1} and {0, 2} cannot both be instances: labelled apart, no placement exists...
    req = request(tables, 1, {"a": 0, "b": 1, "c": WithSequence("a"), "d": WithSequence("b")})
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req)  # (labels alone are fine)
    req = request(tables, 1, {"a": OnRanks({0, 1}), "b": OnRanks({0, 2})})
    with pytest.raises(ConfigError, match="no new instance can satisfy"):
        A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req)
    # ... and three single ranks cannot share one instance of two.
    req = request(tables, 1, {"a": OnRanks({0}), "b": OnRanks({1}), "c": OnRanks({2}), "d": OnRanks({3})})
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req)
    for s, g in zip("abcd", range(4)):
        assert g in ranks_of(plan, plan.kv.destinations[s])
    req = request(tables, 1, {"a": OnRanks({0, 1, 2})} | {"b": WithSequence("a")})
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req)
    assert ranks_of(plan, plan.kv.destinations["a"]) <= {0, 1, 2}


def test_a_pinned_placement_must_satisfy_the_constraints():
    tables = {0: {"a": [1]}, 1: {"b": [2]}, 2: {"c": [3]}, 3: {"d": [4]}}
    req = request(tables, 1, {"a": OnRanks({0, 3})})
    good = A.TPConfig.from_instances([[0, 3], [1, 2]])
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req, placement=good)
    assert plan.new == good
    with pytest.raises(ConfigError, match="pinned placement"):
        A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=req, placement=A.TPConfig.contiguous(4, 2))


def test_random_constraints_world_4():
    """Random mixes of labels, WithSequence and rank sets: every constraint holds, the minimum is reached."""
    rng = random.Random(0)
    checked = binding = 0
    for trial in range(60):
        t0, t1 = rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
        tables = random_sequences(4 // t0, NUM_BLOCKS, 0.25, seed=trial)
        ids = [s for i in tables for s in tables[i]]
        dests, rules = {}, []
        for s in rng.sample(ids, min(len(ids), 3)):
            kind = rng.choice(["label", "with", "ranks", "ranks"])
            if kind == "label":
                dests[s] = rng.randrange(4 // t1)
            elif kind == "with":
                dests[s] = WithSequence(rng.choice(ids))
            else:
                dests[s] = OnRanks(rng.sample(range(4), rng.choice([1, 2, 3])))
        try:
            plan = A.plan_retp(A.TPConfig.contiguous(4, t0), t1, SPECS, kv=request(tables, t0, dests))
        except ConfigError:
            continue  # contradicting picks: the error is the specified outcome
        for s, d in dests.items():
            label = plan.kv.destinations[s]
            if isinstance(d, int):
                assert label == d
            elif isinstance(d, WithSequence):
                assert label == plan.kv.destinations[d.seq_id]
            else:
                got, want = ranks_of(plan, label), set(d.ranks)
                assert (want <= got) if len(want) <= t1 else (got <= want)
                rules.append((label, want))
        assert plan.kv_bytes_moved == minimum(plan, tables, rules), trial
        checked += 1
        binding += minimum(plan, tables, rules) > minimum(plan, tables)  # the constraints cost bytes
    assert checked >= 20 and binding >= 5, (checked, binding)


# ---- cached blocks -----------------------------------------------------------------------------------------------
def test_cached_blocks_follow_their_sequences_and_keep_one_copy_per_instance():
    """4 x TP1 -> 2 x TP2 (0+1 and 2+3 merge). Instance 0 caches h at block 1 (held by a live sequence) and u at 9
    (held by none); instance 1 caches h too, at block 5 (no live sequence): one copy of h survives, the one that
    moves anyway."""
    tables = {0: {"a": [1, 2]}, 1: {"b": [3]}, 2: {"c": [4]}, 3: {"d": [6]}}
    cached = {0: {"h": 1, "u": 9}, 1: {"h": 5, "v": 7}, 3: {"w": 6}}
    plan = A.plan_retp(A.TPConfig.contiguous(4, 1), 2, SPECS, kv=request(tables, 1, cached=cached))
    kv = plan.kv
    label01, label23 = kv.destinations["a"], kv.destinations["c"]
    assert sorted((i, k, b) for i, k, b, _ in kv.cached) == [(0, "h", 1), (0, "u", 9), (1, "v", 7), (3, "w", 6)]
    index01, index23 = kv.cached_blocks(label01), kv.cached_blocks(label23)
    assert set(index01) == {"h", "u", "v"} and set(index23) == {"w"}
    # h is the block sequence a holds: the same new id; w is d's block.
    assert index01["h"] == kv.block_tables()["a"][0] and index23["w"] == kv.block_tables()["d"][0]
    # block_map covers every block arriving in an instance, sequences' and cached ones.
    bm = kv.block_map(label01)
    assert bm == {0: {1: kv.block_tables()["a"][0], 2: kv.block_tables()["a"][1], 9: index01["u"]},
                  1: {3: kv.block_tables()["b"][0], 7: index01["v"]}}
    assert len(set(bm[0].values()) | set(bm[1].values())) == 5  # distinct new blocks
    assert kv.bytes_moved == minimum(plan, tables)


def test_a_split_replicates_a_shared_cached_prefix_and_keeps_unreferenced_chains_together():
    """1 x TP4 -> 4 x TP1: the cached prefix block 1 is held by sequences going to several instances: each keeps
    a copy (no extra move); the unreferenced cached blocks all go to one instance, the least loaded one."""
    tables = {0: {"a": [1, 2, 3], "b": [1, 4], "c": [1, 5], "d": [1, 6, 7, 8]}}
    cached = {0: {"p": 1, "t1": 10, "t2": 11, "t3": 12}}
    plan = A.plan_retp(A.TPConfig.contiguous(4, 4), 1, SPECS, kv=request(tables, 4, cached=cached))
    kv = plan.kv
    labels = {kv.destinations[s] for s in "abcd"}
    assert len(labels) == 4
    holders = {d for _, k, _, d in kv.cached if k == "p"}
    assert holders == labels
    tail = {d for _, k, _, d in kv.cached if k.startswith("t")}
    assert len(tail) == 1
    load = {d: sum(len(t) for s, t in tables[0].items() if kv.destinations[s] == d) for d in labels}
    assert load[tail.pop()] == min(load.values())
    assert kv.bytes_moved == minimum(plan, tables)


def test_cached_destinations_and_capacity():
    tables = {0: {"a": [1, 2]}, 1: {"b": [3]}}
    cached = {0: {"x": 9}, 1: {"y": 10}}
    plan = A.plan_retp(A.TPConfig.contiguous(2, 1), 1, SPECS, kv=request(
        tables, 1, cached=cached, cached_destinations={(1, "y"): WithSequence("a")}))
    assert {k: d for _, k, _, d in plan.kv.cached} == {"x": 0, "y": plan.kv.destinations["a"]}
    # A 2 x TP1 -> 2 x TP1 pool of 4 blocks: the cached block counts against capacity.
    small = request({0: {"a": [0, 1, 2]}, 1: {}}, 1, cached={0: {"x": 3}}, num_blocks=4)
    A.plan_retp(A.TPConfig.contiguous(2, 1), 1, SPECS, kv=small)
    with pytest.raises(CapacityError, match="needs 5 KV blocks"):
        A.plan_retp(A.TPConfig.contiguous(2, 1), 1, SPECS, kv=request(
            {0: {"a": [0, 1, 2], "b": [3]}, 1: {}}, 1, cached={0: {"x": 3}, 1: {"z": 2}}, num_blocks=4,
            cached_destinations={(1, "z"): 0}))
    with pytest.raises(ConfigError, match="cached block 'x'.*outside"):
        A.plan_retp(A.TPConfig.contiguous(2, 1), 1, SPECS, kv=request(tables, 1, cached={0: {"x": 99}}))


@pytest.mark.parametrize("t0, t1", list(itertools.product([1, 2, 4], repeat=2)))
def test_random_prefix_caches_move_the_minimum(t0, t1):
    rng = random.Random(t0 * 100 + t1)
    tables = random_sequences(4 // t0, NUM_BLOCKS, 0.3, seed=t0 + 10 * t1, share=0.5)
    cached = {}
    for i in tables:
        used = sorted({b for t in tables[i].values() for b in t})
        unused = [b for b in range(NUM_BLOCKS) if b not in used]
        picks = rng.sample(used, min(3, len(used))) + rng.sample(unused, min(3, len(unused)))
        cached[i] = {f"k{rng.randrange(6)}": b for b in picks}  # keys repeat across instances
    plan = A.plan_retp(A.TPConfig.contiguous(4, t0), t1, SPECS, kv=request(tables, t0, cached=cached))
    kv = plan.kv
    assert kv.bytes_moved == minimum(plan, tables)
    for d in range(4 // t1):
        index = kv.cached_blocks(d)
        keys = [k for _, k, _, dd in kv.cached if dd == d]
        assert len(keys) == len(set(keys)) == len(index)  # one copy per key and instance
        new_ids = {j for m in kv.block_map(d).values() for j in m.values()}
        assert set(index.values()) <= new_ids
    # every key of every old instance is still cached in some new instance
    assert {k for i in cached for k in cached[i]} == {k for _, k, _, _ in kv.cached}
