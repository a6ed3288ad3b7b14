"""The API an engine has (issue 15): block tables from one rank per instance, a prefix cache that survives merges
and splits byte for byte with its index rewritten, destinations as constraints, an nn.Module instead of a dict,
and instance process groups in TP-rank order afterwards."""
import random

import pytest

import amoeba_core as A
from amoeba_core.kv import OnRanks

import integration_fns as F
from models import GQA, QWEN2

pytestmark = pytest.mark.timeout(120)
WORLD = 4
MODEL = dict(GQA, num_key_value_heads=4)
KV = dict(engine="vllm_flash_attn", order="HND", num_layers=2, num_kv_heads=4, head_dim=8, block_size=4,
          dtype="float32")
NUM_BLOCKS = 32


def workload(num_instances, seed):
    """Per instance: tables with shared prefixes, and a prefix cache: some blocks live sequences hold, some no
    sequence holds, keys that repeat across instances (the same system prompt cached twice)."""
    rng = random.Random(seed)
    tables, cached = {}, {}
    for inst in range(num_instances):
        free = list(range(NUM_BLOCKS))
        rng.shuffle(free)
        prefix, free = free[:2], free[2:]
        tables[inst] = {}
        for k in range(3):
            n = rng.randint(1, 3)
            tables[inst][inst * 10 + k] = prefix + free[:n]
            free = free[n:]
        cached[inst] = {"system-0": prefix[0], "system-1": prefix[1], f"old-{inst}-a": free[0],
                        f"old-{inst}-b": free[1]}
    return tables, cached


def run(pool, old_degree, new_degree, mode, seed=0, destinations=None):
    old = A.TPConfig.contiguous(WORLD, old_degree)
    tables, cached = workload(WORLD // old_degree, seed)
    results = pool.run(F.tables_and_cache, MODEL, KV, old, new_degree, tables, cached, NUM_BLOCKS, mode,
                       destinations)
    return results, tables, cached


def check_ok(results):
    for rank, r in enumerate(results):
        assert r["error"] is None, (rank, r["message"])
        assert r["bad_kv"] == [] and r["bad_cached"] == [] and r["bad_w"] == [], rank
        assert not r["leftover_tables_key"], rank


@pytest.mark.parametrize("old_degree, new_degree", [(1, 2), (2, 4), (4, 2), (2, 1), (1, 4), (4, 1)])
def test_tables_on_one_rank_and_a_prefix_cache_survive_merges_and_splits(pools, old_degree, new_degree):
    results, tables, cached = run(pools(WORLD), old_degree, new_degree, "tp0", seed=old_degree * 10 + new_degree)
    check_ok(results)
    new = A.TPConfig(new_degree, results[0]["slots"])
    # Every rank of a new instance holds the same index; every old key survives somewhere; the shared system
    # prompt (held by live sequences) is cached in every new instance its sequences went to.
    by_instance = {}
    for rank, r in enumerate(results):
        inst = new.slots[rank][0]
        assert by_instance.setdefault(inst, r["cached"]) == r["cached"]
        for key, (old_inst, old_block) in r["cached_origin"].items():  # the key's own block came to its new id
            assert cached[old_inst][key] == old_block, (rank, key)
    all_keys = {k for c in cached.values() for k in c}
    assert set().union(*[set(c) for c in by_instance.values()]) == all_keys
    dests = results[0]["destinations"]
    for inst, index in by_instance.items():
        if any(d == inst for d in dests.values()):
            assert {"system-0", "system-1"} <= set(index), (inst, index)
        # the index points at blocks this instance holds, and the tables at those same blocks for the prefix
        held = {j for m in results[new.instances()[inst][0]]["block_map"].values() for j in m.values()}
        assert set(index.values()) <= held


@pytest.mark.parametrize("mode", ["last", "all"])
def test_tables_from_any_rank_give_the_same_result(pools, mode):
    """From TP rank 0, from the last TP rank (an extra exchange), or from every rank: the same plan."""
    ref, _, _ = run(pools(WORLD), 2, 4, "tp0", seed=3)
    got, _, _ = run(pools(WORLD), 2, 4, mode, seed=3)
    check_ok(got)
    for a, b in zip(ref, got):
        assert (a["tables"], a["cached"], a["slots"], a["kv_received"]) == \
            (b["tables"], b["cached"], b["slots"], b["kv_received"])


@pytest.mark.parametrize("mode, message", [
    ("none_for_instance_1", "no rank of instances \\[1\\] passes its KV tables"),
    ("two_disagree", "ranks of instance 0 pass different KV sequences"),
    ("destinations_without_tables", "but sequences=None"),
])
def test_missing_or_conflicting_tables_raise_on_every_rank(pools, mode, message):
    results, _, _ = run(pools(WORLD), 2, 4, mode)
    for r in results:
        assert r["error"] == "ConfigError", r
        assert __import__("re").search(message, r["message"]), r["message"]


def test_rank_constraints_end_to_end(pools):
    """4 x TP1 -> 2 x TP2 with sequence 20 (instance 2) pinned next to GPU 0: it lands in rank 0's instance, its
    bytes intact, and its prefix-cache entries go with the blocks."""
    results, tables, _ = run(pools(WORLD), 1, 2, "tp0", seed=7, destinations={20: OnRanks({0})})
    check_ok(results)
    new = A.TPConfig(2, results[0]["slots"])
    assert 0 in new.instances()[results[0]["destinations"][20]]
    assert 20 in results[0]["tables"]


# ---- modules --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, t0, t1", [(MODEL, 1, 4), (QWEN2, 4, 2), (QWEN2, 2, 1)])
def test_an_nn_module_is_rebound_in_place(pools, model, t0, t1):
    results = pools(WORLD).run(F.module_retp, model, A.TPConfig.contiguous(WORLD, t0), t1)
    specs = {s.name: s for s in A.llama_param_specs(model)}
    for rank, r in enumerate(results):
        assert r["error"] is None, r
        assert r["bad"] == [] and r["not_parameter"] == [] and r["grad_changed"] == [] and r["not_result"] == []
        assert r["buffer_untouched"]
        assert r["tied"] in (None, True)
        for name, shape in r["shapes"].items():
            assert shape == specs[name].shard_shape(0, t1)  # every TP rank's shard has the same shape here


def test_a_parameter_no_spec_names_raises_on_every_rank(pools):
    results = pools(WORLD).run(F.module_retp, MODEL, A.TPConfig.contiguous(WORLD, 2), 4, "unknown_parameter")
    for r in results:
        assert r["error"] == "SpecMismatchError" and "model.adapter.weight" in r["message"], r
        assert r["failed_rank"] == 2 and r["intact"]


# ---- process groups -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("instances", [[[0, 2], [3, 1]], [[3, 0, 2, 1]], [[1], [0], [3], [2]]])
def test_instance_groups_gather_in_tp_order(pools, instances):
    results = pools(WORLD).run(F.gather_in_tp_order, instances)
    for rank, r in enumerate(results):
        ranks = next(i for i in instances if rank in i)
        assert r["ranks"] == ranks and r["gathered"] == ranks and r["same_group"]
        if len(ranks) > 1:
            assert r["raw"] == sorted(ranks)  # what new_group gives: global-rank order


def test_instance_groups_of_a_subgroup(pools):
    """A service group of global ranks [3, 1] at TP2: its instance is [3, 1] in TP order; ranks 0 and 2 only help
    create the group (new_group needs every rank)."""
    results = pools(WORLD).run(F.subgroup_instances, [3, 1], 2)
    assert results[0] is None and results[2] is None
    for rank in (1, 3):
        assert results[rank] == {"global_ranks": [3, 1], "gathered": [3, 1]}
