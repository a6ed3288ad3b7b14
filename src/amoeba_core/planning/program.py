"""Per-rank programs: what one rank executes, decided entirely by the plan.

A RetpPlan is the group's plan (identical on every rank); plan.program(rank) turns it into this rank's program: for
the weights and for the KV cache, a list of rounds, each a batch of copies (boxes between named buffers), the
messages of one exchange (peer, buffer, byte range, in the order both sides post them) and a batch of copies after
the exchange. The executor (execution.executor) resolves buffer names to tensors and runs the rounds; it knows no
layout and re-derives nothing, so the contract between planning and execution (scratch layout, replica choice,
order of messages) is written once, here.

Buffer names:
  "scratch"          this rank's scratch buffer (uint8)
  "old:<k>", "new:<k>"  the old and the new shard of weight tensor k (plan.tensors[k])
  "kv:<b>"           physical buffer b of the current KV layer (0 for one-buffer layouts; 0 = K, 1 = V for sglang)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ..execution.copy import box_bytes


@dataclass(frozen=True)
class Copy:
    """Copy `boxes` ((N, BOX_FIELDS) int64, byte offsets into the buffers, execution.copy's box format) from buffer
    `src` to buffer `dst`. Sources and destinations of one Copy never overlap."""

    src: str
    dst: str
    boxes: np.ndarray

    @property
    def nbytes(self) -> int:
        return box_bytes(self.boxes)


@dataclass(frozen=True)
class Message:
    """`nbytes` bytes at byte `offset` of buffer `buffer`, sent to or received from group rank `peer`. Messages to
    one peer are matched in list order, which the plan makes identical on both sides."""

    peer: int
    buffer: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Pull:
    """Copy `boxes` from buffer `src` of group rank `peer` (read in place in the peer's memory, same host) into
    this rank's buffer `dst`; source offsets are relative to the peer's buffer."""

    peer: int
    src: str
    dst: str
    boxes: np.ndarray

    @property
    def nbytes(self) -> int:
        return box_bytes(self.boxes)


@dataclass
class Round:
    """One exchange: copies before it (reads: packing into scratch, direct local moves), the messages, copies
    after it (writes: unpacking into the destination).

    With a same-host transport there are no messages: the rank pulls what it receives straight from its peers'
    memory (`pulls`, after `before`), then tells them it has finished reading, and waits for `readers` (the peers
    that read its memory this round) to say the same before its writes (`after`, and the weight tensors finished
    after the round), so that nothing is overwritten while a peer still reads it. lent_bytes: what the readers
    read from this rank (its bytes sent)."""

    before: List[Copy] = field(default_factory=list)
    sends: List[Message] = field(default_factory=list)
    recvs: List[Message] = field(default_factory=list)
    after: List[Copy] = field(default_factory=list)
    pulls: List[Pull] = field(default_factory=list)
    readers: List[int] = field(default_factory=list)
    lent_bytes: int = 0

    @property
    def send_bytes(self) -> int:
        return sum(m.nbytes for m in self.sends) + self.lent_bytes

    @property
    def recv_bytes(self) -> int:
        return sum(m.nbytes for m in self.recvs) + sum(p.nbytes for p in self.pulls)


def equal_runs(keys: np.ndarray):
    """(starts, stops) of the runs of equal consecutive values of a sorted key array: run i is
    keys[starts[i]:stops[i]]."""
    if not keys.size:
        return keys[:0], keys[:0]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return starts, np.concatenate((starts[1:], [keys.size]))


def span_bytes(messages: List[Message]) -> Tuple[int, int]:
    """[start, end) of the scratch bytes a list of messages covers (0, 0 if none is in scratch)."""
    ranges = [(m.offset, m.offset + m.nbytes) for m in messages if m.buffer == "scratch"]
    if not ranges:
        return 0, 0
    return min(a for a, _ in ranges), max(b for _, b in ranges)
