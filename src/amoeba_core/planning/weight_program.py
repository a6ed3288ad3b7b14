"""One rank's program for the weights: how each tensor gets its new shard, round by round.

Per tensor (planning.weights.TensorPlan), this rank's mode decides the operation (TensorOp):
  same     nothing (replicated, or the same degree and TP rank)
  view     the new shard is a contiguous stretch of the old storage: a view, nothing copied
  compact  every byte is local: moved inside the old storage (in order, to lower addresses), then viewed
  alloc    a new tensor, filled from the retained stretches and from received chunks, installed when complete
Tensors this rank changes without exchanging anything come first, one at a time (the prologue). The others follow
the plan's rounds: a tensor is allocated in the round its first chunk arrives (a rank may send from its old shard
before that) and installed after its last round. In each round the staged transfers are packed into scratch in
message order (sends, then receives), direct transfers (one contiguous byte range on both sides) go straight from
the old shard and into the new one. With pulls (a same-host transport) the receiver reads every transfer straight
from the sender's old shard into its new one, and nothing is staged.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..execution.copy import make_boxes, row_major_boxes
from .program import Copy, Message, Pull, Round
from .weights import ALLOC, COMPACT, SAME, VIEW, TensorPlan, Transfer


@dataclass
class TensorOp:
    """How one tensor gets its new shard on this rank (no spec needed to run it).

    kind:        "alloc", "view" or "compact"
    tensor:      index in plan.tensors; name: the weights dict key
    shape:       the new shard's shape; new_nbytes: its bytes
    keep:        alloc: boxes copying the retained stretches old -> new; compact: the in-place relayout, in order
    view_offset: view: element offset of the new shard in the old storage
    zero:        byte ranges of the new shard to zero-fill (vocabulary padding): (offset, run, count, stride)
    """

    kind: str
    tensor: int
    name: str
    shape: Tuple[int, ...]
    new_nbytes: int
    keep: Optional[np.ndarray] = None
    view_offset: int = 0
    zero: Tuple[Tuple[int, int, int, int], ...] = ()


@dataclass
class WeightRound:
    """begin: tensors allocated before the round's copies; round: copies and messages; finish: tensors installed
    after it."""

    begin: List[TensorOp] = field(default_factory=list)
    round: Round = field(default_factory=Round)
    finish: List[TensorOp] = field(default_factory=list)


@dataclass
class WeightProgram:
    """prologue: tensors changed without exchanging anything, one at a time; rounds; release: view and compact
    tensors (their new shard sits in a larger old storage), smallest first, for release_storage; scratch_bytes: the
    largest round's staged bytes; names: tensor index -> key in the weights dict."""

    prologue: List[TensorOp] = field(default_factory=list)
    rounds: List[WeightRound] = field(default_factory=list)
    release: List[TensorOp] = field(default_factory=list)
    scratch_bytes: int = 0
    names: Dict[int, str] = field(default_factory=dict)  # tensor index -> weights dict key


def _keep_boxes(tp: TensorPlan, rank: int, in_place: bool = False) -> np.ndarray:
    """Boxes copying the retained stretches from the old shard layout to the new one (byte offsets); in row-major
    run order for an in-place relayout."""
    moves = tp.keep[rank]
    rb = tp.row_bytes
    args = ([m.old_start * rb for m in moves], [m.new_start * rb for m in moves], [m.length * rb for m in moves])
    if in_place:
        return row_major_boxes(*args, tp.outer, tp.old_len * rb, tp.new_len * rb)
    return make_boxes(*args, tp.outer, tp.old_len * rb, tp.new_len * rb)


def tensor_op(plan, tp: TensorPlan, rank: int, cache: Optional[dict] = None) -> Optional[TensorOp]:
    """This rank's operation on tensor `tp` (None when the shard stays as it is). cache: keep boxes by template
    (tensors of one template share their tables), so a model's layers compute them once."""
    mode = tp.mode[rank]
    if mode == SAME:
        return None
    shape = tuple(tp.spec.shard_shape(plan.new.slots[rank][1], plan.new.degree))
    rb = tp.row_bytes
    zero = tuple((start * rb, length * rb, tp.outer, tp.new_len * rb) for start, length in tp.zero[rank])
    op = TensorOp(mode, tp.index, tp.spec.name, shape, tp.new_nbytes, zero=zero)
    if mode in (ALLOC, COMPACT):
        key = (id(tp.keep), mode, tp.outer, rb)
        if cache is None or key not in cache:
            boxes = _keep_boxes(tp, rank, in_place=mode == COMPACT)
            if cache is None:
                op.keep = boxes
                return op
            cache[key] = boxes
        op.keep = cache[key]
    elif mode == VIEW:
        op.view_offset = tp.keep[rank][0].old_start * tp.spec.inner
    return op


def _round_copies(plan, rows: np.ndarray, rank: int, pull: bool = False) -> Tuple[Round, int]:
    """Copies and messages of one weight round on `rank` (rows: the round's transfers that involve it, a slice of
    the plan's table), and the scratch bytes it stages."""
    tensors = plan.tensors
    records = [Transfer(*row[:-1], bool(row[-1])) for row in rows.tolist()]
    if pull:
        return _round_pulls(tensors, records, rank), 0
    rnd = Round()
    offset = 0
    pack, unpack = defaultdict(list), defaultdict(list)
    for t in records:  # sends first, then receives: both sides list a peer's messages in the plan's order
        if t.src != rank:
            continue
        tp = tensors[t.tensor]
        if t.direct:
            rnd.sends.append(Message(t.dst, f"old:{t.tensor}", (t.outer_start * tp.old_len + t.old_start) *
                                     tp.row_bytes, t.nbytes))
        else:
            pack[t.tensor].append((t, offset))
            rnd.sends.append(Message(t.dst, "scratch", offset, t.nbytes))
            offset += t.nbytes
    for t in records:
        if t.dst != rank:
            continue
        tp = tensors[t.tensor]
        if t.direct:
            rnd.recvs.append(Message(t.src, f"new:{t.tensor}", (t.outer_start * tp.new_len + t.new_start) *
                                     tp.row_bytes, t.nbytes))
        else:
            unpack[t.tensor].append((t, offset))
            rnd.recvs.append(Message(t.src, "scratch", offset, t.nbytes))
            offset += t.nbytes
    for k, items in pack.items():
        rnd.before.append(Copy(f"old:{k}", "scratch", _transfer_boxes(tensors[k], items, sending=True)))
    for k, items in unpack.items():
        rnd.after.append(Copy("scratch", f"new:{k}", _transfer_boxes(tensors[k], items, sending=False)))
    return rnd, offset


def _round_pulls(tensors, records, rank: int) -> Round:
    """One weight round with pulls: this rank reads each transfer it receives straight from the sender's old shard
    into its new shard (strided on both sides, nothing staged), one Pull per (peer, tensor); the ranks that read
    from this rank are its readers."""
    rnd = Round()
    incoming = defaultdict(list)
    readers = set()
    for t in records:
        if t.src == rank:
            readers.add(t.dst)
            rnd.lent_bytes += t.nbytes
        else:
            incoming[(t.src, t.tensor)].append(t)
    for (peer, k), items in sorted(incoming.items()):
        tp = tensors[k]
        rb = tp.row_bytes
        boxes = make_boxes([(t.outer_start * tp.old_len + t.old_start) * rb for t in items],
                           [(t.outer_start * tp.new_len + t.new_start) * rb for t in items],
                           [t.length * rb for t in items], [t.outer_stop - t.outer_start for t in items],
                           tp.old_len * rb, tp.new_len * rb)
        rnd.pulls.append(Pull(peer, f"old:{k}", f"new:{k}", boxes))
    rnd.readers = sorted(readers)
    return rnd


def _transfer_boxes(tp: TensorPlan, items, sending: bool) -> np.ndarray:
    """Boxes between a shard and packed scratch bytes for a list of (transfer, scratch offset)."""
    rb = tp.row_bytes
    run = np.array([t.length * rb for t, _ in items])
    count = np.array([t.outer_stop - t.outer_start for t, _ in items])
    packed = np.array([off for _, off in items])
    if sending:
        shard_off = [(t.outer_start * tp.old_len + t.old_start) * rb for t, _ in items]
        return make_boxes(shard_off, packed, run, count, tp.old_len * rb, run)
    shard_off = [(t.outer_start * tp.new_len + t.new_start) * rb for t, _ in items]
    return make_boxes(packed, shard_off, run, count, run, tp.new_len * rb)


def build_weight_program(plan, rank: int, pull: bool = False) -> WeightProgram:
    """Rank `rank`'s weight program for RetpPlan `plan`. pull: for a same-host transport, every received byte is
    read from the sender's old shard into the new one (Round.pulls, no scratch), instead of messages."""
    data = plan.transfers.data
    round_of = np.repeat(np.arange(len(plan.rounds)), [b - a for a, b in plan.rounds]) if plan.rounds else \
        np.zeros(0, dtype=np.int64)
    mine = (data[:, 1] == rank) | (data[:, 2] == rank)
    first_recv, last_touch = {}, {}
    recv = np.flatnonzero(data[:, 2] == rank)
    for k, r in zip(data[recv, 0].tolist()[::-1], round_of[recv].tolist()[::-1]):
        first_recv[k] = r                   # walked backwards: the earliest round wins
    touch = np.flatnonzero(mine)
    for k, r in zip(data[touch, 0].tolist(), round_of[touch].tolist()):
        last_touch[k] = r                   # walked forwards: the latest round wins
    program = WeightProgram(names={tp.index: tp.spec.name for tp in plan.tensors})
    program.rounds = [WeightRound() for _ in plan.rounds]
    cache: dict = {}
    for tp in plan.tensors:
        op = tensor_op(plan, tp, rank, cache)
        if op is None:
            continue
        if tp.index not in last_touch:
            program.prologue.append(op)
        else:
            if op.kind == ALLOC:
                program.rounds[first_recv.get(tp.index, last_touch[tp.index])].begin.append(op)
            program.rounds[last_touch[tp.index]].finish.append(op)
        if op.kind in (VIEW, COMPACT):
            program.release.append(op)
    program.release.sort(key=lambda op: op.new_nbytes)
    for r in sorted(set(round_of[touch].tolist())):
        a, b = plan.rounds[r]
        rows = data[a:b][mine[a:b]]
        program.rounds[r].round, staged = _round_copies(plan, rows, rank, pull)
        program.scratch_bytes = max(program.scratch_bytes, staged)
    return program


def storage_overshoot_bytes(plan, program: WeightProgram, release_storage: bool = False) -> int:
    """How far this rank's weight storage rises above its final size while `program` runs: a new shard is
    allocated while its old one is still alive, so a split (every shard grows) peaks above where it ends. Simulated
    in execution order (prologue, rounds: allocations before, releases after; then release_storage's clones)."""
    old = {tp.index: tp.old_nbytes for tp in plan.tensors}
    current = peak = 0
    for op in program.prologue:
        if op.kind == ALLOC:
            current += op.new_nbytes
            peak = max(peak, current)
            current -= old[op.tensor]
    for wr in program.rounds:
        for op in wr.begin:
            current += op.new_nbytes
        peak = max(peak, current)
        for op in wr.finish:
            if op.kind == ALLOC:
                current -= old[op.tensor]
    if release_storage:
        for op in program.release:
            current += op.new_nbytes
            peak = max(peak, current)
            current -= old[op.tensor]
    return max(0, peak - current)
