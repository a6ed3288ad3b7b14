"""Random Llama-style models (GQA with KV-head replication, vocabularies that are not multiples of 64, tied or not,
biases, every supported weight dtype), random KV layouts and fragmented pools with shared prefixes, random schedules
of degrees: after every retp each rank's weights and live KV blocks are checked bit for bit against expectations
computed without the library's layout or KV code (tests/independent.py). A few seeds by default; --slow runs many."""
import pytest

import fuzz_fns

WORLD = 4


def run(pools, seed):
    results = pools(WORLD).run(fuzz_fns.fuzz_case, seed)
    cfg, schedule, kv, _ = fuzz_fns.fuzz_setup(seed, WORLD)
    for rank, bad in enumerate(results):
        assert bad == [], f"seed {seed} ({cfg}, schedule {schedule}, {kv}) rank {rank}: {bad[:5]}"


@pytest.mark.parametrize("seed", range(20))
def test_fuzz(pools, seed):
    run(pools, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 500))
def test_fuzz_long(pools, seed):
    run(pools, seed)
