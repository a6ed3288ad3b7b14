"""The reference engine on the integration interfaces (issue 15): an nn.Module model, block tables and the prefix
cache index handed to retp by one rank per instance, a prefix cache that survives merges and splits (same bytes,
index rewritten, later requests hit it), and tokens equal to the TP=1 run."""
import random

import pytest

from amoeba_core.reference import run_generation

import reference_fns as F

pytestmark = pytest.mark.timeout(240)
MAX_NEW = 8
ARRIVALS = [0, 0, 0, 0, 3, 4, 6, 7]  # half the prompts arrive after the first merge or split


def shared_prefix_prompts(n=8, system=9, seed=1):
    """A 9-token system prompt (two full blocks of 4) shared by every prompt, then 1-6 own tokens."""
    rng = random.Random(seed)
    head = [rng.randrange(300) for _ in range(system)]
    return [head + [rng.randrange(300) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def generate(pool, schedule, **kw):
    kw.setdefault("config", F.LLAMA)
    return pool.run(run_generation, prompts=shared_prefix_prompts(), max_new_tokens=MAX_NEW, schedule=schedule,
                    arrivals=ARRIVALS, record_logits=True, **kw)


@pytest.fixture(scope="module")
def baseline(pools):
    """TP1 instances without a prefix cache: every prompt computed in full."""
    return generate(pools(4), [(4, 1)])


@pytest.mark.parametrize("scheduler_tp_rank", [0, 1])
def test_prefix_cache_survives_merges_and_splits(pools, baseline, scheduler_tp_rank):
    results = generate(pools(4), F.WAVE, prefix_caching=True, scheduler_tp_rank=scheduler_tp_rank)
    assert results[0]["tokens"] == baseline[0]["tokens"]
    for got, ref in zip(results[0]["logits"], baseline[0]["logits"]):
        assert F.max_rel_diff(got, ref) < 1e-4
    F.check_transitions(results, len(F.WAVE) - 1)  # every live and every cached block checked byte for byte
    for k in range(len(F.WAVE) - 1):
        assert all(r["transitions"][k]["cached_blocks"] > 0 for r in results), k
    # Requests admitted after the transitions reused the moved cache: the hit count kept growing after the last
    # merge and after the last split.
    merge, split = results[0]["transitions"][1], results[0]["transitions"][3]
    assert merge["to"] == "1x4" and split["to"] == "4x1"
    hits = {r["rank"]: r["prefix_hit_tokens"] for r in results}
    assert any(hits[r["rank"]] > r["transitions"][3]["prefix_hit_tokens"] for r in results)
    assert any(r["transitions"][3]["prefix_hit_tokens"] > r["transitions"][1]["prefix_hit_tokens"]
               for r in results)


def test_prefix_cache_after_failed_transformations(pools, baseline):
    """Faults in the middle of a KV move and of a weight move: cached blocks a partial move may have overwritten
    leave the index (the rest stay and are checked), and the tokens still equal the TP=1 run."""
    faults = [(2, 2, "move.kv", 2), (3, 0, "move.weights", 20)]  # small pools: the split overwrites live blocks
    results = generate(pools(4), F.WAVE, prefix_caching=True, faults=faults, num_blocks=10, scratch_bytes=8192)
    assert results[0]["tokens"] == baseline[0]["tokens"]
    for r in results:
        assert [t["failed"] for t in r["transitions"]][2:] == ["TransformationFailed"] * 2
        for t in r["transitions"]:
            assert t["verified"], (t["from"], t["to"], t["bad_weights"][:3], t["bad_kv"][:3])
        # The failed KV move damaged cached blocks: they left the index (the others were checked, intact).
        assert r["transitions"][2]["cached_dropped"] > 0 and r["transitions"][2]["cached_blocks"] > 0
