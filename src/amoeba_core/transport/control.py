"""The control path of a retp call: agreement, failure reports and the commit point, over the group's key-value store.

Bytes move over the data path (transport.torch_dist); everything ranks must agree on travels here, through the
c10d store the process group was built with (TCPStore, FileStore, ...), never through a collective on the group
itself. A store wait can be bounded and interleaved with other checks, a collective cannot: a rank that raises
before a collective, dies, or hangs would leave its peers blocked until the process group's own timeout (30 minutes
by default). Keys live under amoeba/<group>/<call>/ and each rank deletes its own keys of the previous call once
every rank has reached the next one.

Every rank must call retp the same number of times on a group object: the call number is part of the key prefix and
of the point-to-point tag, so messages of an abandoned call never match those of a later one. A group rebuilt after a
failure (a new group object) starts again at call 1 on every rank; give it a fresh store (or a new group name), so
that keys a failed call of the old group left behind cannot be mistaken for the new group's.

The call's outcome is decided once, atomically, in the store (decide()): a rank that saw every confirmation commits,
a rank that gives up aborts, whichever comes first wins, and every rank acts on that one decision.
"""
from __future__ import annotations

import functools
import hashlib
import pickle
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist

# group object -> number of retp calls made on it by this process. Keyed by the object, not its name: torch reuses
# group names after destroy_process_group(), and a rebuilt group must start counting afresh on every rank.
_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PHASE_KEYS = ("validate", "prepare", "confirm", "damage", "fail")
# Polling a store for peers' keys: the first wait is short, later ones double up to the cap. A waiting rank notices
# the last arrival at most this late; a poll costs a few store operations (microseconds on a FileStore, one round
# trip each on a TCPStore), so a 1 ms cap keeps both the latency and the load of idle waiters small.
_POLL_FIRST_S, _POLL_CAP_S = 5e-5, 1e-3


class PeerFailure(Exception):
    """Internal: another rank reported a failure, or ranks stopped answering within the timeout.

    failures:    failure records ({"rank", "phase", "type", "message", "amoeba"}) in rank order
    unresponsive: ranks that neither answered nor reported within the timeout
    """

    def __init__(self, failures: Sequence[dict] = (), unresponsive: Sequence[int] = (), store_error: str = ""):
        self.failures, self.unresponsive, self.store_error = list(failures), list(unresponsive), store_error
        parts = [f"rank {f['rank']} failed in phase {f['phase']}: {f['type']}: {f['message']}" for f in self.failures]
        if self.unresponsive:
            parts.append(f"ranks {self.unresponsive} did not answer within the timeout (dead or stuck)")
        if store_error:
            parts.append(f"the group's store became unreachable ({store_error})")
        super().__init__("; ".join(parts) or "a peer failed")


@functools.lru_cache(maxsize=None)
def build_identity() -> str:
    """Version + sha256 of the package's Python sources and compiled extension: ranks compare it before moving."""
    from .. import __version__, _C
    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    h.update(Path(_C.__file__).read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


def _group_store(group) -> dist.Store:
    try:
        return dist.distributed_c10d._get_process_group_store(group)
    except (KeyError, AttributeError, RuntimeError):
        return dist.distributed_c10d._get_default_store()


class ControlChannel:
    """One retp call's control path for this rank.

    group:     the process group of the call; store: the key-value store to use (default: the group's own)
    timeout_s: the longest any wait for peers may take
    """

    def __init__(self, group, timeout_s: float, store: Optional[dist.Store] = None):
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.timeout_s = float(timeout_s)
        name = getattr(group, "group_name", "") or "default"
        self.call = _CALLS[group] = _CALLS.get(group, 0) + 1
        self._base = store if store is not None else _group_store(group)
        self._group_prefix = f"amoeba/{name}/"
        self.store = dist.PrefixStore(f"{self._group_prefix}{self.call}/", self._base)
        self._lock = threading.Lock()  # the watchdog thread polls the store too
        self._written: List[str] = []

    @property
    def tag(self) -> int:
        """Point-to-point tag of this call (gloo matches on it; NCCL ignores it)."""
        return self.call % (1 << 30)

    # ---- store access ----------------------------------------------------------------------------------------
    def _op(self, fn: Callable, *args):
        try:
            with self._lock:
                return fn(*args)
        except Exception as e:  # noqa: BLE001 - a dead store host (rank 0 of a TCPStore) surfaces here
            raise PeerFailure(store_error=f"{type(e).__name__}: {e}") from None

    def _set(self, key: str, value) -> None:
        self._op(self.store.set, key, pickle.dumps(value))
        self._written.append(key)

    def failed(self) -> bool:
        """Has any rank reported a failure in this call? One store round trip (a check: nothing is written, so
        polling does not grow a FileStore)."""
        return self._op(self.store.check, ["nfail"])

    def failures(self) -> List[dict]:
        out = []
        for r in range(self.world):
            key = f"fail/{r}"
            if self._op(self.store.check, [key]):
                out.append(pickle.loads(self._op(self.store.get, key)))
        return out

    def poll(self) -> None:
        """Raise PeerFailure if another rank reported a failure."""
        if self.failed():
            raise PeerFailure(self.failures())

    # ---- verbs -----------------------------------------------------------------------------------------------
    def exchange(self, phase: str, payload) -> list:
        """Publish this rank's payload for `phase` and return every rank's (indexed by group rank), once all have
        published. Raises PeerFailure as soon as a rank reports a failure, or when timeout_s passes first."""
        self._set(f"{phase}/{self.rank}", payload)
        keys = [f"{phase}/{r}" for r in range(self.world)]
        deadline = time.monotonic() + self.timeout_s
        delay = _POLL_FIRST_S
        while not self._op(self.store.check, keys):
            try:
                self.poll()
            except PeerFailure:
                # Every rank may have published meanwhile (and one of them failed later, in the next phase): then
                # this phase is complete, and the failure is met where it happened.
                if not self._op(self.store.check, keys):
                    raise
                break
            if time.monotonic() > deadline:
                missing = [r for r in range(self.world) if not self._op(self.store.check, [keys[r]])]
                raise PeerFailure(self.failures(), unresponsive=missing)
            time.sleep(delay)
            delay = min(2 * delay, _POLL_CAP_S)
        return [pickle.loads(v) for v in self._op(self.store.multi_get, keys)]

    def collect(self, phase: str, payload, ranks: Sequence[int], timeout_s: float) -> Dict[int, object]:
        """Publish this rank's payload and gather those of `ranks` that arrive within timeout_s (failure path:
        never raises for peers; a rank that does not answer is simply missing from the result)."""
        try:
            self._set(f"{phase}/{self.rank}", payload)
        except PeerFailure:
            return {self.rank: payload}
        deadline = time.monotonic() + timeout_s
        out: Dict[int, object] = {}
        pending = [r for r in ranks]
        delay = 1e-4
        while True:
            for r in list(pending):
                try:
                    if self._op(self.store.check, [f"{phase}/{r}"]):
                        out[r] = pickle.loads(self._op(self.store.get, f"{phase}/{r}"))
                        pending.remove(r)
                except PeerFailure:
                    return out
            if not pending or time.monotonic() > deadline:
                return out
            time.sleep(delay)
            delay = min(2 * delay, 0.01)

    def decide(self, outcome: str) -> str:
        """The call's one outcome: the first rank to decide sets it ("commit": it saw every rank confirm; "abort":
        it gives up), later ones get it. Returns the stored decision."""
        value = self._op(self.store.compare_set, "decision", "", outcome)
        return value.decode() if isinstance(value, bytes) else str(value)

    def report_failure(self, phase: str, error: BaseException) -> dict:
        """Tell every rank that this one failed (first report of this rank wins). Never raises."""
        from ..errors import AmoebaError
        record = {"rank": self.rank, "phase": phase, "type": type(error).__name__, "message": str(error),
                  "amoeba": isinstance(error, AmoebaError)}
        try:
            if self._op(self.store.add, f"failed/{self.rank}", 1) == 1:
                self._set(f"fail/{self.rank}", record)
                self._op(self.store.add, "nfail", 1)
        except PeerFailure:
            pass
        return record

    def forget_previous_call(self) -> None:
        """Delete this rank's keys of the previous call (safe once every rank has reached this one)."""
        if self.call < 2:
            return
        prev = dist.PrefixStore(f"{self._group_prefix}{self.call - 1}/", self._base)
        keys = [f"{p}/{self.rank}" for p in _PHASE_KEYS] + [f"failed/{self.rank}"]
        if self.rank == 0:
            keys += ["nfail", "decision"]
        for key in keys:
            try:
                with self._lock:
                    if prev.check([key]):
                        prev.delete_key(key)
            except Exception:  # noqa: BLE001 - housekeeping only
                return


class Watchdog:
    """A thread that calls `abort()` when the rank makes no progress for timeout_s or a peer reports a failure.

    For communicators that never return an error on their own (NCCL: a peer that died leaves the others' kernels
    waiting forever, and a host thread synchronising on them blocks with them). The executor calls kick() after
    every completed exchange. After it fires, `fired` holds the reason and the communicator is unusable.
    """

    def __init__(self, control: ControlChannel, timeout_s: float, abort: Callable[[], None], poll_s: float = 0.05):
        self.control, self.timeout_s, self.abort, self.poll_s = control, timeout_s, abort, poll_s
        self.fired: Optional[str] = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amoeba-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def kick(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            reason = None
            try:
                if self.control.failed():
                    reason = "a peer reported a failure"
            except PeerFailure as e:
                reason = str(e)
            if reason is None and time.monotonic() - self._last > self.timeout_s:
                reason = f"no progress for {self.timeout_s} s"
            if reason is not None:
                self.fired = reason
                try:
                    self.abort()
                finally:
                    return
