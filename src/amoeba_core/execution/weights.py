"""Executing the weight part of a RetpPlan on one rank."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict

import numpy as np
import torch

from .. import failpoints
from ..planning.plan import RetpPlan
from ..planning.weights import ALLOC, COMPACT, SAME, VIEW, TensorPlan
from .copy import copy_boxes, copy_boxes_ordered, make_boxes, row_major_boxes
from .memory import MemoryMeter
from .progress import NEW, PARTIAL, Progress


def _as_rows(t: torch.Tensor, tp: TensorPlan, length: int) -> torch.Tensor:
    """View a shard as (outer, length, inner) so split-dim ranges are slices of dim 1."""
    return t.view(tp.outer, length, -1)


def _keep_boxes(tp: TensorPlan, rank: int, in_place: bool = False) -> np.ndarray:
    """Boxes copying the retained stretches from the old shard layout to the new one (byte offsets); in row-major
    run order for an in-place relayout."""
    moves = tp.keep[rank]
    rb = tp.row_bytes
    args = ([m.old_start * rb for m in moves], [m.new_start * rb for m in moves], [m.length * rb for m in moves])
    if in_place:
        return row_major_boxes(*args, tp.outer, tp.old_len * rb, tp.new_len * rb)
    return make_boxes(*args, tp.outer, tp.old_len * rb, tp.new_len * rb)


def _zero_fill(new: torch.Tensor, tp: TensorPlan, rank: int) -> None:
    rows = _as_rows(new, tp, tp.new_len)
    for start, length in tp.zero[rank]:
        rows[:, start:start + length].zero_()


class WeightExecutor:
    """Runs the weight rounds of `plan` for group rank `rank`, replacing entries of `weights` as they finish.

    weights: name -> this rank's old shard (contiguous, shape spec.shard_shape(old tp rank, old degree)); the dict
             is updated in place so that the old tensors can be freed as soon as they are no longer needed.
    release_storage: copy views and in-place compactions into right-sized tensors (one at a time) so that a merge
             returns the bytes it frees to the allocator.
    progress: records each tensor's state (old / new / partial) as it changes, for the damage report.
    """

    def __init__(self, plan: RetpPlan, rank: int, weights: Dict[str, torch.Tensor], transport, scratch: torch.Tensor,
                 memory: MemoryMeter, progress: Progress, release_storage: bool = False):
        self.plan, self.rank, self.weights = plan, rank, weights
        self.transport, self.scratch, self.memory, self.progress = transport, scratch, memory, progress
        self.release_storage = release_storage
        self.new: Dict[int, torch.Tensor] = {}
        self._to_release: list = []

    def staging_bytes(self):
        """(send, receive) bytes of this rank's largest round: what host staging must hold (every message of a
        round is staged, direct ones included)."""
        me, out_max, in_max = self.rank, 0, 0
        for a, b in self.plan.rounds:
            out_max = max(out_max, sum(t.nbytes for t in self.plan.transfers[a:b] if t.src == me))
            in_max = max(in_max, sum(t.nbytes for t in self.plan.transfers[a:b] if t.dst == me))
        return out_max, in_max

    # ---- per-tensor lifecycle ------------------------------------------------------------------------------
    def _begin(self, tp: TensorPlan) -> None:
        """ALLOC: allocate the new shard, copy what this rank keeps, zero-fill padding."""
        old = self.weights[tp.spec.name]
        new = torch.empty(tp.spec.shard_shape(self.plan.new.slots[self.rank][1], self.plan.new.degree),
                          dtype=old.dtype, device=old.device)
        self.memory.add(tp.new_nbytes)
        copy_boxes(new, old, _keep_boxes(tp, self.rank))
        _zero_fill(new, tp, self.rank)
        self.new[tp.index] = new

    def _finish(self, tp: TensorPlan) -> None:
        """Install the new shard: release the old one (ALLOC) or relayout / view the old storage."""
        name, mode = tp.spec.name, tp.mode[self.rank]
        old = self.weights[name]
        new_shape = tp.spec.shard_shape(self.plan.new.slots[self.rank][1], self.plan.new.degree)
        if mode == SAME:
            return
        if mode == ALLOC:
            self.weights[name] = self.new.pop(tp.index)  # the dict held the last reference to the old shard
            self.progress.weights[name] = NEW
            self.memory.sub(tp.new_nbytes)
            return
        flat = old.view(-1)
        numel = int(np.prod(new_shape))
        if mode == VIEW:
            move = tp.keep[self.rank][0]
            start = move.old_start * tp.spec.inner
            self.weights[name] = flat[start:start + numel].view(new_shape)
        elif mode == COMPACT:
            self.progress.weights[name] = PARTIAL
            copy_boxes_ordered(old, _keep_boxes(tp, self.rank, in_place=True), self.scratch)
            new = flat[:numel].view(new_shape)
            _zero_fill(new, tp, self.rank)
            self.weights[name] = new
        self.progress.weights[name] = NEW
        if self.release_storage:
            self._to_release.append(tp)

    def _release(self) -> None:
        """Copy every shard that is a view of (or compacted inside) a larger old storage into a right-sized tensor,
        smallest first: the first copy lives beside its old storage, later ones mostly reuse what the earlier
        ones freed, so a merge returns its freed bytes with little memory on top."""
        for tp in sorted(self._to_release, key=lambda t: t.new_nbytes):
            name = tp.spec.name
            self.memory.add(tp.new_nbytes)
            self.weights[name] = self.weights[name].clone()  # the dict held the last reference to the old storage
            self.memory.sub(tp.new_nbytes)
        self._to_release = []

    # ---- rounds --------------------------------------------------------------------------------------------
    def run(self) -> None:
        plan, me = self.plan, self.rank
        first_recv, last_touch = {}, {}
        for r, (a, b) in enumerate(plan.rounds):
            for t in plan.transfers[a:b]:
                if t.dst == me:
                    first_recv.setdefault(t.tensor, r)
                if me in (t.src, t.dst):
                    last_touch[t.tensor] = r
        # Tensors this rank does not exchange are finished first, one at a time.
        for tp in plan.tensors:
            if tp.index not in last_touch:
                failpoints.hit("move.weights")
                if tp.mode[me] == ALLOC:
                    self._begin(tp)
                self._finish(tp)
        begin_at, finish_at = defaultdict(list), defaultdict(list)
        for tp in plan.tensors:
            if tp.index in last_touch:
                if tp.mode[me] == ALLOC:
                    # Allocated when its first chunk arrives (a rank may only send before that).
                    begin_at[first_recv.get(tp.index, last_touch[tp.index])].append(tp)
                finish_at[last_touch[tp.index]].append(tp)
        for r, (a, b) in enumerate(plan.rounds):
            failpoints.hit("move.weights")
            for tp in begin_at[r]:
                self._begin(tp)
            self._exchange(plan.transfers[a:b])
            for tp in finish_at[r]:
                self._finish(tp)
        self._release()

    def _exchange(self, transfers) -> None:
        """One round: pack staged sends into scratch, post every message, unpack staged receives. Direct transfers
        (one contiguous byte range on both sides) go straight from the old shard and into the new one."""
        me, tensors = self.rank, self.plan.tensors
        outgoing = [t for t in transfers if t.src == me]
        incoming = [t for t in transfers if t.dst == me]
        if not outgoing and not incoming:
            return
        sends, recvs, pack, unpack, offset = [], [], defaultdict(list), defaultdict(list), 0
        # Messages to one peer follow the plan's order on both sides; staged ones are laid out in scratch.
        for t in outgoing:
            tp = tensors[t.tensor]
            if t.direct:
                start = (t.outer_start * tp.old_len + t.old_start) * tp.row_bytes
                sends.append((t.dst, _bytes(self.weights[tp.spec.name])[start:start + t.nbytes]))
            else:
                pack[t.tensor].append((t, offset))
                sends.append((t.dst, self.scratch[offset:offset + t.nbytes]))
                offset += t.nbytes
        for t in incoming:
            tp = tensors[t.tensor]
            if t.direct:
                start = (t.outer_start * tp.new_len + t.new_start) * tp.row_bytes
                recvs.append((t.src, _bytes(self.new[t.tensor])[start:start + t.nbytes]))
            else:
                unpack[t.tensor].append((t, offset))
                recvs.append((t.src, self.scratch[offset:offset + t.nbytes]))
                offset += t.nbytes
        for k, items in pack.items():
            tp = tensors[k]
            copy_boxes(self.scratch, self.weights[tp.spec.name], _transfer_boxes(tp, items, sending=True))
        self.transport.exchange(sends, recvs)
        for k, items in unpack.items():
            tp = tensors[k]
            copy_boxes(self.new[k], self.scratch, _transfer_boxes(tp, items, sending=False))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.view(-1).view(torch.uint8)


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
