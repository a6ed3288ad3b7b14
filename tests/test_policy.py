"""TPPolicy: when to merge and split, from plain snapshots (no process group)."""
import math

import pytest

from amoeba_core import llama_param_specs, plan_retp
from amoeba_core.capacity import weight_bytes_per_gpu
from amoeba_core.config import TPConfig
from amoeba_core.errors import ConfigError
from amoeba_core.policy import (Bandwidths, ByteCostModel, ClusterState, InstanceState, Merge, PolicyParams,
                                RequestView, Split, TPPolicy, TransformBytes, transformation_seconds)

BS = 4
# Blocks per instance at each degree: with the handoff a TP2 instance holds more than two TP1 pools.
HANDOFF = {1: 10, 2: 40, 4: 120}
NO_HANDOFF = {1: 10, 2: 20, 4: 40}


def params(caps=HANDOFF, **kw):
    kw.setdefault("min_dwell_s", 0.0)
    kw.setdefault("dwell_cost_factor", 0.0)
    kw.setdefault("split_delay_s", 0.0)
    return PolicyParams(tuple(sorted(caps)), caps, BS, **kw)


def req(rid, prompt, out, generated=0, since=None):
    """A request needing ceil((prompt + out - 1) / 4) blocks."""
    return RequestView(rid, prompt, generated, out, since)


def tp1(iid, used=0, running=(), **kw):
    return InstanceState(iid, (iid,), 10, used, tuple(running), **kw)


def state(instances, waiting=(), now=100.0):
    return ClusterState(now, tuple(instances), tuple(waiting))


def test_need_blocks():
    p = TPPolicy(params(assumed_output_tokens=9))
    assert p.need_blocks(req("a", 5, 4)) == 2                      # 5 + 4 - 1 = 8 tokens
    assert p.need_blocks(req("a", 5, 5)) == 3                      # 9 tokens
    assert p.need_blocks(RequestView("b", 8, 0)) == 4              # unknown output: assume 9 -> 16 tokens
    assert p.need_blocks(RequestView("b", 8, 20)) == 7             # past the assumption: 8 + 21 - 1 tokens


def test_merges_the_least_loaded_instances_for_a_request_no_instance_holds():
    insts = [tp1(0, used=6), tp1(1, used=1), tp1(2, used=9), tp1(3, used=2)]
    # 50 tokens -> 13 blocks: more than a TP1 instance (10), fits TP2 (40)
    [action] = TPPolicy(params()).decide(state(insts, [req("long", 40, 11)]))
    assert action == Merge((1, 3), (1, 3), 2)
    # 200 tokens -> 50 blocks: only TP4 holds it; all four merge
    [action] = TPPolicy(params()).decide(state(insts, [req("huge", 190, 11)]))
    assert action == Merge((0, 1, 2, 3), (0, 1, 2, 3), 4)
    assert "huge" in action.reason and action.describe().startswith("merge 4xTP1 -> TP4")


def test_no_merge_when_an_instance_could_hold_the_request_or_none_ever_could():
    insts = [tp1(0, used=9), tp1(1, used=9)]
    assert TPPolicy(params()).decide(state(insts, [req("fits-later", 30, 5)])) == []     # 9 blocks <= 10
    assert TPPolicy(params()).decide(state(insts, [req("too-long", 1000, 5)])) == []     # > 120 at TP4


def test_mixed_degrees_merge_in_steps():
    insts = [InstanceState(0, (0, 1), 40), tp1(2), tp1(3)]
    p = TPPolicy(params())
    [first] = p.decide(state(insts, [req("huge", 190, 11)]))
    assert first == Merge((2, 3), (2, 3), 2)                         # a step towards TP4
    merged = [InstanceState(0, (0, 1), 40), InstanceState(5, (2, 3), 40)]
    [second] = p.decide(state(merged, [req("huge", 190, 11)]))
    assert second == Merge((0, 5), (0, 1, 2, 3), 4)


def test_kv_pressure_merges_only_where_the_merge_buys_blocks():
    # Both instances have their blocks reserved; the oldest waiting request has waited 3 s for 3 blocks.
    running = [req("r0", 30, 5)]                                     # 9 of 10 blocks reserved each
    insts = [tp1(0, used=8, running=running), tp1(1, used=8, running=[req("r1", 30, 5)])]
    waiting = [req("w", 8, 4, since=97.0)]
    assert TPPolicy(params(HANDOFF)).decide(state(insts, waiting)) == [Merge((0, 1), (0, 1), 2)]
    assert TPPolicy(params(NO_HANDOFF)).decide(state(insts, waiting)) == []    # 20 blocks < 1.25 * 2 * 10
    assert TPPolicy(params(HANDOFF)).decide(state(insts, [req("w", 8, 4, since=99.0)])) == []   # 1 s < 2 s
    assert TPPolicy(params(HANDOFF, pressure_wait_s=None)).decide(state(insts, waiting)) == []


def test_preemption_risk_merges_the_instance_that_would_outgrow_its_pool():
    # Instance 1's running requests will need 12 blocks (unknown outputs, 20 assumed) in a pool of 10.
    grow = [RequestView("g0", 5, 1), RequestView("g1", 5, 1)]
    insts = [tp1(0, used=0), tp1(1, used=4, running=grow), tp1(2, used=3)]
    [action] = TPPolicy(params(assumed_output_tokens=20)).decide(state(insts))
    assert action == Merge((0, 1), (0, 1), 2)                        # instance 1 with the least-loaded peer


def test_dwell_and_predicted_cost_block_a_merge():
    class FixedCost:
        def merge_seconds(self, old_degree, tokens):
            return 2.0

        def split_seconds(self, old_degree, new_degree, tokens):
            return 2.0
    young = [tp1(0, formed_at=95.0), tp1(1, formed_at=95.0)]
    waiting = [req("long", 40, 11)]
    assert TPPolicy(params(min_dwell_s=10.0)).decide(state(young, waiting)) == []
    assert TPPolicy(params(min_dwell_s=4.0)).decide(state(young, waiting)) != []
    # 5 s since formed < 20 x 2 s predicted
    assert TPPolicy(params(dwell_cost_factor=20.0), FixedCost()).decide(state(young, waiting)) == []
    old = [tp1(0, formed_at=50.0), tp1(1, formed_at=50.0)]
    [merge] = TPPolicy(params(dwell_cost_factor=20.0), FixedCost()).decide(state(old, waiting))
    assert merge.predicted_seconds == 2.0
    assert TPPolicy(params(max_transform_s=1.0), FixedCost()).decide(state(old, waiting)) == []


def test_an_instance_under_construction_counts_and_is_left_alone():
    # A TP2 being built (transforming) will hold the long request: no second merge for it.
    insts = [InstanceState(7, (0, 1), 40, transforming=True), tp1(2), tp1(3)]
    assert TPPolicy(params()).decide(state(insts, [req("long", 40, 11)])) == []


def tp4(running, formed_at=-math.inf, waiting=()):
    return InstanceState(0, (0, 1, 2, 3), 120, 0, tuple(running), tuple(waiting), formed_at=formed_at)


def test_split_back_to_the_lowest_degree_that_holds_the_requests_after_the_delay():
    small = [req(i, 8, 5) for i in range(3)]                         # 3 blocks each
    p = TPPolicy(params(split_delay_s=5.0))
    assert p.decide(state([tp4(small)], now=100.0)) == []            # possible since 100
    assert p.decide(state([tp4(small)], now=104.0)) == []
    [split] = p.decide(state([tp4(small)], now=105.0))
    assert split == Split(0, (0, 1, 2, 3), 1)
    # first-fit decreasing into half of each TP1 pool (5 blocks): one request per new instance
    assert sorted(split.destinations.values()) == [0, 1, 2] and split.describe().startswith("split TP4 -> 4xTP1")
    # a request of 20 blocks fits no TP1 (5 usable) but a TP2 (20 of 40): split to 2xTP2 instead
    [split] = TPPolicy(params()).decide(state([tp4(small + [req("big", 70, 11)])]))
    assert split.new_degree == 2 and split.destinations["big"] != split.destinations[0]


def test_split_held_back_by_a_long_waiting_request_pressure_or_a_lull_that_ends():
    small = [req(i, 8, 5) for i in range(3)]
    assert TPPolicy(params()).decide(state([tp4(small)], [req("long", 190, 11)])) == []
    # the lull ends before the delay: the clock restarts
    p = TPPolicy(params(split_delay_s=5.0))
    p.decide(state([tp4(small)], now=100.0))
    p.decide(state([tp4(small + [req("big", 400, 9)])], now=102.0))  # 102 blocks: no split possible
    assert p.decide(state([tp4(small)], now=105.0)) == []
    assert p.decide(state([tp4(small)], now=110.0)) != []
    # KV pressure (a request waited 3 s for blocks no instance has free) blocks splits
    full = [req(i, 36, 5) for i in range(12)]                        # 12 x 10 = 120 blocks reserved
    assert TPPolicy(params()).decide(state([tp4(full)], [req("w", 8, 4, since=97.0)])) == []


def test_params_are_checked():
    with pytest.raises(ConfigError, match="ascending"):
        PolicyParams((2, 1), {1: 1, 2: 2}, 4)
    with pytest.raises(ConfigError, match="lacks degrees"):
        PolicyParams((1, 2), {1: 1}, 4)
    with pytest.raises(ConfigError, match="degree 3"):
        TPPolicy(params()).decide(state([InstanceState(0, (0, 1, 2), 30)]))


def test_byte_cost_model_by_hand():
    bw = Bandwidths(link_bytes_per_s=100.0, local_copy_bytes_per_s=1000.0, fixed_s=0.5)
    cost = ByteCostModel({1: 800, 2: 400, 4: 200}, {1: 8, 2: 4, 4: 2}, bw)
    merge = cost.merge_bytes(1, [10, 30, 20, 40])
    assert merge == TransformBytes(0, (100 - 10) * 2, 40 * 2 + 200)
    assert cost.merge_seconds(1, [10, 30, 20, 40]) == pytest.approx(0.5 + 180 / 100 + 280 / 1000)
    split = cost.split_bytes(4, 1, [30, 50, 0, 20])
    assert split == TransformBytes(800 - 200, 50 * (8 - 2), 200 + 50 * 2)
    assert transformation_seconds(split, bw) == pytest.approx(0.5 + 900 / 100 + 300 / 1000)


def test_cost_model_weight_bytes_agree_with_plan_retp():
    """The merge moves no weight bytes and a split receives W(new) - W(old) per rank: plan_retp's own counts."""
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 200, "torch_dtype": "float32"}
    specs = llama_param_specs(cfg)
    weights = {d: weight_bytes_per_gpu(specs, d) for d in (1, 2, 4)}
    cost = ByteCostModel(weights, {1: 1, 2: 1, 4: 1})
    assert plan_retp(TPConfig.contiguous(4, 1), 4, specs).weight_bytes_received().max() == \
        cost.merge_bytes(1, [0, 0, 0, 0]).weight_bytes_in == 0
    for old, new in ((4, 1), (4, 2), (2, 1)):
        received = plan_retp(TPConfig.contiguous(4, old), new, specs).weight_bytes_received()
        assert received.max() == cost.split_bytes(old, new, [0]).weight_bytes_in == weights[new] - weights[old]


# ---- rule 0: the base degree from a predictor of the recent load ----------------------------------------------
class TablePredictor:
    """A predictor that answers from a table (degree -> share of the window within SLO) and records its calls."""

    def __init__(self, scores):
        self.scores, self.calls = dict(scores), []

    def slo(self, prompt, output):
        return 1.0, 0.1

    def attainment(self, degree, num_gpus, window):
        self.calls.append((degree, num_gpus, len(window)))
        return self.scores[degree]


def arrivals(n, t0, t1):
    """n requests (8 prompt + 5 output tokens: 3 blocks) arriving evenly over [t0, t1)."""
    return tuple(RequestView(f"a{t0}-{i}", 8, 0, 5, t0 + (t1 - t0) * i / n) for i in range(n))


def base_params(**kw):
    kw.setdefault("window_s", 60.0)
    kw.setdefault("base_every_s", 30.0)
    kw.setdefault("min_window_requests", 10)
    return params(**kw)


def test_base_degree_follows_the_predictor_and_instances_merge_up_to_it():
    pred = TablePredictor({1: 0.80, 2: 0.97, 4: 0.90})
    p = TPPolicy(base_params(), predictor=pred)
    insts = [tp1(i) for i in range(4)]
    # 20 arrivals in the last minute: the predictor is asked about every degree for 4 GPUs and TP2 wins
    [merge] = p.decide(ClusterState(100.0, tuple(insts), (), arrivals(20, 45.0, 100.0)))
    assert sorted(pred.calls) == [(1, 4, 20), (2, 4, 20), (4, 4, 20)]
    assert p.base == 2 and p.base_history[0][:2] == (100.0, 2)
    assert merge == Merge((0, 1), (0, 1), 2) and "base degree TP2" in merge.reason
    # the next call merges the other pair; the TP2 is not split back below the base while idle
    merged = [InstanceState(4, (0, 1), 40), tp1(2), tp1(3)]
    assert p.decide(ClusterState(101.0, tuple(merged))) == [Merge((2, 3), (2, 3), 2)]
    assert p.decide(ClusterState(102.0, (merged[0], InstanceState(5, (2, 3), 40)))) == []
    assert len(pred.calls) == 3                                      # reconsidered only every base_every_s


def test_base_degree_hysteresis_window_and_minimum_sample():
    insts = tuple(tp1(i) for i in range(4))
    # a gain below base_margin (0.02) does not move the base
    p = TPPolicy(base_params(), predictor=TablePredictor({1: 0.90, 2: 0.915, 4: 0.5}))
    assert p.decide(ClusterState(100.0, insts, (), arrivals(20, 45.0, 100.0))) == [] and p.base == 1
    # predictions within the margin of the best do not rank degrees: the lowest of them becomes the base
    p = TPPolicy(base_params(), predictor=TablePredictor({1: 0.60, 2: 0.985, 4: 1.0}))
    p.decide(ClusterState(100.0, insts, (), arrivals(20, 45.0, 100.0)))
    assert p.base == 2
    # fewer than min_window_requests arrivals in the window: no prediction at all
    pred = TablePredictor({1: 0.5, 2: 1.0, 4: 0.5})
    p = TPPolicy(base_params(), predictor=pred)
    assert p.decide(ClusterState(100.0, insts, (), arrivals(9, 45.0, 100.0))) == [] and pred.calls == []
    # arrivals older than window_s (60) leave the window: at 200, 20 from [0, 10) and 5 from [190, 200) -> 5 count
    pred = TablePredictor({1: 0.5, 2: 1.0, 4: 0.5})
    p = TPPolicy(base_params(), predictor=pred)
    p.decide(ClusterState(10.0, insts, (), arrivals(20, 0.0, 10.0)))
    assert pred.calls[-1] == (4, 4, 20)
    pred.calls.clear()
    p.decide(ClusterState(200.0, insts, (), arrivals(5, 190.0, 200.0)))
    assert pred.calls == []
    # without a predictor the base stays the lowest degree whatever arrives
    p = TPPolicy(base_params())
    assert p.decide(ClusterState(100.0, insts, (), arrivals(50, 45.0, 100.0))) == [] and p.base == 1


def test_lower_base_splits_back_and_splits_stop_at_the_base():
    pred = TablePredictor({1: 0.6, 2: 0.99, 4: 0.7})
    p = TPPolicy(base_params(), predictor=pred)
    small = [req(i, 8, 5) for i in range(3)]                         # 3 blocks each
    # a TP4 whose requests would fit 4xTP1 splits only to 2xTP2 (the base)
    [split] = p.decide(ClusterState(100.0, (tp4(small),), (), arrivals(20, 45.0, 100.0)))
    assert p.base == 2 and split.new_degree == 2
    # the load changes: TP1 now predicted best by more than the margin, so the TP2s split back to TP1
    pred.scores = {1: 0.99, 2: 0.9, 4: 0.7}
    two = (InstanceState(5, (0, 1), 40, 3, (small[0],)), InstanceState(6, (2, 3), 40, 6, tuple(small[1:])))
    actions = p.decide(ClusterState(130.0, two, (), arrivals(20, 100.0, 130.0)))
    assert p.base == 1 and [(a.instance, a.new_degree) for a in actions] == [(5, 1), (6, 1)]
