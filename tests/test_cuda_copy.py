"""Byte engines against a pure-numpy reference: the CUDA engine (gpu-marked) and the CPU engine (runs anywhere).

Every run poisons the destination with 0xA5 first and compares the whole destination buffer, so bytes outside the
boxes must come back untouched.
"""
import numpy as np
import pytest
import torch

from amoeba_core import _C

POISON = 0xA5
BOX_FIELDS = 12

cuda_ready = bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not cuda_ready, reason="needs a CUDA device and the CUDA engine (_C.cuda_compiled)")


# ---------------------------------------------------------------------------------------------------------------
# Reference and random boxes


def box_run_offsets(row):
    """(src_offsets, dst_offsets) of every run of one box row, level 0 fastest."""
    so, do, _run, c0, s0, d0, c1, s1, d1, c2, s2, d2 = (int(x) for x in row)
    i2, i1, i0 = np.meshgrid(np.arange(c2), np.arange(c1), np.arange(c0), indexing="ij")
    src = so + i0 * s0 + i1 * s1 + i2 * s2
    dst = do + i0 * d0 + i1 * d1 + i2 * d2
    return src.reshape(-1), dst.reshape(-1)


def reference_copy(dst: np.ndarray, src: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Applies boxes (N, 12) to a copy of uint8 array dst, box by box, with numpy fancy indexing."""
    out = dst.copy()
    for row in boxes:
        run = int(row[2])
        if run == 0:
            continue
        s, d = box_run_offsets(row)
        lane = np.arange(run, dtype=np.int64)
        out[(d[:, None] + lane).reshape(-1)] = src[(s[:, None] + lane).reshape(-1)]
    return out


def random_boxes(rng: np.random.Generator, src_nbytes: int, num_boxes: int, aligned: bool, max_run: int,
                 max_bytes: int = 8 << 20):
    """Random boxes with disjoint destinations (so the copy order does not matter) and arbitrary, possibly
    overlapping or broadcast (stride 0) sources. Returns (boxes, dst_nbytes)."""
    rows, cursor, budget = [], 0, max_bytes
    align = 16 if aligned else 1
    while len(rows) < num_boxes:
        kind = rng.integers(0, 5)
        if kind == 0:
            run = int(rng.integers(0, 40))
        elif kind == 1:
            run = int(rng.integers(1, 40)) * 16
        elif kind == 2:
            run = int(rng.integers(1, 700))
        elif kind == 3:
            run = int(rng.integers(1, 8192))
        else:
            run = int(rng.integers(1, max_run + 1))
        run = -(-run // align) * align
        counts, sstr, dstr = [1, 1, 1], [0, 0, 0], [0, 0, 0]
        sext = dext = run
        for level in range(int(rng.integers(0, 4))):
            counts[level] = int(rng.integers(1, 3 if run > 65536 else 17))
            gap_d = int(rng.integers(0, 65)) // align * align if rng.random() < 0.7 else 0
            gap_s = int(rng.integers(0, 65)) // align * align if rng.random() < 0.7 else 0
            dstr[level] = dext + gap_d
            sstr[level] = 0 if rng.random() < 0.15 else sext + gap_s
            dext += dstr[level] * (counts[level] - 1)
            sext += sstr[level] * (counts[level] - 1)
        nbytes = run * counts[0] * counts[1] * counts[2]
        if sext > src_nbytes or nbytes > budget:
            continue
        budget -= nbytes
        so = int(rng.integers(0, src_nbytes - sext + 1)) // align * align
        do = -(-(cursor + int(rng.integers(0, 48))) // align) * align
        cursor = do + dext
        rows.append([so, do, run, counts[0], sstr[0], dstr[0], counts[1], sstr[1], dstr[1], counts[2], sstr[2],
                     dstr[2]])
    return np.asarray(rows, dtype=np.int64).reshape(-1, BOX_FIELDS), cursor + 64


def kv_nhd_boxes(num_blocks: int, block_size: int, heads: int, head_dim: int, itemsize: int, head_lo: int,
                 head_hi: int):
    """Boxes extracting heads [head_lo, head_hi) of every token of every block of a K/V cache laid out
    [2, num_blocks, block_size, heads, head_dim] into a dense [2, num_blocks, block_size, head_hi - head_lo,
    head_dim] buffer: one box per K/V plane, levels (token, block)."""
    token = heads * head_dim * itemsize
    run = (head_hi - head_lo) * head_dim * itemsize
    plane_src, plane_dst = num_blocks * block_size * token, num_blocks * block_size * run
    rows = [[kv * plane_src + head_lo * head_dim * itemsize, kv * plane_dst, run, block_size, token, run, num_blocks,
             block_size * token, block_size * run, 1, 0, 0] for kv in range(2)]
    return np.asarray(rows, dtype=np.int64), 2 * plane_src, 2 * plane_dst


# ---------------------------------------------------------------------------------------------------------------
# CPU engine (runs in CI)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ordered", [False, True])
def test_cpu_engine_matches_reference(seed, ordered):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size=1 << 21, dtype=np.uint8)
    boxes, dst_nbytes = random_boxes(rng, src.size, int(rng.integers(1, 60)), aligned=bool(seed % 2),
                                     max_run=1 << 18, max_bytes=2 << 20)
    dst = np.full(dst_nbytes, POISON, dtype=np.uint8)
    expected = reference_copy(dst, src, boxes)
    copied = _C.copy_boxes(dst.ctypes.data, dst.nbytes, src.ctypes.data, src.nbytes, boxes, num_threads=4,
                           ordered=ordered)
    assert copied == int((boxes[:, 2] * boxes[:, 3] * boxes[:, 6] * boxes[:, 9]).sum())
    np.testing.assert_array_equal(dst, expected)


def test_cpu_engine_kv_nhd_head_range():
    src = np.random.default_rng(7).integers(0, 256, size=2 * 5 * 16 * 8 * 64 * 2, dtype=np.uint8)
    boxes, src_nbytes, dst_nbytes = kv_nhd_boxes(5, 16, 8, 64, 2, 2, 6)
    dst = np.full(dst_nbytes, POISON, dtype=np.uint8)
    _C.copy_boxes(dst.ctypes.data, dst.nbytes, src.ctypes.data, src_nbytes, boxes)
    view = src.view(np.uint16).reshape(2, 5, 16, 8, 64)[:, :, :, 2:6, :]
    np.testing.assert_array_equal(dst.view(np.uint16).reshape(view.shape), view)


def test_cuda_error_type_is_runtime_error():
    if not getattr(_C, "cuda_compiled", False):
        pytest.skip("CUDA engine not compiled")
    assert issubclass(_C.CudaError, RuntimeError)
    assert _C.cuda_device_count() >= 0  # never throws, also without a driver


# ---------------------------------------------------------------------------------------------------------------
# CUDA engine


def _device_buffers(src_host: np.ndarray, dst_nbytes: int, src_shift: int, dst_shift: int):
    """Device src holding src_host and a poisoned dst, whose data pointers are shifted by the given byte counts
    from a 256-byte aligned allocation (to exercise the misaligned paths)."""
    src_alloc = torch.empty(src_host.size + 256, dtype=torch.uint8, device="cuda")
    src = src_alloc[src_shift:src_shift + src_host.size]
    src.copy_(torch.from_numpy(src_host))
    dst_alloc = torch.full((dst_nbytes + 256,), POISON, dtype=torch.uint8, device="cuda")
    dst = dst_alloc[dst_shift:dst_shift + dst_nbytes]
    return src, dst


def _run_cuda(dst: torch.Tensor, src: torch.Tensor, boxes: np.ndarray, stream: int = 0) -> int:
    return _C.copy_boxes_cuda(dst.data_ptr(), dst.numel(), src.data_ptr(), src.numel(), boxes, stream)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", range(12))
def test_cuda_random_boxes_match_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    aligned = seed % 3 != 0
    src_host = rng.integers(0, 256, size=4 << 20, dtype=np.uint8)
    boxes, dst_nbytes = random_boxes(rng, src_host.size, int(rng.integers(1, 200)), aligned=aligned,
                                     max_run=1 << 20, max_bytes=16 << 20)
    shifts = (0, 0) if aligned else (int(rng.integers(0, 16)), int(rng.integers(0, 16)))
    src, dst = _device_buffers(src_host, dst_nbytes, *shifts)
    expected = reference_copy(np.full(dst_nbytes, POISON, dtype=np.uint8), src_host, boxes)
    copied = _run_cuda(dst, src, boxes)
    torch.cuda.synchronize()
    assert copied == int((boxes[:, 2] * boxes[:, 3] * boxes[:, 6] * boxes[:, 9]).sum())
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shift", [0, 1, 8])
@pytest.mark.parametrize("run", [1, 3, 16, 256, 512, 4096, 5000, 1 << 20])
def test_cuda_run_sizes_and_alignments(run, shift):
    """One strided box per run size; equal shifts on both sides keep the phase (vector body with byte head/tail)."""
    count = max(1, min(64, (8 << 20) // run))
    rows = np.array([[shift, shift, run, count, run + 48, run + 16, 1, 0, 0, 1, 0, 0]], dtype=np.int64)
    src_host = np.random.default_rng(run).integers(0, 256, size=count * (run + 48) + 64, dtype=np.uint8)
    dst_nbytes = count * (run + 16) + 64
    src, dst = _device_buffers(src_host, dst_nbytes, 0, 0)
    expected = reference_copy(np.full(dst_nbytes, POISON, dtype=np.uint8), src_host, rows)
    _run_cuda(dst, src, rows)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_many_small_boxes():
    rng = np.random.default_rng(5)
    n = 50_000
    src_host = rng.integers(0, 256, size=n * 512, dtype=np.uint8)
    order = rng.permutation(n)
    rows = np.zeros((n, BOX_FIELDS), dtype=np.int64)
    rows[:, 0] = order * 512 + 128  # gather 256-byte runs from scattered places
    rows[:, 1] = np.arange(n) * 272
    rows[:, 2] = 256
    rows[:, [3, 6, 9]] = 1
    dst_nbytes = n * 272
    src, dst = _device_buffers(src_host, dst_nbytes, 0, 0)
    expected = reference_copy(np.full(dst_nbytes, POISON, dtype=np.uint8), src_host, rows)
    assert _run_cuda(dst, src, rows) == n * 256
    torch.cuda.synchronize()
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("itemsize,head_dim", [(2, 128), (2, 64), (1, 128)])
def test_cuda_kv_nhd_head_range(itemsize, head_dim):
    blocks, block_size, heads = 64, 16, 8
    boxes, src_nbytes, dst_nbytes = kv_nhd_boxes(blocks, block_size, heads, head_dim, itemsize, 3, 5)
    src_host = np.random.default_rng(head_dim).integers(0, 256, size=src_nbytes, dtype=np.uint8)
    src, dst = _device_buffers(src_host, dst_nbytes, 0, 0)
    _run_cuda(dst, src, boxes)
    torch.cuda.synchronize()
    token = heads * head_dim * itemsize
    view = src_host.reshape(2, blocks, block_size, token)[..., 3 * head_dim * itemsize:5 * head_dim * itemsize]
    np.testing.assert_array_equal(dst.cpu().numpy(), view.reshape(-1))


@pytest.mark.gpu
@needs_cuda
def test_cuda_invalid_box_raises_before_launch():
    src = torch.arange(1024, device="cuda").to(torch.uint8)
    dst = torch.full((1024,), POISON, dtype=torch.uint8, device="cuda")
    good = [0, 0, 16, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    bad = [0, 1000, 16, 2, 16, 16, 1, 0, 0, 1, 0, 0]  # reaches dst byte 1032 of 1024
    with pytest.raises(ValueError, match="box 1"):
        _run_cuda(dst, src, np.array([good, bad], dtype=np.int64))
    with pytest.raises(ValueError):
        _run_cuda(dst, src, np.array([[0, 0, -1, 1, 0, 0, 1, 0, 0, 1, 0, 0]], dtype=np.int64))
    with pytest.raises(ValueError):
        _run_cuda(dst, src, np.zeros((1, 11), dtype=np.int64))
    torch.cuda.synchronize()
    assert bool((dst == POISON).all()), "nothing may be copied when validation fails"


@pytest.mark.gpu
@needs_cuda
def test_cuda_non_default_stream():
    rng = np.random.default_rng(9)
    src_host = rng.integers(0, 256, size=8 << 20, dtype=np.uint8)
    boxes, dst_nbytes = random_boxes(rng, src_host.size, 64, aligned=True, max_run=1 << 20, max_bytes=32 << 20)
    src, dst = _device_buffers(src_host, dst_nbytes, 0, 0)
    expected = reference_copy(np.full(dst_nbytes, POISON, dtype=np.uint8), src_host, boxes)
    torch.cuda.synchronize()  # buffers are filled on the current stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _run_cuda(dst, src, boxes, stream=side.cuda_stream)
    side.synchronize()
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_empty_batches_are_noops():
    dst = torch.full((64,), POISON, dtype=torch.uint8, device="cuda")
    src = torch.zeros(64, dtype=torch.uint8, device="cuda")
    assert _run_cuda(dst, src, np.zeros((0, BOX_FIELDS), dtype=np.int64)) == 0
    assert _run_cuda(dst, src, np.array([[0, 0, 0, 4, 1, 1, 1, 0, 0, 1, 0, 0]], dtype=np.int64)) == 0
    torch.cuda.synchronize()
    assert bool((dst == POISON).all())
    assert _C.cuda_device_count() >= 1
