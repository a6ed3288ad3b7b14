"""Byte copies between tensors through the extension's batched strided copy (boxes, see csrc/box_copy.h).

CPU copies run on a persistent thread pool (created once per process, sized to the CPUs of this process's affinity
mask; `set_copy_threads` gives each of several ranks on a host its share); batches under 1 MiB per thread stay on
the calling thread, and the GIL is released while bytes move. CUDA copies are one kernel launch on the current
stream of the tensors' device; their descriptors live in a torch uint8 tensor (the caching allocator's memory,
reused in stream order) and are uploaded from pinned host memory, so nothing synchronises.

The `*_bases` variants apply the same boxes to many buffer pairs of equal sizes in one call (e.g. once per model
layer): boxes are built and checked once, and the whole work (pairs x bytes) is split across the pool or one launch.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import _C
from ..errors import ConfigError, SpecMismatchError

BOX_FIELDS = _C.BOX_FIELDS
PHASE_DIRECT, PHASE_GATHER, PHASE_SCATTER = _C.PHASE_DIRECT, _C.PHASE_GATHER, _C.PHASE_SCATTER

# Fixed cost of one phase of an in-place relayout, in bytes the executor could copy meanwhile: it steers the
# planner between one-copy direct phases and two-copy staged ones (never correctness). A GPU launch costs a few
# microseconds at a few TB/s; a pool job about ten microseconds at ~10 GB/s.
_LAUNCH_BYTES = {"cuda": 8 << 20, "cpu": 128 << 10}
_MAX_COPY_THREADS = 256


class Terms(NamedTuple):
    """A box field the extension computes while it writes the boxes: constant + the sum of coef * values[index]
    (values[i] where index is None) over `terms`, a tuple of (coef, values, index) with int64 arrays. Saves the
    temporaries and passes of computing a large field in numpy."""

    constant: int
    terms: tuple

    @property
    def size(self) -> int:
        coef, values, index = self.terms[0]
        return np.size(values if index is None else index)


def make_boxes(src_offset, dst_offset, run_bytes, count=1, src_stride=0, dst_stride=0, count1=1, src_stride1=0,
               dst_stride1=0) -> np.ndarray:
    """(N, BOX_FIELDS) int64 boxes with repetition levels 0 and 1 (level 2 unused); every argument is a scalar, an
    array of length N, or Terms of length N."""
    row = _UNUSED_ROW.copy()
    columns = []
    for i, c in enumerate((src_offset, dst_offset, run_bytes, count, src_stride, dst_stride, count1, src_stride1,
                           dst_stride1)):
        if isinstance(c, Terms):
            columns.append((i, c))
        elif isinstance(c, (int, np.integer)) or np.ndim(c) == 0:
            row[i] = c
        else:
            columns.append((i, np.ascontiguousarray(c, dtype=np.int64)))
    n = max((c.size for _, c in columns), default=1)
    varying = []
    for i, c in columns:
        if isinstance(c, Terms):
            varying.append((i, int(c.constant), [(int(coef), np.ascontiguousarray(v, dtype=np.int64),
                                                  None if x is None else np.ascontiguousarray(x, dtype=np.int64))
                                                 for coef, v, x in c.terms]))
        elif c.size == 1 and n != 1:  # broadcast like a scalar
            row[i] = c.reshape(-1)[0]
        else:
            varying.append((i, 0, [(1, c, None)]))
    # Every row written once (the extension), not one strided pass per column; the extension checks the lengths.
    return _C.assemble_boxes(row, varying, n)


_UNUSED_ROW = np.array([0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=np.int64)  # levels 1 and 2: count 1


def box_runs(boxes: np.ndarray) -> int:
    """Runs the boxes copy (every level's repetitions)."""
    return int((boxes[:, 3] * boxes[:, 6] * boxes[:, 9]).sum()) if len(boxes) else 0


def box_bytes(boxes: np.ndarray) -> int:
    """Bytes the boxes copy."""
    return int((boxes[:, 2] * boxes[:, 3] * boxes[:, 6] * boxes[:, 9]).sum()) if len(boxes) else 0


def row_major_boxes(src_offset, dst_offset, run_bytes, rows: int, src_stride: int, dst_stride: int) -> np.ndarray:
    """Like make_boxes(..., count=rows, ...) for several runs per row, but one box per (row, run) in row-major
    order: the order an in-place relayout must follow (every later read sits above every earlier write)."""
    src_offset, dst_offset, run_bytes = (np.asarray(a, dtype=np.int64) for a in (src_offset, dst_offset, run_bytes))
    row = np.arange(rows, dtype=np.int64)[:, None]
    return make_boxes((row * src_stride + src_offset).reshape(-1), (row * dst_stride + dst_offset).reshape(-1),
                      np.broadcast_to(run_bytes, (rows, run_bytes.size)).reshape(-1))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def set_copy_threads(n: Optional[int]) -> None:
    """Threads of later CPU copies in this process that pass no num_threads: n >= 1, or None / 0 for the CPUs in
    this process's affinity mask (the default). A host running k ranks on c cores gives each rank about c // k."""
    if n is None:
        n = 0
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _MAX_COPY_THREADS:
        raise ConfigError(f"set_copy_threads: n must be None or an int in [0, {_MAX_COPY_THREADS}], got {n!r}")
    _C.set_copy_threads(int(n))


def copy_threads() -> int:
    """Threads a CPU copy uses when its caller passes no num_threads (see set_copy_threads)."""
    return _C.copy_threads()


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _boxes(boxes) -> np.ndarray:
    """C-contiguous int64 boxes; the extension checks the shape (N, BOX_FIELDS)."""
    return np.ascontiguousarray(boxes, dtype=np.int64)


def _descriptors(device: torch.device, num_rows: int, num_launches: int, num_layers: int) -> torch.Tensor:
    """Device memory for a call's descriptors, from torch's caching allocator on the current stream: freed when the
    caller drops it, and reused only by work queued after the launch on that stream."""
    size = _C.cuda_descriptor_bytes(num_rows, num_launches, num_layers)
    return torch.empty(size, dtype=torch.uint8, device=device)


def _check_buffers(what: str, tensors: Sequence[torch.Tensor], device: torch.device) -> int:
    """Common byte size of a list of contiguous tensors on `device`."""
    if len(tensors) == 0:
        raise SpecMismatchError(f"{what}: needs at least one tensor")
    size = nbytes(tensors[0])
    for i, t in enumerate(tensors):
        if t.device != device:
            raise SpecMismatchError(f"{what}[{i}] is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise SpecMismatchError(f"{what}[{i}] is not contiguous (shape {tuple(t.shape)}, "
                                    f"strides {t.stride()})")
        if nbytes(t) != size:
            raise SpecMismatchError(f"{what}[{i}] has {nbytes(t)} bytes, {what}[0] has {size}: all must be equal")
    return size


def _addresses(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.uint64)


def _check_disjoint(what: str, starts: Sequence[int], size: int) -> None:
    """Raises unless the byte ranges [start, start + size) are pairwise disjoint."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    for a, b in zip(order, order[1:]):
        if starts[a] + size > starts[b]:
            raise SpecMismatchError(f"{what}: buffers {a} and {b} overlap (addresses {starts[a]:#x} and "
                                    f"{starts[b]:#x}, {size} bytes each)")


def copy_boxes(dst: torch.Tensor, src: torch.Tensor, boxes: np.ndarray, *, num_threads: int = 0) -> int:
    """Copy every box from src's bytes to dst's bytes; returns the bytes copied.

    dst, src: contiguous tensors on the same device (any dtype; offsets are bytes from data_ptr()).
    boxes:    (N, BOX_FIELDS) int64. Sources and destinations must not overlap (see copy_boxes_ordered).
    num_threads: CPU threads (0: copy_threads()). On CUDA the copy is queued on the current stream of dst's device.
    """
    if len(boxes) == 0:
        return 0
    if dst.device != src.device:
        raise SpecMismatchError(f"copy between devices: destination on {dst.device}, source on {src.device}")
    boxes = _boxes(boxes)
    if dst.is_cuda:
        desc = _descriptors(dst.device, len(boxes), 1, 1)
        return _C.copy_boxes_cuda(dst.data_ptr(), nbytes(dst), src.data_ptr(), nbytes(src), boxes, desc.data_ptr(),
                                  desc.numel(), dst.device.index, _stream_handle(dst.device))
    return _C.copy_boxes(dst.data_ptr(), nbytes(dst), src.data_ptr(), nbytes(src), boxes, num_threads, False)


def copy_boxes_bases(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], boxes: np.ndarray, *,
                     num_threads: int = 0) -> int:
    """Apply the same boxes once per pair (dsts[i], srcs[i]) in one call; returns the bytes copied over all pairs.

    dsts, srcs: equally long lists of contiguous tensors, all on one device; every dst has the same byte size, every
                src too (e.g. the per-layer K caches of a model). Boxes are checked once against those sizes.
    boxes:      (N, BOX_FIELDS) int64, offsets in bytes from each tensor's data_ptr(). No pair's source may
                overlap any destination.
    On CPU the work (pairs x bytes) is split across the copy pool; on CUDA it is one kernel launch on the current
    stream of the tensors' device.
    """
    if len(dsts) != len(srcs):
        raise SpecMismatchError(f"copy_boxes_bases: {len(dsts)} destinations but {len(srcs)} sources")
    device = dsts[0].device if len(dsts) else torch.device("cpu")
    dst_size = _check_buffers("dsts", dsts, device)
    src_size = _check_buffers("srcs", srcs, device)
    if len(boxes) == 0:
        return 0
    boxes = _boxes(boxes)
    if device.type == "cuda":
        desc = _descriptors(device, len(boxes), 1, len(dsts))
        return _C.copy_boxes_bases_cuda(_addresses(dsts), dst_size, _addresses(srcs), src_size, boxes,
                                        desc.data_ptr(), desc.numel(), device.index, _stream_handle(device))
    return _C.copy_boxes_bases(_addresses(dsts), dst_size, _addresses(srcs), src_size, boxes, num_threads, False)


class OrderedPhases(NamedTuple):
    """An in-place relayout planned as parallel phases (csrc/ordered_phases.h).

    kinds:  int8 (P,): PHASE_DIRECT (buf -> buf), PHASE_GATHER (buf -> scratch) or PHASE_SCATTER (scratch -> buf)
    starts: int64 (P + 1,): phase p copies rows[starts[p]:starts[p + 1]]
    rows:   int64 (M, BOX_FIELDS); offsets into the buffer, or into the scratch from its start
    Running the phases in order, each as one parallel copy, gives the bytes of the run-by-run memmoves.
    """

    kinds: np.ndarray
    starts: np.ndarray
    rows: np.ndarray


def ordered_phases(boxes: np.ndarray, buf_nbytes: int, scratch_nbytes: int, *,
                   launch_bytes: int = _LAUNCH_BYTES["cuda"]) -> OrderedPhases:
    """Plan the in-place relayout `boxes` of a buffer of buf_nbytes bytes with scratch_nbytes bytes of scratch (0: no
    staging) as parallel phases. launch_bytes: the fixed cost of a phase in bytes (a performance knob only)."""
    return OrderedPhases(*_C.plan_ordered_phases(_boxes(boxes), int(buf_nbytes), int(scratch_nbytes),
                                                 int(launch_bytes)))


def copy_boxes_ordered(buf: torch.Tensor, boxes: np.ndarray, scratch: torch.Tensor, *, staged=None) -> int:
    """Relayout inside one buffer: apply boxes in order, as if one run after another with memmove semantics;
    returns the bytes of all runs.

    Exact for any boxes. Fast for the compaction the planners emit (runs in increasing address order, each moving
    down, laid out with row_major_boxes). On CPU the extension copies run by run on one thread. On CUDA (or with
    staged=True on CPU, for testing) the runs are planned as a few parallel phases (ordered_phases): direct copies
    where no run of a phase writes what another one reads, otherwise up to nbytes(scratch) bytes at a time staged
    through `scratch` (a tensor on buf's device that does not overlap buf; it may be empty).
    """
    return copy_boxes_ordered_bases([buf], boxes, scratch, staged=staged)


def copy_boxes_ordered_bases(bufs: Sequence[torch.Tensor], boxes: np.ndarray,
                             scratch: Optional[torch.Tensor] = None, *, staged=None, num_threads: int = 0) -> int:
    """copy_boxes_ordered applied to every buffer of `bufs` (equal byte sizes, pairwise disjoint, one device, e.g. the
    per-layer caches of a model) in one call; returns the bytes of all runs over all buffers.

    Each buffer gets an equal 16-byte-aligned slice of `scratch` for staging. On CPU (unless staged) each buffer is
    relaid out run by run on one thread, buffers in parallel on the copy pool; on CUDA every phase is one launch
    over all buffers.
    """
    device = bufs[0].device if len(bufs) else torch.device("cpu")
    size = _check_buffers("bufs", bufs, device)
    if len(boxes) == 0:
        return 0
    boxes = _boxes(boxes)
    addresses = _addresses(bufs)
    if len(bufs) > 1:
        _check_disjoint("copy_boxes_ordered_bases", [int(a) for a in addresses], size)
    total = _C.validate_boxes(boxes, size, size) * len(bufs)
    use_phases = device.type == "cuda" if staged is None else bool(staged)
    if not use_phases:
        if device.type == "cuda":
            raise SpecMismatchError("copy_boxes_ordered: staged=False (run by run) exists on CPU only")
        _C.copy_boxes_bases(addresses, size, addresses, size, boxes, num_threads, True)
        return total

    per_buf = 0
    if scratch is not None and nbytes(scratch) > 0:
        if scratch.device != device:
            raise SpecMismatchError(f"scratch is on {scratch.device}, the buffers on {device}")
        if not scratch.is_contiguous():
            raise SpecMismatchError("scratch must be contiguous")
        per_buf = nbytes(scratch) // len(bufs) // 16 * 16
        lo, hi = scratch.data_ptr(), scratch.data_ptr() + nbytes(scratch)
        for i, a in enumerate(addresses.tolist()):
            if a < hi and lo < a + size:
                raise SpecMismatchError(f"scratch [{lo:#x}, {hi:#x}) overlaps buffer {i} [{a:#x}, {a + size:#x})")
    phases = ordered_phases(boxes, size, per_buf, launch_bytes=_LAUNCH_BYTES[device.type])
    scratch_addresses = (np.uint64(scratch.data_ptr()) + np.uint64(per_buf) * np.arange(len(bufs), dtype=np.uint64)
                         if per_buf else np.zeros(len(bufs), dtype=np.uint64))
    if device.type == "cuda":
        desc = _descriptors(device, len(phases.rows), len(phases.kinds), len(bufs))
        _C.copy_phases_cuda(addresses, size, scratch_addresses, per_buf, *phases, desc.data_ptr(), desc.numel(),
                            device.index, _stream_handle(device))
    else:
        _C.copy_phases(addresses, size, scratch_addresses, per_buf, *phases, num_threads)
    return total


# Runs at least this long move their whole pages by remapping them (compact_in_place); below it a copy is cheaper
# than the system call and the TLB shootdown.
REMAP_MIN_BYTES = 1 << 20


class PrivateAnonymous:
    """Which address ranges of this process are private anonymous memory (what torch's CPU allocator hands out),
    from one read of /proc/self/maps: compact_in_place may remap pages only there (a shared or file-backed mapping
    would show other processes, or the file, something else than this process's tensor)."""

    def __init__(self):
        spans = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    path = fields[5] if len(fields) > 5 else ""
                    if fields[1][3] == "p" and fields[4] == "0" and path in ("", "[heap]"):
                        lo, hi = fields[0].split("-")
                        spans.append((int(lo, 16), int(hi, 16)))
        except (OSError, IndexError, ValueError):
            spans = []
        merged = []
        for lo, hi in sorted(spans):  # adjacent mappings (e.g. split by earlier remaps) count as one range
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.starts = [lo for lo, _ in merged]
        self.ends = [hi for _, hi in merged]

    def covers(self, address: int, nbytes: int) -> bool:
        i = bisect.bisect_right(self.starts, address) - 1
        return i >= 0 and address + nbytes <= self.ends[i]


def compact_in_place(buf: torch.Tensor, boxes: np.ndarray, scratch: torch.Tensor,
                     anonymous: Optional[PrivateAnonymous] = None) -> int:
    """copy_boxes_ordered(buf, boxes, scratch) for an in-place compaction (no two runs read the same bytes), where
    bytes of buf outside the destinations are not needed afterwards; returns the bytes of all runs.

    On CPU, when buf lies in private anonymous memory (anonymous: PrivateAnonymous of this moment, None reads it
    now), the page-aligned middles of long runs are moved by remapping their pages (_C.remap_boxes_ordered: page
    table entries swap places, no byte is copied, no page freed; a remapped run's source then holds other bytes);
    the rest is copied as before. Bit-exact on the destinations either way.
    """
    if buf.device.type != "cpu" or len(boxes) == 0:
        return copy_boxes_ordered(buf, boxes, scratch)
    boxes = _boxes(boxes)
    size = nbytes(buf)
    if not (boxes[:, 2] >= REMAP_MIN_BYTES).any() or not buf.is_contiguous():
        return copy_boxes_ordered(buf, boxes, scratch)
    anonymous = anonymous if anonymous is not None else PrivateAnonymous()
    if not anonymous.covers(buf.data_ptr(), size):
        return copy_boxes_ordered(buf, boxes, scratch)
    _C.remap_boxes_ordered(buf.data_ptr(), size, boxes, REMAP_MIN_BYTES)  # validates the boxes first
    return box_bytes(boxes)


def split_runs(runs: np.ndarray, cap: int) -> np.ndarray:
    """Cut runs longer than cap bytes into consecutive pieces, first piece first. Applied in order they equal the
    original memmoves for runs that move down or do not overlap themselves (not for a run moving up onto itself)."""
    if cap <= 0 or runs.size == 0 or runs[:, 2].max() <= cap:
        return runs
    out = []
    for src, dst, n in runs.tolist():
        for off in range(0, n, cap):
            out.append((src + off, dst + off, min(cap, n - off)))
    return np.array(out, dtype=np.int64)


def expand_runs(boxes: np.ndarray) -> np.ndarray:
    """(R, 3) int64 rows (src_offset, dst_offset, run_bytes), one per run, in copy order (level 0 fastest)."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, BOX_FIELDS)
    counts = b[:, 3] * b[:, 6] * b[:, 9]
    box = np.repeat(np.arange(len(b)), counts)
    local = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    c0, c1 = b[box, 3], b[box, 6]
    i0, rest = local % c0, local // c0
    i1, i2 = rest % c1, rest // c1
    src = b[box, 0] + i0 * b[box, 4] + i1 * b[box, 7] + i2 * b[box, 10]
    dst = b[box, 1] + i0 * b[box, 5] + i1 * b[box, 8] + i2 * b[box, 11]
    return np.stack([src, dst, b[box, 2]], axis=1)
