"""Byte copies between tensors through the extension's batched strided copy (boxes, see csrc/box_copy.h)."""
from __future__ import annotations

import numpy as np
import torch

from .. import _C
from ..errors import SpecMismatchError

BOX_FIELDS = _C.BOX_FIELDS


def make_boxes(src_offset, dst_offset, run_bytes, count=1, src_stride=0, dst_stride=0) -> np.ndarray:
    """(N, BOX_FIELDS) int64 boxes with one repetition level; every argument is a scalar or an array of length N."""
    cols = (src_offset, dst_offset, run_bytes, count, src_stride, dst_stride)
    n = max((np.size(c) for c in cols if np.ndim(c)), default=1)
    out = np.empty((n, BOX_FIELDS), dtype=np.int64)
    for i, c in enumerate(cols):
        out[:, i] = c  # broadcasts scalars
    out[:, 6:] = _UNUSED_LEVELS
    return out


_UNUSED_LEVELS = np.array([1, 0, 0, 1, 0, 0], dtype=np.int64)  # levels 1 and 2: count 1


def row_major_boxes(src_offset, dst_offset, run_bytes, rows: int, src_stride: int, dst_stride: int) -> np.ndarray:
    """Like make_boxes(..., count=rows, ...) for several runs per row, but one box per (row, run) in row-major
    order: the order an in-place relayout must follow (every later read sits above every earlier write)."""
    src_offset, dst_offset, run_bytes = (np.asarray(a, dtype=np.int64) for a in (src_offset, dst_offset, run_bytes))
    row = np.arange(rows, dtype=np.int64)[:, None]
    return make_boxes((row * src_stride + src_offset).reshape(-1), (row * dst_stride + dst_offset).reshape(-1),
                      np.broadcast_to(run_bytes, (rows, run_bytes.size)).reshape(-1))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def copy_boxes(dst: torch.Tensor, src: torch.Tensor, boxes: np.ndarray, *, num_threads: int = 0) -> int:
    """Copy every box from src's bytes to dst's bytes; returns the bytes copied.

    dst, src: contiguous tensors on the same device (any dtype; offsets are bytes from data_ptr()).
    boxes:    (N, BOX_FIELDS) int64. Sources and destinations must not overlap (see copy_boxes_ordered).
    On CUDA the copy is queued on the current stream of dst's device.
    """
    if len(boxes) == 0:
        return 0
    if dst.device != src.device:
        raise SpecMismatchError(f"copy between devices: destination on {dst.device}, source on {src.device}")
    boxes = np.ascontiguousarray(boxes, dtype=np.int64)
    if dst.is_cuda:
        return _C.copy_boxes_cuda(dst.data_ptr(), nbytes(dst), src.data_ptr(), nbytes(src), boxes,
                                  _stream_handle(dst))
    return _C.copy_boxes(dst.data_ptr(), nbytes(dst), src.data_ptr(), nbytes(src), boxes, num_threads, False)


def copy_boxes_ordered(buf: torch.Tensor, boxes: np.ndarray, scratch: torch.Tensor, *, staged=None) -> int:
    """Relayout inside one buffer: apply boxes in order, as if one after another with memmove semantics.

    Safe when every run moves bytes to lower (or equal) addresses and runs come in increasing address order (the
    compaction the planner emits, laid out with row_major_boxes). On CPU the extension copies run by run; on CUDA
    runs are staged through `scratch` (a uint8 tensor on the same device) in batches: a batch is read whole before
    it is written (staged=True forces that path on CPU too, for testing).
    """
    if len(boxes) == 0:
        return 0
    boxes = np.ascontiguousarray(boxes, dtype=np.int64)
    if not (buf.is_cuda if staged is None else staged):
        return _C.copy_boxes(buf.data_ptr(), nbytes(buf), buf.data_ptr(), nbytes(buf), boxes, 1, True)
    cap = nbytes(scratch)
    runs = split_runs(expand_runs(boxes), cap)
    ends = np.cumsum(runs[:, 2])
    total, i = 0, 0
    while i < len(runs):
        # The longest batch of consecutive runs that fits the scratch buffer (at least one: runs were split).
        j = max(i + 1, int(np.searchsorted(ends, (ends[i - 1] if i else 0) + cap, side="right")))
        batch = runs[i:j]
        packed = np.concatenate(([0], np.cumsum(batch[:, 2])[:-1]))
        total += copy_boxes(scratch, buf, make_boxes(batch[:, 0], packed, batch[:, 2]))
        copy_boxes(buf, scratch, make_boxes(packed, batch[:, 1], batch[:, 2]))
        i = j
    return total


def split_runs(runs: np.ndarray, cap: int) -> np.ndarray:
    """Cut runs longer than cap bytes into consecutive pieces (order kept, so ordered semantics hold)."""
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
