"""Shared multi-rank pools: one process group per world size for the whole session (start-up costs seconds)."""
import pytest

from amoeba_core.launch import RankPool

_pools = {}


def get_pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or not pool._procs:  # a timed-out (or fault-injected) pool was torn down: start a fresh one
        pool = _pools[world_size] = RankPool(world_size, timeout_s=120, pg_timeout_s=60)
    return pool


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (long fuzz and fault runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pools():
    yield get_pool
    for pool in _pools.values():
        pool.close()
