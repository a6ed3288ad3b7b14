"""The failure contract (README "When things go wrong"): whatever fails on whichever rank, every rank raises a typed
error within timeout_s (plus a small margin), none returns success while another failed, a failure before the move
phase leaves every byte unchanged, and after it the damage report matches the bytes every rank holds."""
import random

import pytest

import amoeba_core as A
from amoeba_core.verify import random_sequences

import fault_fns
from models import GQA

WORLD = 4
MODEL = dict(GQA, num_key_value_heads=4)
KV = dict(engine="vllm_flash_attn", order="NHD", num_layers=2, num_kv_heads=4, head_dim=8, block_size=4,
          dtype="float32")
NUM_BLOCKS = 32
TIMEOUT_S = 4.0
MARGIN_S = A.api.DAMAGE_GRACE_S + 4.0  # damage-report gathering, process scheduling on a loaded 2-core machine

# (old degree, new degree): a merge and a split, both moving weights and KV.
TRANSITIONS = [(2, 4), (4, 1)]


def sequences(old_degree, seed=0):
    return random_sequences(WORLD // old_degree, NUM_BLOCKS, 0.4, seed=seed)


def prefix_caches(tables, seed=0):
    """Per instance a prefix cache: two blocks live sequences hold and two they do not, keys shared across
    instances (the damage report must be exact for cached blocks too)."""
    rng = random.Random(seed)
    out = {}
    for inst, seqs in tables.items():
        live = sorted({b for t in seqs.values() for b in t})
        free = [b for b in range(NUM_BLOCKS) if b not in live]
        out[inst] = {f"key{k}": b for k, b in enumerate(rng.sample(live, 2) + rng.sample(free, 2))}
    return out


def run(pool, old_degree, new_degree, fault=None, seed=0, wait_s=TIMEOUT_S + MARGIN_S + 5, **kw):
    old = A.TPConfig.contiguous(WORLD, old_degree)
    tables = sequences(old_degree, seed)
    kw.setdefault("cached", prefix_caches(tables, seed))
    return pool.run_outcomes(fault_fns.retp_with_fault, MODEL, KV, old, new_degree, tables,
                             NUM_BLOCKS, fault=fault, timeout_s=TIMEOUT_S, wait_s=wait_s, **kw)


def check_contract(outcomes, fault, expect_moved):
    """Every rank that is alive raised a typed error in time; the damage report (identical on every rank) matches
    the bytes; returns the per-rank result dicts of the ranks that answered."""
    faulty = fault[0] if fault else None
    if fault and fault[3] == "raise":
        assert outcomes[faulty].status == "ok" and outcomes[faulty].value["fault_fired"], "the fault never fired"
    answers = []
    for o in outcomes:
        if fault and fault[3] in ("exit", "hang") and o.rank == faulty:
            assert o.status in ("dead", "hung"), (o.rank, o.status)
            continue
        assert o.status == "ok", f"rank {o.rank}: {o.status} {o.value} {o.tb}"
        r = o.value
        assert r["status"] != "ok", f"rank {o.rank} returned success although rank {faulty} failed"
        assert r["seconds"] <= TIMEOUT_S + MARGIN_S, (o.rank, r["seconds"])
        if expect_moved:
            assert r["status"] == "TransformationFailed", (o.rank, r["status"], r["message"])
            assert r["contradictions"] == [], (o.rank, r["contradictions"][:5])
        else:
            assert r["status"] == "RetpAborted", (o.rank, r["status"], r["message"])
            assert r["unchanged"], f"rank {o.rank}: bytes changed although nothing was to move"
        answers.append(r)
    if expect_moved:
        reports = {repr(r["damage"]) for r in answers}
        assert len(reports) == 1, "ranks assembled different damage reports"
    return answers


@pytest.mark.parametrize("point", ["validate", "plan", "agree", "prepare"])
def test_exception_before_moving_leaves_every_byte_unchanged(pools, point):
    fault = (2, point, 0, "raise")
    answers = check_contract(run(pools(WORLD), 2, 4, fault), fault, expect_moved=False)
    for r in answers:
        assert r["failed_rank"] == 2 and r["phase"] == point
        assert "InjectedFault" in r["message"] and "fault injected" in r["message"]


@pytest.mark.parametrize("old_degree, new_degree", TRANSITIONS)
@pytest.mark.parametrize("point, after", [("move.weights", 0), ("move.weights", 3), ("move.posted", 2),
                                          ("move.kv", 0), ("move.kv", 5), ("confirm", 0)])
def test_exception_while_moving_gives_an_exact_damage_report(pools, old_degree, new_degree, point, after):
    fault = (1, point, after, "raise")
    answers = check_contract(run(pools(WORLD), old_degree, new_degree, fault), fault, expect_moved=True)
    r = answers[0]
    assert r["failed_rank"] == 1 and "InjectedFault" in r["message"]
    if point == "move.weights" and after == 0:
        # The failing rank raised at its very first step: nothing of its own changed. (Its peers may have gone on
        # to move KV before they saw the failure; the damage report says exactly what they changed.)
        assert answers[1]["unchanged"], "the failing rank changed bytes before its first step"
    if point == "confirm":  # the KV move had finished: some cached blocks' old bytes were overwritten
        assert r["cached_lost_at_old"] > 0
    if point == "confirm":
        # The failing rank had finished moving (the others stop as soon as they see its failure).
        assert set(r["damage"][0][1].values()) <= {"new", "both"}, r["damage"][0][1]


def test_a_rank_that_dies_while_moving(pools):
    fault = (1, "move.posted", 1, "exit")
    outcomes = run(pools(WORLD), 2, 4, fault)
    answers = check_contract(outcomes, fault, expect_moved=True)
    for r in answers:
        assert 1 in r["unresponsive"], r["message"]


def test_a_rank_that_dies_before_moving(pools):
    fault = (3, "agree", 0, "exit")
    answers = check_contract(run(pools(WORLD), 4, 1, fault), fault, expect_moved=False)
    for r in answers:
        assert 3 in r["unresponsive"], r["message"]


def test_a_rank_that_hangs_is_reported_by_the_others(pools):
    fault = (3, "prepare", 0, "hang")
    answers = check_contract(run(pools(WORLD), 2, 4, fault, wait_s=TIMEOUT_S + 6), fault, expect_moved=False)
    for r in answers:
        assert 3 in r["unresponsive"] and r["seconds"] >= TIMEOUT_S * 0.9, (r["unresponsive"], r["seconds"])


@pytest.mark.parametrize("how, kind", [("no_layers", "SpecMismatchError"), ("duplicate_block", "ConfigError"),
                                       ("foreign_block_id", "RetpAborted")])
def test_bad_input_on_one_rank_raises_everywhere_quickly(pools, how, kind):
    """A malformed KV cache on one rank (including one that makes the library raise a foreign exception type)
    reaches every rank as a typed error naming the rank, long before any process-group timeout."""
    outcomes = run(pools(WORLD), 2, 4, bad_input={2: how})
    for o in outcomes:
        assert o.status == "ok", (o.status, o.value, o.tb)
        r = o.value
        assert r["status"] == kind, (o.rank, r["status"], r["message"])
        assert r["failed_rank"] == 2 and r["unchanged"] and r["seconds"] < TIMEOUT_S, r
        if o.rank != 2:
            assert "rank 2" in r["message"]


def test_the_pool_keeps_working_after_a_failed_transformation(pools):
    """After an injected exception mid-move, the same process group runs the next transformation fine (stale
    messages of the failed call carry another tag)."""
    fault = (0, "move.kv", 2, "raise")
    check_contract(run(pools(WORLD), 2, 4, fault), fault, expect_moved=True)
    for o in run(pools(WORLD), 2, 4):
        assert o.status == "ok" and o.value["status"] == "ok", (o.status, o.value)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_faults(pools, seed):
    rng = random.Random(seed)
    old_degree, new_degree = rng.choice([(1, 2), (1, 4), (2, 4), (4, 2), (4, 1), (2, 1)])
    point = rng.choice(["move.weights", "move.kv", "move.posted"])
    action = rng.choice(["raise", "raise", "exit"])
    fault = (rng.randrange(WORLD), point, rng.randrange(6), action)
    outcomes = run(pools(WORLD), old_degree, new_degree, fault, seed=seed, scratch_bytes=1 << 12)
    if all(o.status == "ok" and o.value["status"] == "ok" for o in outcomes):
        return  # the point was not reached that often: the transformation succeeded on every rank
    check_contract(outcomes, fault, expect_moved=True)


@pytest.mark.parametrize("case, kind, rank", [
    ("numpy_degree", "ok", None),
    ("zero_scratch", "ScratchBudgetError", None),
    ("negative_scratch", "ScratchBudgetError", 1),
    ("other_build", "RankDisagreementError", None),
    ("kv_on_other_device", "SpecMismatchError", 0),
    ("non_contiguous_kv", "SpecMismatchError", 2),
    ("conflicting_destinations", "ConfigError", None),
])
def test_input_checks(pools, case, kind, rank):
    """Each bad input is a typed error on every rank (naming the rank whose input it was), nothing changed;
    integer-like degrees (numpy.int64) are accepted."""
    old = A.TPConfig.contiguous(WORLD, 1)
    results = pools(WORLD).run(fault_fns.retp_input_case, MODEL, KV, old, 2, sequences(1), NUM_BLOCKS, case)
    for r, (status, message, unchanged, seconds) in enumerate(results):
        assert status == kind, (r, status, message)
        assert seconds < TIMEOUT_S, seconds
        if kind != "ok":
            assert unchanged, r
            if rank is not None and r != rank:
                assert f"rank {rank}" in message, message
    if case == "other_build":
        assert "library" in results[0][1] and "another-build" in results[0][1]
    if case == "conflicting_destinations":
        assert "give different destinations" in results[0][1]


@pytest.mark.parametrize("scenario", ["stalled", "peer_failed", "kicked"])
def test_watchdog_aborts_a_communicator_that_would_wait_forever(pools, scenario):
    """The NCCL watchdog (exercised on CPU with a stand-in abort): fires after timeout_s without progress, at once
    when a peer reports a failure, never while the rank makes progress."""
    (fired, seconds), = pools(1).run(fault_fns.watchdog_case, scenario)
    if scenario == "stalled":
        assert fired and "no progress" in fired and 0.9 <= seconds <= 3, (fired, seconds)
    elif scenario == "peer_failed":
        assert fired and "peer" in fired and seconds < 1.0, (fired, seconds)
    else:
        assert fired is None and seconds >= 2.5, (fired, seconds)


# ---- races and leaks (found in review) ---------------------------------------------------------------------------
def test_a_late_confirmation_gives_every_rank_the_same_outcome(pools):
    """One rank confirms after the others gave up: the call has one decision, so either all succeed or all raise
    (here all raise: the decision to abort was taken first)."""
    outcomes = pools(2).run(fault_fns.late_confirmation, 1, 3.0, 1.5)
    assert len(set(outcomes)) == 1, outcomes
    assert outcomes[0] == "TransformationFailed"


def test_a_rank_that_sees_a_failure_while_agreeing_to_move_still_reports_damage(pools):
    outcomes = pools(4).run(fault_fns.failure_right_after_prepare)
    assert outcomes == ["TransformationFailed"] * 4, outcomes


def test_repeated_calls_keep_no_threads_or_buffers(pools):
    for r in pools(2).run(fault_fns.repeated_calls_keep_nothing, 6):
        assert r["waiters"] <= 1 and r["old_tensors_alive"] == 0, r


def test_the_reference_engine_recovers_a_failed_elastic_merge(pools):
    for outcome, config in pools(2).run(fault_fns.engine_recovers_a_failed_elastic_merge):
        assert outcome == "TransformationFailed" and config == "2x1", (outcome, config)
