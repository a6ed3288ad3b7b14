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
from .program import Copy, Message, Pull, Round, equal_runs
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


def _copies_and_messages(plan, rows: np.ndarray, rows_round: np.ndarray, rank: int, rounds: List[Round]) -> int:
    """Fill every round's copies and messages on `rank` (rows: the plan's transfers that involve it, in plan order,
    rows_round their rounds), all rounds at once; returns the most scratch bytes a round stages.

    Per round, sends first, then receives, each in plan order: both sides list a peer's messages in the plan's
    order. Staged transfers are packed into scratch in that order (one Copy per tensor and direction); direct ones
    are sent from the old shard and received into the new one in place."""
    if not rows.size:
        return 0
    k, src, dst, old_start, new_start, length, outer_start, outer_stop, nbytes, direct = rows.T
    tensors = plan.tensors
    row_bytes = np.array([tp.row_bytes for tp in tensors], dtype=np.int64)[k]
    old_len = np.array([tp.old_len for tp in tensors], dtype=np.int64)[k]
    new_len = np.array([tp.new_len for tp in tensors], dtype=np.int64)[k]
    receiving = dst == rank
    order = np.argsort(rows_round * 2 + receiving, kind="stable")
    staged_bytes = np.where(direct[order] == 0, nbytes[order], 0)
    ends = np.cumsum(staged_bytes)
    first = np.searchsorted(rows_round[order], np.arange(len(rounds) + 1))
    before_round = np.concatenate(([0], ends))[first]  # staged bytes before each round's first row
    scratch_off = np.empty(rows.shape[0], dtype=np.int64)
    scratch_off[order] = ends - staged_bytes - before_round[rows_round[order]]
    old_off = (outer_start * old_len + old_start) * row_bytes
    new_off = (outer_start * new_len + new_start) * row_bytes
    # Messages, one per transfer, in order.
    is_direct = direct.astype(bool)
    for i, r, peer, kk, recv, d, nb, off_old, off_new, off_s in zip(
            order.tolist(), rows_round[order].tolist(), np.where(receiving, src, dst)[order].tolist(),
            k[order].tolist(), receiving[order].tolist(), is_direct[order].tolist(), nbytes[order].tolist(),
            old_off[order].tolist(), new_off[order].tolist(), scratch_off[order].tolist()):
        if recv:
            rounds[r].recvs.append(Message(peer, f"new:{kk}", off_new, nb) if d else
                                   Message(peer, "scratch", off_s, nb))
        else:
            rounds[r].sends.append(Message(peer, f"old:{kk}", off_old, nb) if d else
                                   Message(peer, "scratch", off_s, nb))
    # Copies between shards and scratch, one per (round, tensor, direction), tensors ascending.
    run = length * row_bytes
    count = outer_stop - outer_start
    for recv in (False, True):
        sel = np.flatnonzero((receiving == recv) & ~is_direct)
        if not sel.size:
            continue
        sel = sel[np.argsort(rows_round[sel] * len(tensors) + k[sel], kind="stable")]
        if recv:
            boxes = make_boxes(scratch_off[sel], new_off[sel], run[sel], count[sel], run[sel],
                               (new_len * row_bytes)[sel])
        else:
            boxes = make_boxes(old_off[sel], scratch_off[sel], run[sel], count[sel], (old_len * row_bytes)[sel],
                               run[sel])
        keys = rows_round[sel] * len(tensors) + k[sel]
        starts, stops = equal_runs(keys)
        for key, a, b in zip(keys[starts].tolist(), starts.tolist(), stops.tolist()):
            r, kk = divmod(key, len(tensors))
            if recv:
                rounds[r].after.append(Copy("scratch", f"new:{kk}", boxes[a:b]))
            else:
                rounds[r].before.append(Copy(f"old:{kk}", "scratch", boxes[a:b]))
    return int(np.diff(before_round).max(initial=0))


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
    if pull:
        for r in sorted(set(round_of[touch].tolist())):
            a, b = plan.rounds[r]
            records = [Transfer(*row[:-1], bool(row[-1])) for row in data[a:b][mine[a:b]].tolist()]
            program.rounds[r].round = _round_pulls(plan.tensors, records, rank)
    else:
        program.scratch_bytes = _copies_and_messages(plan, data[touch], round_of[touch], rank,
                                                     [wr.round for wr in program.rounds])
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
