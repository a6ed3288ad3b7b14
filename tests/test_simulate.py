"""The trace simulator: roofline arithmetic, scheduling semantics, transformations, and the step-level entry point
an engine-side consistency test compares against (tiny synthetic traces only; the comparison runs are a bench)."""
import pytest

from amoeba_core.layout.kv import KVLayout
from amoeba_core.policy import Merge, PolicyParams, Split, TPPolicy, ZeroCost
from amoeba_core.simulator import (Hardware, ModelShape, ReplayPredictor, RooflineTime, SimConfig, Simulator,
                                   UnitTime, policy_decisions)

LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def roofline():
    layout = KVLayout("vllm_flash_attn", "NHD", 32, 8, 128, 16, "bfloat16")
    return RooflineTime(ModelShape.from_config(LLAMA8B, layout, [1, 2, 4]), Hardware())


def test_model_shape_by_hand(roofline):
    s = roofline.shape
    h, i, L = 4096, 14336, 32
    assert s.matmul_params == L * ((32 + 16) * 128 * h + h * h + 3 * i * h)
    assert s.weight_bytes[1] == 2 * (s.matmul_params + 2 * 128256 * h + (2 * L + 1) * h)
    assert s.kv_bytes_per_token == {1: 128 << 10, 2: 64 << 10, 4: 32 << 10}


def test_roofline_regimes(roofline):
    hw, s = Hardware(), roofline.shape
    # batch-1 decode at TP1 is memory-bound: the weights (and a few KV bytes) at 80 % of HBM bandwidth
    expect = hw.step_overhead_s + (s.weight_bytes[1] + 1000 * s.kv_bytes_per_token[1]) / (0.8 * hw.hbm_bytes_per_s)
    assert roofline.step_seconds(1, [], 1, 1000) == pytest.approx(expect)
    # an 8k-token prefill at TP2 is compute-bound: 2 FLOPs per parameter and token, plus causal attention
    flops = 2 * s.matmul_params * 8192 + 2 * 128256 * 4096 + 4 * 32 * 32 * 128 * (8192 * 8193 // 2)
    ar = 2 * 32 * (hw.allreduce_latency_s + 2 * (2 - 1) / 2 * 8192 * 4096 * 2 / hw.link_bytes_per_s)
    expect = hw.step_overhead_s + flops / 2 / (0.5 * hw.peak_flops) + ar
    assert roofline.step_seconds(2, [(0, 8192)], 0, 0) == pytest.approx(expect)


@pytest.mark.parametrize("degree,batch,ctx0,steps", [(1, 1, 1000, 10), (1, 64, 100_000, 50), (4, 300, 100, 2000),
                                                     (2, 2000, 0, 40), (1, 7, 3, 1)])
def test_decode_segment_closed_form(roofline, degree, batch, ctx0, steps):
    one_by_one = [roofline.step_seconds(degree, [], batch, ctx0 + j * batch) for j in range(steps)]
    assert roofline.decode_seconds(degree, batch, ctx0, steps) == pytest.approx(sum(one_by_one), rel=1e-9)
    half = sum(one_by_one) / 2
    j = roofline.decode_steps_until(degree, batch, ctx0, half, steps)
    assert sum(one_by_one[:j]) >= half - 1e-12 and (j == 0 or sum(one_by_one[:j - 1]) < half)


def unit_sim(start, caps, policy=None, cost=None, **cfg):
    cfg.setdefault("max_batched_tokens", None)
    return Simulator(start, caps, UnitTime(), policy=policy, cost_model=cost, config=SimConfig(block_size=4, **cfg))


def test_one_request_one_step_per_token():
    res = unit_sim([1], {1: 10}).run([(0, 5, 3)])
    [r] = res.requests
    assert (r.first_token_time, r.finish_time) == (1.0, 3.0)        # prefill step 0, decode steps 1 and 2


def test_lifetime_reservation_and_no_starvation():
    # One TP1 instance of 10 blocks: "a" (6 blocks) runs; "long" (9 blocks) cannot start beside it and reserves the
    # instance, so the later small requests (2 blocks, they would fit beside "a") wait; beside "long" (9 of 10
    # blocks) they do not fit either, so they start when it is done.
    reqs = [(0, 20, 5), (1, 33, 4), (2, 4, 5), (2, 4, 5)]
    res = unit_sim([1], {1: 10}).run(reqs)
    a, long, s1, s2 = res.requests
    assert (a.finish_time, long.first_token_time, long.finish_time) == (5, 6, 9)
    assert s1.first_token_time == s2.first_token_time == 10
    res = unit_sim([1], {1: 10}, reserve=False).run(reqs)
    a, long, s1, s2 = res.requests
    assert s1.first_token_time == 3 and long.first_token_time > 5   # without the rule the small ones pass


def test_static_unserved_and_adaptive_serves_by_merging():
    reqs = [(0, 20, 5), (0, 150, 11)]                                # the second needs 40 blocks: only TP4
    static = unit_sim([1, 1, 1, 1], {1: 10}).run(reqs)
    assert [r.unserved for r in static.requests] == [False, True]
    params = PolicyParams((1, 2, 4), {1: 10, 2: 20, 4: 40}, 4, min_dwell_s=0, dwell_cost_factor=0, split_delay_s=0)
    res = unit_sim([1, 1, 1, 1], params.capacity_blocks, TPPolicy(params), ZeroCost()).run(reqs)
    assert all(r.finish_time is not None for r in res.requests)
    assert [t.kind for t in res.transformations] == ["merge", "split"]


def test_transformation_pauses_the_instances_for_the_predicted_seconds():
    class Slow:
        def merge_seconds(self, old_degree, tokens):
            return 5.0

        def split_seconds(self, old_degree, new_degree, tokens):
            return 7.0
    params = PolicyParams((1, 2), {1: 10, 2: 20}, 4, min_dwell_s=0, dwell_cost_factor=0, split_delay_s=0)
    reqs = [(0, 20, 5), (1, 50, 3)]                                  # the second needs 13 blocks: TP2
    res = unit_sim([1, 1], params.capacity_blocks, TPPolicy(params), Slow()).run(reqs)
    a, b = res.requests
    merge, split = res.transformations
    assert (merge.decided_at, merge.started_at, merge.done_at) == (1, 1, 6)
    assert a.finish_time == 5 + 5                                   # 4 decode steps after its first token, +5 paused
    assert b.first_token_time == 7 and b.finish_time == 9
    assert (split.started_at, split.done_at) == (10, 17)            # once both are done (split delay 0)


def test_policy_decisions_hand_traced():
    """Four TP1 instances of 10 blocks (TP2 20, TP4 40: no KV gain, so only requests that fit nowhere merge).
    step 0: r0 and r1 (6 blocks each) start on instances 0 and 1; step 1: r2 arrives needing 28 blocks (only TP4)
    -> merge all four, r2 starts beside r0 and r1 (40 of 40 blocks reserved); step 2: r3 (9 blocks) waits; step 5:
    r0, r1 finish and r3 starts; step 9: r3 finishes; step 11: r2 finishes -> nothing left, split back to 4xTP1."""
    reqs = [(0, 20, 5), (0, 20, 5), (1, 100, 10), (2, 30, 4)]
    got = policy_decisions([1, 1, 1, 1], {1: 10, 2: 20, 4: 40}, reqs, block_size=4)
    assert got == [(1, Merge((0, 1, 2, 3), (0, 1, 2, 3), 4)), (11, Split(4, (0, 1, 2, 3), 1))]
    # Deterministic, and a TP2-sized request merges two instances (the least loaded: 2 and 3, idle)
    assert policy_decisions([1, 1, 1, 1], {1: 10, 2: 20, 4: 40}, reqs, block_size=4) == got
    got = policy_decisions([1, 1, 1, 1], {1: 10, 2: 20, 4: 40}, [(0, 20, 5), (0, 20, 5), (1, 50, 10)], block_size=4)
    assert got == [(1, Merge((2, 3), (2, 3), 2)), (11, Split(4, (2, 3), 1))]


def test_policy_decisions_kv_pressure_with_and_without_handoff():
    # Two TP1 instances of 10 blocks, each full with a 9-block request for 20 steps; a third 9-block request waits.
    reqs = [(0, 16, 21), (0, 16, 21), (0, 16, 21)]
    handoff = policy_decisions([1, 1], {1: 10, 2: 40}, reqs, block_size=4)
    assert handoff[0] == (2, Merge((0, 1), (0, 1), 2))             # waited 2 steps; a TP2 holds 40 > 1.25 x 20
    assert policy_decisions([1, 1], {1: 10, 2: 20}, reqs, block_size=4) == []   # no KV gain: it just waits


def test_config_checks():
    with pytest.raises(Exception, match="max_batched_tokens"):
        SimConfig(max_batched_tokens=64, max_num_seqs=256)
    with pytest.raises(Exception, match="no KV capacity"):
        Simulator([2], {1: 10}, UnitTime())


def test_size_aware_dispatch_leaves_short_requests_to_smaller_instances():
    # A TP2 (40 blocks, ranks 0-1, first in rank order) and a TP1 (10 blocks). At step 0 a (10 blocks, fits both)
    # and b (30 blocks, only the TP2) arrive; at step 1 a short c (6 blocks) and a long d (16 blocks, only the TP2).
    # Size-aware: a goes to the TP1, b to the TP2; the TP2 then has 10 blocks left, room for c but not d, and holds
    # it for d (which only it can hold) while c waits for the TP1. FIFO: the TP2 (first) takes a and b.
    reqs = [(0, 20, 20), (0, 100, 20), (1, 20, 5), (1, 60, 5)]
    fifo = unit_sim([2, 1], {1: 10, 2: 40}).run(reqs)
    size = unit_sim([2, 1], {1: 10, 2: 40}, dispatch="size").run(reqs)
    a, b, c, d = size.requests
    assert [r.instance.degree for r in size.requests] == [1, 2, 1, 2]
    assert c.first_token_time == a.finish_time + 1                   # after a leaves the TP1
    assert d.first_token_time == b.finish_time + 1                   # b's blocks free at its last step
    assert [r.instance.degree for r in fifo.requests] == [2, 2, 1, 2]
    # one short request and both idle: size-aware routing gives it to the TP1 although the TP2 starts first
    [r] = unit_sim([2, 1], {1: 10, 2: 40}, dispatch="size").run([(0, 20, 5)]).requests
    assert r.instance.degree == 1
    with pytest.raises(Exception, match="dispatch"):
        SimConfig(dispatch="random")


def test_replay_predictor_by_hand():
    """Three 9-block requests at once on 2 GPUs: two TP1 instances (10 blocks) start two, the third starts when
    one is done (TTFT 5 steps > 2: a miss); one TP2 (40 blocks) starts all. An 11-block request fits only the TP2:
    left out of the TP1 prediction."""
    from amoeba_core.policy import WindowRequest
    w = [WindowRequest(0.0, 33, 4, 9, 2.0, 1.5) for _ in range(3)] + [WindowRequest(0.0, 38, 4, 11, 2.0, 1.5)]
    pred = ReplayPredictor({1: 10, 2: 40}, UnitTime(), lambda p, o: (2.0, 1.5),
                           SimConfig(block_size=4, max_batched_tokens=None))
    assert pred.attainment(1, 2, w) == pytest.approx(2 / 3)
    assert pred.attainment(2, 2, w) == 1.0
    assert pred.attainment(2, 1, w) == 0.0                           # no instance of degree 2 on 1 GPU
    assert pred.slo(1, 1) == (2.0, 1.5)


def test_simulator_feeds_arrivals_to_the_policy_window():
    class Table:
        def __init__(self):
            self.windows = []

        def slo(self, prompt, output):
            return 10.0, 10.0

        def attainment(self, degree, num_gpus, window):
            self.windows.append([w.arrival for w in window])
            return {1: 0.5, 2: 1.0}[degree]
    pred = Table()
    params = PolicyParams((1, 2), {1: 10, 2: 40}, 4, min_dwell_s=0, dwell_cost_factor=0, split_delay_s=0,
                          window_s=100.0, base_every_s=50.0, min_window_requests=5)
    policy = TPPolicy(params, predictor=pred)
    res = unit_sim([1, 1], params.capacity_blocks, policy, ZeroCost()).run([(t, 8, 3) for t in range(6)])
    # the fifth arrival (step 4) fills the window: base TP2 predicted better, the two TP1s merge at once
    assert pred.windows[0] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert res.decisions[0] == (4.0, Merge((0, 1), (0, 1), 2)) and policy.base == 2
    assert all(r.finish_time is not None for r in res.requests) and len(res.decisions) == 1
