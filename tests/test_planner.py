"""The planner is pure: same inputs, same plan; it moves the minimum and picks balanced senders."""
import numpy as np
import pytest

import amoeba_core as A
from amoeba_core.errors import ConfigError, InvalidDegreeError, ScratchBudgetError
from amoeba_core.verify import weight_min_bytes

from models import EVEN_VOCAB, GQA, UNEVEN


def degrees(world):
    return [d for d in (1, 2, 4, 8) if world % d == 0]


def sharded_bytes(specs):
    return sum(int(np.prod(s.shape)) * s.itemsize for s in specs if s.is_sharded)


@pytest.mark.parametrize("old, new", [((2, 2), 4), ((4, 1), 4)])
def test_merges_move_no_weight_bytes(old, new):
    n, d = old
    plan = A.plan_retp(A.TPConfig.contiguous(n * d, d), new, A.llama_param_specs(GQA))
    assert plan.weight_bytes_moved == 0 and len(plan.transfers) == 0


def test_split_of_tp4_into_two_tp2_moves_a_quarter_into_each_rank():
    specs = A.llama_param_specs(EVEN_VOCAB)
    plan = A.plan_retp(A.TPConfig.contiguous(4, 4), 2, specs)
    assert plan.weight_bytes_received().tolist() == [sharded_bytes(specs) // 4] * 4
    replicated = {s.name for s in specs if not s.is_sharded}
    assert not any(plan.tensors[t.tensor].spec.name in replicated for t in plan.transfers)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_transition_moves_the_exhaustive_minimum(world):
    for model in (GQA, UNEVEN):
        specs = A.llama_param_specs(model)
        for old in degrees(world):
            for new in degrees(world):
                if model is UNEVEN and 8 in (old, new):
                    continue
                config = A.TPConfig.contiguous(world, old)
                plan = A.plan_retp(config, new, specs)
                assert plan.weight_bytes_moved == weight_min_bytes(specs, config.slots, new), (old, new)


@pytest.mark.parametrize("old, new", [(8, 1), (8, 2), (2, 4), (4, 2), (1, 8)])
def test_world_8_moves_the_exhaustive_minimum(old, new):
    specs = A.llama_param_specs(GQA)
    config = A.TPConfig.contiguous(8, old)
    assert A.plan_retp(config, new, specs).weight_bytes_moved == weight_min_bytes(specs, config.slots, new)


def test_a_scrambled_old_placement_still_reaches_the_minimum():
    specs = A.llama_param_specs(GQA)
    config = A.TPConfig.from_instances([[3, 0], [2, 1]])
    for new in (1, 4):
        plan = A.plan_retp(config, new, specs)
        assert plan.weight_bytes_moved == weight_min_bytes(specs, config.slots, new)


def test_plan_is_deterministic_and_printable():
    specs = A.llama_param_specs(GQA)
    a = A.plan_retp(A.TPConfig.contiguous(4, 4), 1, specs, scratch_bytes=1 << 14)
    b = A.plan_retp(A.TPConfig.contiguous(4, 4), 1, specs, scratch_bytes=1 << 14)
    assert a.digest() == b.digest()
    assert a.digest() != A.plan_retp(A.TPConfig.contiguous(4, 4), 1, specs, scratch_bytes=1 << 15).digest()
    text = str(a)
    assert "1x4 -> 4x1" in text and f"{a.weight_bytes_moved} bytes moved" in text and "rank 3:" in text


def test_replicated_holders_share_the_send_load():
    """2xTP2 -> 4xTP1: each missing half has two holders (one per old instance); every rank sends the same."""
    plan = A.plan_retp(A.TPConfig.contiguous(4, 2), 1, A.llama_param_specs(EVEN_VOCAB))
    sent = plan.weight_bytes_sent()
    assert sent.min() > 0 and sent.max() - sent.min() <= max(t.nbytes for t in plan.transfers)


def test_rounds_respect_the_scratch_budget():
    """Staged transfers (strided: row-parallel weights) fit the budget per round; direct ones (one contiguous
    range on both sides) are sent from the old shard and received into the new one without staging."""
    specs = A.llama_param_specs(GQA)
    budget = 10_000
    plan = A.plan_retp(A.TPConfig.contiguous(4, 4), 1, specs, scratch_bytes=budget)
    assert len(plan.rounds) > 1
    staged = [t for t in plan.transfers if not t.direct]
    assert staged and all(plan.tensors[t.tensor].spec.kind == "row" for t in staged)
    for a, b in plan.rounds:
        load = np.zeros(4, dtype=np.int64)
        for t in plan.transfers[a:b]:
            if not t.direct:
                load[t.src] += t.nbytes
                load[t.dst] += t.nbytes
        assert load.max() <= budget


def test_pinned_placement_is_used_and_costs_more():
    specs = A.llama_param_specs(GQA)
    old = A.TPConfig.contiguous(4, 2)
    pinned = A.TPConfig.contiguous(4, 4)  # rank 1 (old tp 1) as new tp 1: must fetch data it lacks
    plan = A.plan_retp(old, 4, specs, placement=pinned)
    assert plan.new == pinned and plan.weight_bytes_moved > 0
    assert A.plan_retp(old, 4, specs).weight_bytes_moved == 0


def test_bad_inputs_raise_with_values():
    specs = A.llama_param_specs(UNEVEN)
    with pytest.raises(InvalidDegreeError, match="new TP degree 3 does not divide world size 4"):
        A.plan_retp(A.TPConfig.contiguous(4, 1), 3, specs)
    with pytest.raises(InvalidDegreeError, match="degree 8"):
        A.plan_retp(A.TPConfig.contiguous(8, 1), 8, specs)
    with pytest.raises(InvalidDegreeError, match="TP degree 3 does not divide world size 4"):
        A.TPConfig.contiguous(4, 3)
    with pytest.raises(ConfigError, match="pinned placement"):
        A.plan_retp(A.TPConfig.contiguous(4, 1), 2, specs, placement=A.TPConfig.contiguous(4, 4))
    from amoeba_core.kv import KVLayout, KVRequest
    layout = KVLayout("vllm_flash_attn", "NHD", 1, 2, 8, 16, "float32")  # 1 KiB per head-block (K and V)
    req = KVRequest(layout, 8, 8 * layout.block_bytes(1), ((0, "s", (1, 2)), (1, "t", (3,))))
    with pytest.raises(ScratchBudgetError, match="raise scratch_bytes to at least"):
        A.plan_retp(A.TPConfig.contiguous(2, 1), 2, A.llama_param_specs(GQA), kv=req, scratch_bytes=1024)
    with pytest.raises(ConfigError, match="more than one rank"):
        A.TPConfig(2, ((0, 0), (0, 0)))


def test_merges_keep_weights_in_place():
    """2xTP2 -> 1xTP4: single-range shards become views of the old storage, fused ones are compacted in place;
    nothing is allocated."""
    from amoeba_core.planning import ALLOC, COMPACT, VIEW
    plan = A.plan_retp(A.TPConfig.contiguous(4, 2), 4, A.llama_param_specs(GQA))
    modes = {t.spec.name: set(t.mode.values()) for t in plan.tensors}
    assert not any(ALLOC in m for m in modes.values())
    assert modes["model.embed_tokens.weight"] == {VIEW}
    # [q; k; v]: the parts move closer (a rank whose new shard is a suffix of its old one gets a view)
    assert COMPACT in modes["model.layers.0.self_attn.qkv_proj.weight"] <= {COMPACT, VIEW}
    assert modes["model.layers.0.mlp.down_proj.weight"] == {COMPACT}          # row-parallel: every row shrinks
    assert plan.largest_new_shard_bytes(0) == 0
