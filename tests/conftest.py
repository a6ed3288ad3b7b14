"""Shared multi-rank pools: one process group per world size for the whole session (start-up costs seconds)."""
import pytest

from amoeba_core.launch import RankPool

_pools = {}


def get_pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or not pool._procs:  # a timed-out pool was torn down: start a fresh one
        pool = _pools[world_size] = RankPool(world_size, timeout_s=120, pg_timeout_s=60)
    return pool


@pytest.fixture(scope="session")
def pools():
    yield get_pool
    for pool in _pools.values():
        pool.close()
