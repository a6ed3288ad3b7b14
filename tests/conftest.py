"""Shared multi-rank pools: one process group per world size for the whole session (start-up costs seconds).

--transport sets AMOEBA_TRANSPORT, the data path of every retp call that does not name one (the rank processes
inherit it): "auto" (default: the same-host transport on this machine) or "torch" (gloo point-to-point), so the
whole suite runs through either."""
import os

import pytest

from amoeba_core.launch import RankPool

_pools = {}


def get_pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or not pool._procs:  # a timed-out (or fault-injected) pool was torn down: start a fresh one
        pool = _pools[world_size] = RankPool(world_size, timeout_s=120, pg_timeout_s=60)
        pool.run(_ready)  # wait for the process group here, not inside a test's time limit
    return pool


def _ready(rank, world_size):
    return rank


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (long fuzz and fault runs)")
    parser.addoption("--transport", choices=("auto", "torch", "samehost"), default=None,
                     help="default data path of retp calls in the tests (sets AMOEBA_TRANSPORT)")


def pytest_configure(config):
    if config.getoption("--transport"):
        os.environ["AMOEBA_TRANSPORT"] = config.getoption("--transport")


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
