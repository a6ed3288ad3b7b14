"""Same-host transport: every rank reads the bytes it receives straight out of its peers' memory.

Data path. The receiver copies each incoming box from the sender's buffer to its final place in one pass, with no
packing on the sender, no scratch for the transfer and no sender-side work:
  CPU tensors   Linux cross-memory attach (process_vm_readv, driven by the C++ engine with the boxes as iovecs:
                _C.pull_boxes). Every CPU tensor takes this route, whatever allocated it (torch's allocator, the
                elastic pool's memfd mapping): no shared mapping has to be set up in advance.
  CUDA tensors  CUDA IPC: each rank exports its buffers' handles (torch's cudaIpcGetMemHandle wrapper, so caching
                allocator memory only; the elastic pool's VMM memory is not exportable this way and stays on the
                torch.distributed transport) and the receiver's box kernel reads peer memory directly (P2P over
                NVLink, or the same device for several processes sharing one GPU).

Control path. Every rank keeps one counter in its own memory: the number of rounds it has finished reading. After
its pulls of a round a rank raises its counter; before writing anything a peer might still read (Round.readers, as
the plan says) it waits until each of those readers' counters has reached the round, reading them with the same
cross-memory attach. A reader that died makes the read fail at once (ESRCH); a stuck one runs into timeout_s; a
failure reported on the control channel is noticed while waiting. Nothing else synchronises the ranks: no barrier
per round, none per box.

Buffers are published once per call, in the validate agreement (PeerBuffers): name -> address and size (CPU) or
IPC handle (CUDA). Weight shards are named "w/<weights dict key>", KV buffers "kv/<layer>/<b>".
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import _C, failpoints
from .control import ControlChannel
from .torch_dist import ExchangeTimeout


class PeerGone(Exception):
    """Internal: a peer's memory can no longer be read (its process exited, or access was withdrawn)."""

    def __init__(self, peers, message: str):
        self.peers = sorted(peers)
        super().__init__(message)


@dataclass(frozen=True)
class HostIdentity:
    """What decides whether two ranks can read each other's memory: same kernel instance (boot id), same PID
    namespace (process ids mean the same process) and the same user."""

    hostname: str
    boot_id: str
    pid_namespace: int
    uid: int

    @staticmethod
    def here() -> "HostIdentity":
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = ""
        try:
            pid_ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            pid_ns = -1
        return HostIdentity(socket.gethostname(), boot_id, pid_ns, os.getuid())

    def shared_with(self, other: "HostIdentity") -> bool:
        return bool(self.boot_id) and self.pid_namespace >= 0 and self == other


def publish(weights: Dict[str, torch.Tensor], kv_buffers: List[List[torch.Tensor]], counter: np.ndarray) -> dict:
    """This rank's payload for its peers: pid, counter address and its buffers. CPU: (address, bytes); CUDA: the
    picklable IPC export of torch.multiprocessing (the receiving rank rebuilds a tensor on the peer's memory)."""
    buffers = {f"w/{name}": t for name, t in weights.items()}
    for layer, bufs in enumerate(kv_buffers):
        buffers.update((f"kv/{layer}/{b}", t) for b, t in enumerate(bufs))
    return {"pid": os.getpid(), "counter": int(counter.ctypes.data),
            "buffers": {name: _export(t) for name, t in buffers.items()}}


def _export(t: torch.Tensor):
    if t.device.type == "cpu":
        return ("cpu", t.data_ptr(), t.numel() * t.element_size())
    from torch.multiprocessing.reductions import reduce_tensor
    flat = t.reshape(-1).view(torch.uint8)
    return ("cuda",) + reduce_tensor(flat)


def _import(entry):
    if entry[0] == "cpu":
        return entry[1], entry[2]
    rebuild, args = entry[1], entry[2]
    return rebuild(*args)  # a uint8 tensor on the peer's memory, opened through CUDA IPC


@dataclass
class SameHostTransport:
    """The pull transport of one call on one rank.

    rank, world: group rank and size; peers: every rank's publish() payload (indexed by group rank); counter: this
    rank's published counter (a 1-element int64 array that lives as long as the call); control: the call's
    ControlChannel (failure reports while waiting); timeout_s: the longest one wait for readers may take.
    Counts: bytes_received (pulled), bytes_from[peer], bytes_sent (what this rank's readers were to read, per the
    plan: a pull is invisible to the rank it reads from), rounds (finished), waits (rounds that had readers).
    """

    rank: int
    world: int
    peers: List[dict]
    counter: np.ndarray
    control: Optional[ControlChannel] = None
    timeout_s: float = 30.0
    bytes_received: int = 0
    bytes_sent: int = 0
    bytes_from: List[int] = field(default_factory=list)
    rounds: int = 0
    waits: int = 0
    backend: str = "samehost"
    aborted: bool = False
    on_progress: Optional[Callable[[], None]] = None
    host_staging_bytes: int = 0
    pulls: bool = True  # runs programs built with pull=True

    def __post_init__(self):
        self.bytes_from = [0] * self.world
        self._opened: Dict[tuple, object] = {}

    # ---- setup -----------------------------------------------------------------------------------------------
    def probe(self, ranks) -> None:
        """Read each of `ranks`' counters once (the prepare phase): a permission or namespace problem surfaces
        before anything moves. Raises PeerGone."""
        for r in ranks:
            self._peek(r)

    def reserve_staging(self, send_bytes: int, recv_bytes: int) -> int:
        return 0

    def connect(self, device) -> None:
        pass  # the prepare phase synchronised the device: peers may read as soon as everyone agreed to move

    def give_up(self, *args) -> None:
        pass

    # ---- data path -------------------------------------------------------------------------------------------
    def remote(self, peer: int, name: str):
        """(address, bytes) of a CPU peer buffer, or a tensor on a CUDA peer buffer."""
        key = (peer, name)
        if key not in self._opened:
            entry = self.peers[peer]["buffers"].get(name)
            if entry is None:
                raise KeyError(f"rank {peer} published no buffer {name!r}")
            self._opened[key] = _import(entry)
        return self._opened[key]

    def pull(self, pulls, buffers, remote_name: Callable[[str], str]) -> None:
        """Run the Pulls of one round: boxes from the peers' buffers (remote_name maps a program buffer name to
        the published one) into `buffers` (name -> flat uint8 tensor)."""
        from ..execution.copy import copy_boxes
        for p in pulls:
            local = buffers[p.dst]
            source = self.remote(p.peer, remote_name(p.src))
            if local.device.type == "cpu":
                address, size = source
                try:
                    n = _C.pull_boxes(self.peers[p.peer]["pid"], address, size, local.data_ptr(),
                                      local.numel(), p.boxes)
                except _C.PullError as e:
                    raise PeerGone([p.peer], f"reading from rank {p.peer} failed: {e}") from None
            else:
                copy_boxes(local, source, p.boxes)
                n = p.nbytes
            self.bytes_received += n
            self.bytes_from[p.peer] += n
        if pulls and buffers[pulls[0].dst].device.type == "cuda":
            torch.cuda.current_stream(buffers[pulls[0].dst].device).synchronize()  # read before saying so
        if pulls:
            failpoints.hit("move.posted")

    def end_round(self, readers: List[int], lent_bytes: int) -> None:
        """This rank finished reading the round: say so, then wait for its `readers` to say the same (every rank
        calls this once per round, in the plan's round order)."""
        self.rounds += 1
        self.counter[0] = self.rounds
        self.bytes_sent += lent_bytes
        if readers:
            self.waits += 1
            self._wait(readers, self.rounds)
        if self.on_progress is not None:
            self.on_progress()

    def exchange(self, sends, recvs) -> None:
        raise RuntimeError("the same-host transport runs pull programs: plan with pull=True")

    # ---- waiting ---------------------------------------------------------------------------------------------
    def _peek(self, peer: int) -> int:
        info = self.peers[peer]
        try:
            return _C.peek_int64(info["pid"], info["counter"])
        except _C.PullError as e:
            raise PeerGone([peer], f"rank {peer} cannot be read: {e}") from None

    def _wait(self, readers: List[int], target: int) -> None:
        pending = list(readers)
        start = time.monotonic()
        deadline, next_poll = start + self.timeout_s, start
        delay = 1e-5
        while True:
            pending = [r for r in pending if self._peek(r) < target]
            if not pending:
                return
            now = time.monotonic()
            if self.control is not None and now >= next_poll:
                self.control.poll()  # a store round trip: at most every 5 ms
                next_poll = now + 0.005
            if now > deadline:
                raise ExchangeTimeout(pending, self.timeout_s)
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
