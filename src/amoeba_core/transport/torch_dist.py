"""Point-to-point transport over a torch.distributed process group (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import failpoints
from .control import ControlChannel, PeerFailure

# Messages of an exchange that was given up (a peer failed or timed out) may still be completed by the
# communication library later: their buffers must outlive them. Entries are dropped once their wait has returned.
_ABANDONED: List[tuple] = []


def _prune_abandoned() -> None:
    _ABANDONED[:] = [e for e in _ABANDONED if e[0] is not None and not e[0].is_set()]


class ExchangeTimeout(Exception):
    """Internal: an exchange did not complete within the timeout and no peer reported a failure."""

    def __init__(self, peers, timeout_s):
        self.peers = sorted(peers)
        super().__init__(f"an exchange with ranks {self.peers} did not complete within {timeout_s} s")


class _Waiter:
    """Waits on works in a helper thread: a gloo wait() cannot be interrupted (and a timed wait() leaves the
    receive unusable), so the calling thread keeps watching for peer failures and its deadline meanwhile."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="amoeba-p2p-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wait_one(*self._jobs.get())

    @staticmethod
    def _wait_one(works, done, error) -> None:
        """A function of its own: its locals (the works, which hold the round's buffers: scratch, shards) are gone
        once it returns, not kept alive by the loop until the next job."""
        try:
            for w in works:
                w.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            error.append(e)
        done.set()

    def submit(self, works):
        done, error = threading.Event(), []
        self._jobs.put((works, done, error))
        return done, error


_WAITER: Optional[tuple] = None  # (pid, _Waiter): one thread per process, not one per call


def _waiter() -> _Waiter:
    global _WAITER
    if _WAITER is None or _WAITER[0] != os.getpid():  # a forked child has no thread: start its own
        _WAITER = (os.getpid(), _Waiter())
    return _WAITER[1]


class TorchDistTransport:
    """One exchange per round: every rank posts all its sends and receives at once (batched isend/irecv).

    group:          the process group; peers are group ranks
    control:        the call's ControlChannel (peer failures, P2P tag); None: plain blocking waits, tag 0
    timeout_s:      the longest one exchange may wait for its peers (default: control.timeout_s)
    stage_via_host: copy CUDA buffers through pinned host memory (for gloo groups holding CUDA tensors, e.g.
                    several ranks on one GPU, where NCCL refuses); with NCCL leave False: no host round trip
    Counts the bytes it moves: bytes_sent / bytes_received (this rank, all rounds), bytes_from[peer]. On NCCL a
    wait that gives up aborts the communicator (`aborted` becomes True): nothing else can cancel a posted NCCL receive.
    """

    pulls = False  # runs programs with messages (planning with pull=False)

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *, control: Optional[ControlChannel] = None,
                 timeout_s: Optional[float] = None, stage_via_host: bool = False):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.control = control
        self.timeout_s = timeout_s if timeout_s is not None else (control.timeout_s if control else None)
        self.stage_via_host = stage_via_host
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_from = [0] * self.world_size  # received, per peer
        self.messages = 0
        self.aborted = False
        self.on_progress = None  # called after every completed exchange (the NCCL watchdog's kick)
        self._host = {"send": None, "recv": None}
        _prune_abandoned()

    def _global(self, group_rank: int) -> int:
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    # ---- host staging ----------------------------------------------------------------------------------------
    @property
    def host_staging_bytes(self) -> int:
        return sum(b.numel() for b in self._host.values() if b is not None)

    def reserve_staging(self, send_bytes: int, recv_bytes: int) -> int:
        """Allocate the pinned host staging buffers up front (the prepare phase), so that an allocation failure
        happens before anything moves. Returns the bytes reserved (0 unless stage_via_host)."""
        if self.stage_via_host:
            self._host_buffer("send", send_bytes)
            self._host_buffer("recv", recv_bytes)
        return self.host_staging_bytes

    def _host_buffer(self, key: str, n: int) -> torch.Tensor:
        buf = self._host[key]
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._host[key] = buf
        return buf[:n]

    def _stage(self, key: str, messages):
        """Pinned host buffers for `messages` [(peer, device buffer)]: returns [(peer, host slice)]."""
        host = self._host_buffer(key, sum(t.numel() for _, t in messages))
        out, offset = [], 0
        for peer, t in messages:
            out.append((peer, host[offset:offset + t.numel()]))
            offset += t.numel()
        return out

    # ---- exchange --------------------------------------------------------------------------------------------
    def exchange(self, sends, recvs) -> None:
        """Post every send and receive at once; return when all are done.

        sends, recvs: [(peer, buffer), ...] with contiguous uint8 buffers. Several messages to one peer are matched
        in list order, so both sides must list them in the same order (the plan does).
        Raises PeerFailure when another rank reports a failure meanwhile, ExchangeTimeout after timeout_s.
        """
        if not sends and not recvs:
            return
        send_bufs, recv_bufs = sends, recvs
        if self.stage_via_host:
            send_bufs, recv_bufs = self._stage("send", sends), self._stage("recv", recvs)
            for (_, h), (_, t) in zip(send_bufs, sends):
                h.copy_(t)
        tag = self.control.tag if self.control is not None else 0
        ops = [dist.P2POp(dist.isend, t, self._global(p), self.group, tag) for p, t in send_bufs]
        ops += [dist.P2POp(dist.irecv, t, self._global(p), self.group, tag) for p, t in recv_bufs]
        works = dist.batch_isend_irecv(ops)
        buffers = (send_bufs, recv_bufs, sends, recvs)
        try:
            failpoints.hit("move.posted")
        except BaseException:
            self.give_up(works, threading.Event(), buffers)  # never set: kept for the life of the process
            raise
        self._wait(works, {p for p, _ in sends} | {p for p, _ in recvs}, buffers)
        if self.stage_via_host:
            for (_, t), (_, h) in zip(recvs, recv_bufs):
                t.copy_(h)
        self.bytes_sent += sum(t.numel() for _, t in sends)
        self.bytes_received += sum(t.numel() for _, t in recvs)
        for p, t in recvs:
            self.bytes_from[p] += t.numel()
        self.messages += len(ops)
        if self.on_progress is not None:
            self.on_progress()

    def connect(self, device: torch.device) -> None:
        """NCCL: make sure the group's communicator exists before the first batched point-to-point round (its first
        operation must involve every rank, and a rank with nothing to send in round 0 would not take part). A tiny
        all-reduce, waited on like an exchange. Nothing to do for gloo."""
        if self.backend != "nccl":
            return
        work = dist.all_reduce(torch.zeros(1, device=device), group=self.group, async_op=True)
        self._wait([work], set(range(self.world_size)) - {self.rank}, ())

    def _wait(self, works, peers, buffers) -> None:
        if self.control is None:
            for w in works:
                w.wait()
            return
        deadline = time.monotonic() + self.timeout_s
        if self.backend == "nccl":
            done, error = None, []
            finished = lambda: all(w.is_completed() for w in works)  # noqa: E731 - CUDA event queries
        else:
            done, error = _waiter().submit(works)
            finished = done.is_set
        delay = 2e-5
        try:
            while not finished():
                self.control.poll()
                if time.monotonic() > deadline:
                    raise ExchangeTimeout(peers, self.timeout_s)
                if done is not None:
                    done.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(2 * delay, 0.01)
        except (PeerFailure, ExchangeTimeout):
            self.give_up(works, done, buffers)
            raise
        if error:
            raise error[0]
        if self.backend == "nccl":
            for w in works:
                w.wait()  # orders the current stream after the NCCL stream

    def give_up(self, works=(), done=None, buffers=()) -> None:
        """Stop waiting: keep the buffers of unfinished messages alive, and abort an NCCL communicator (its
        posted receives would otherwise wait forever and block every later operation on the group)."""
        global _WAITER
        _prune_abandoned()
        _ABANDONED.append((done, list(works), buffers))
        if done is not None and not done.is_set():
            _WAITER = None  # its thread may wait on these works for a long time: later exchanges get a fresh one
        if self.backend == "nccl" and not self.aborted:
            self.abort()

    def abort(self) -> None:
        """Abort the group's communicator (NCCL); the group is unusable afterwards."""
        self.aborted = True
        dist.distributed_c10d._abort_process_group(self.group)
