"""Running a rank's program (planning.program): copies through the extension, exchanges or pulls through the
transport.

The executor resolves buffer names to tensors and runs rounds in order; it knows no layout and decides nothing.
Progress (for the damage report after a failure) and fault points are the only things it adds.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import failpoints
from ..planning.program import Copy, Round
from ..planning.weight_program import TensorOp, WeightProgram
from .copy import PrivateAnonymous, compact_in_place, copy_boxes
from .memory import return_freed_memory
from .progress import NEW, PARTIAL


_RETURN_FREED_MIN_BYTES = 1 << 20


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.view(-1).view(torch.uint8)


class Executor:
    """transport: moves messages (TorchDistTransport) or pulls (SameHostTransport); scratch: this rank's uint8
    scratch buffer; progress: execution.progress.Progress, updated as rounds start and layers finish."""

    def __init__(self, transport, scratch: torch.Tensor, progress, memory, return_freed: bool = False,
                 kv_scratch: Optional[torch.Tensor] = None):
        """return_freed: give every old shard of 1 MiB or more back to the OS / driver as soon as it is released
        (execution.memory.return_freed_memory), so that memory the allocator would keep does not add to the peak:
        an elastic KV pool's invariant counts what the process holds. kv_scratch: the KV step's scratch when it is
        not `scratch` (bytes the weights step leaves unused; written only once that step is done)."""
        self.transport, self.scratch, self.progress, self.memory = transport, scratch, progress, memory
        self.kv_scratch = kv_scratch
        self.return_freed = return_freed
        self.pulls = getattr(transport, "pulls", False)  # the programs were built with pull=True
        self._anonymous = None

    def copy(self, c: Copy, buffers: Dict[str, torch.Tensor]) -> None:
        copy_boxes(buffers[c.dst], buffers[c.src], c.boxes)

    def run_round(self, rnd: Round, buffers: Dict[str, torch.Tensor], remote_name=None) -> None:
        """before; the exchange (messages), or the pulls and the wait for this rank's readers (a pull transport,
        which every round passes through: its round counter is global); after. remote_name: program buffer name
        -> the name the peers published it under (pull transports)."""
        for c in rnd.before:
            self.copy(c, buffers)
        if rnd.sends or rnd.recvs:
            self.transport.exchange([(m.peer, buffers[m.buffer][m.offset:m.offset + m.nbytes]) for m in rnd.sends],
                                    [(m.peer, buffers[m.buffer][m.offset:m.offset + m.nbytes]) for m in rnd.recvs])
        if self.pulls:
            self.transport.pull(rnd.pulls, buffers, remote_name)
            self.transport.end_round(rnd.readers, rnd.lent_bytes)
        for c in rnd.after:
            self.copy(c, buffers)

    def run_kv(self, program, layers: List[List[torch.Tensor]]) -> None:
        """Apply the KV program (planning.kv_program.KVProgram) to every layer in turn; layers[l] are layer l's
        physical buffers (flat uint8), named "kv:0", "kv:1", ... in the program."""
        scratch = self.kv_scratch if self.kv_scratch is not None else self.scratch
        for layer, bufs in enumerate(layers):
            buffers = {"scratch": scratch}
            buffers.update((f"kv:{i}", b) for i, b in enumerate(bufs))
            prefix = f"kv/{layer}/"
            remote_name = lambda name, prefix=prefix: prefix + name[3:]  # noqa: E731 - "kv:<b>" -> "kv/<l>/<b>"
            for rnd in program.rounds:
                failpoints.hit("move.kv")
                self.progress.kv_round_started()
                self.run_round(rnd, buffers, remote_name)
            self.progress.kv_layer_done()
        self.progress.kv_done = True

    # ---- weights ---------------------------------------------------------------------------------------------
    def run_weights(self, program: WeightProgram, weights: Dict[str, torch.Tensor], release_storage: bool) -> None:
        """Run the weight program, replacing entries of `weights` (name -> shard) as tensors finish; the dict held
        the last reference to each old shard, so it is freed as soon as its replacement is installed."""
        new: Dict[int, torch.Tensor] = {}
        buffers = _WeightBuffers(weights, new, program.names, self.scratch)
        self._anonymous = None  # read once per step, when a compaction first needs it
        for op in program.prologue:
            failpoints.hit("move.weights")
            if op.kind == "alloc":
                self._begin(op, weights, new)
            self._finish(op, weights, new)
        for wr in program.rounds:
            failpoints.hit("move.weights")
            for op in wr.begin:
                self._begin(op, weights, new)
            self.run_round(wr.round, buffers, lambda name: "w/" + program.names[int(name[4:])])  # "old:<k>"
            for op in wr.finish:
                self._finish(op, weights, new)
        if release_storage:
            for op in program.release:  # smallest first: later copies mostly reuse what earlier ones freed
                self.memory.add(op.new_nbytes)
                weights[op.name] = weights[op.name].clone()
                self.memory.sub(op.new_nbytes)
                if self.return_freed and op.new_nbytes >= _RETURN_FREED_MIN_BYTES:
                    return_freed_memory(weights[op.name].device)

    def _begin(self, op: TensorOp, weights, new) -> None:
        """alloc: a new shard, filled with the retained stretches, padding zeroed."""
        old = weights[op.name]
        t = torch.empty(op.shape, dtype=old.dtype, device=old.device)
        self.memory.add(op.new_nbytes)
        copy_boxes(t, old, op.keep)
        _zero(as_bytes(t), op.zero)
        new[op.tensor] = t

    def _finish(self, op: TensorOp, weights, new) -> None:
        """Install the new shard: the allocated one, a view of the old storage, or the old storage compacted."""
        if op.kind == "alloc":
            old = weights[op.name]
            freed, device = old.untyped_storage().nbytes(), old.device
            del old
            weights[op.name] = new.pop(op.tensor)
            self.memory.sub(op.new_nbytes)
            if self.return_freed and freed >= _RETURN_FREED_MIN_BYTES:
                return_freed_memory(device)
        else:
            old = weights[op.name]
            numel = 1
            for n in op.shape:
                numel *= n
            if op.kind == "compact":
                self.progress.weights[op.name] = PARTIAL
                if old.device.type == "cpu" and self._anonymous is None:
                    self._anonymous = PrivateAnonymous()
                compact_in_place(old, op.keep, self.scratch, self._anonymous)
                view = old.view(-1)[:numel].view(op.shape)
                _zero(as_bytes(view), op.zero)
            else:
                view = old.view(-1)[op.view_offset:op.view_offset + numel].view(op.shape)
            weights[op.name] = view
        self.progress.weights[op.name] = NEW


class _WeightBuffers:
    """Resolves "old:<k>" (the shard the weights dict holds now), "new:<k>" (the allocated new shard) and "scratch"
    to flat uint8 tensors."""

    def __init__(self, weights, new, names, scratch):
        self.weights, self.new, self.names, self.scratch = weights, new, names, scratch

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "scratch":
            return self.scratch
        kind, k = name.split(":")
        if kind == "new":
            return as_bytes(self.new[int(k)])
        return as_bytes(self.weights[self.names[int(k)]])


def _zero(buf: torch.Tensor, ranges) -> None:
    """Zero byte ranges (offset, run, count, stride) of a flat uint8 tensor."""
    for offset, run, count, stride in ranges:
        buf.as_strided((count, run), (stride, 1), buf.storage_offset() + offset).zero_()
