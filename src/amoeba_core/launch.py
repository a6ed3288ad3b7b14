"""A pool of CPU ranks (one process each, gloo) that runs functions on every rank; used by tests, demo and bench.

Starting a process group costs seconds, so one pool serves many calls. Every wait is bounded: a rank that raises
returns its exception; a rank that hangs makes run() raise TimeoutError and the pool is torn down.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch.multiprocessing as mp


class RankError(RuntimeError):
    """An exception raised on a rank, re-raised in the parent with the rank's traceback."""

    def __init__(self, rank: int, exc: BaseException, tb: str):
        super().__init__(f"rank {rank} raised {type(exc).__name__}: {exc}\n{tb}")
        self.rank, self.exc = rank, exc


def _worker(rank: int, world_size: int, store_path: str, pg_timeout_s: float, tasks, results, threads: int,
            backend: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from .execution.copy import set_copy_threads
    set_copy_threads(threads)  # ranks sharing the host share its cores (the copy pool defaults to all of them)
    store = dist.FileStore(store_path, world_size)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(rank, world_size, *args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            results.put((rank, False, (e, traceback.format_exc())))
    # Skip destroy_process_group() and interpreter teardown: both can wait on peers that are already gone.
    os._exit(0)


@dataclass
class Outcome:
    """How one rank's call ended: status "ok" (value = the return value), "error" (value = the exception, tb its
    traceback), "dead" (value = exit code) or "hung" (no answer in time); seconds: when it ended, from the start."""

    rank: int
    status: str
    value: Any
    tb: Optional[str]
    seconds: Optional[float]


class RankPool:
    """world_size ranks in child processes (gloo by default; "nccl" puts rank r on GPU r % device_count).
    run(fn, *args) calls fn(rank, world_size, *args) on each rank and returns the list of results by rank (fn and
    args must be picklable: module-level functions)."""

    def __init__(self, world_size: int, *, timeout_s: float = 120.0, pg_timeout_s: Optional[float] = None,
                 threads_per_rank: int = 1, backend: str = "gloo"):
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="amoeba_pool_")
        store = os.path.join(self._dir, "store")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, store, pg_timeout_s or timeout_s, self._tasks[r],
                                         self._results, threads_per_rank, backend))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> List[Any]:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: List[Any] = [None] * self.world_size
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=self.timeout_s)
            except Exception:  # queue.Empty: a rank hangs or died
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__} did not finish on every rank within {self.timeout_s} s "
                                   f"(dead ranks: {dead})") from None
            if ok:
                out[rank] = value
            else:
                failures.append((rank, *value))
        if failures:
            # A rank that fails first often leaves its peers timing out in a collective: report the cause.
            def is_timeout(f):
                return "timed out" in str(f[1]).lower() or "timeout" in type(f[1]).__name__.lower()
            rank, exc, tb = sorted(failures, key=lambda f: (is_timeout(f), f[0]))[0]
            raise RankError(rank, exc, tb)
        return out

    def run_outcomes(self, fn: Callable, *args: Any, wait_s: Optional[float] = None, **kwargs: Any) -> List[Outcome]:
        """Like run(), for runs where ranks may raise, die or hang on purpose (fault-injection tests): returns one
        Outcome per rank instead of raising. Waits until every rank has answered or died, or wait_s (default
        timeout_s) has passed; ranks still silent then are "hung". A pool that lost or left behind a rank is torn
        down (its process group is broken); make a new one."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        start = time.monotonic()
        deadline = start + (wait_s if wait_s is not None else self.timeout_s)
        out: List[Optional[Outcome]] = [None] * self.world_size
        while any(o is None for o in out) and time.monotonic() < deadline:
            try:
                rank, ok, value = self._results.get(timeout=0.05)
            except Exception:  # queue.Empty
                for r, p in enumerate(self._procs):
                    if out[r] is None and not p.is_alive():
                        out[r] = Outcome(r, "dead", p.exitcode, None, time.monotonic() - start)
                continue
            elapsed = time.monotonic() - start
            out[rank] = Outcome(rank, "ok", value, None, elapsed) if ok else \
                Outcome(rank, "error", value[0], value[1], elapsed)
        out = [o if o is not None else Outcome(r, "hung", None, None, None) for r, o in enumerate(out)]
        if any(o.status in ("dead", "hung") for o in out):
            self.close(force=True)
        return out

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            deadline = time.monotonic() + 5
            for p in self._procs:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)
