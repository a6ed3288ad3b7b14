"""Byte engines against a pure-numpy reference: the CUDA engine (gpu-marked) and the CPU engine (runs anywhere).

Every run poisons the destination with 0xA5 first and compares the whole destination buffer, so bytes outside the
boxes must come back untouched.
"""
import os
import threading
import time

import numpy as np
import pytest
import torch

from amoeba_core import _C
from amoeba_core.execution.copy import (copy_boxes, copy_boxes_bases, copy_boxes_ordered, copy_boxes_ordered_bases,
                                        make_boxes)
from test_copy import compaction_rows, random_ordered_boxes, reference_ordered

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


def total_bytes(boxes: np.ndarray) -> int:
    return int((boxes[:, 2] * boxes[:, 3] * boxes[:, 6] * boxes[:, 9]).sum())


def test_cpu_engine_gives_the_same_bytes_for_every_thread_count():
    rng = np.random.default_rng(11)
    src = rng.integers(0, 256, size=4 << 20, dtype=np.uint8)
    boxes, dst_nbytes = random_boxes(rng, src.size, 150, aligned=False, max_run=1 << 20, max_bytes=8 << 20)
    assert total_bytes(boxes) > 4 * _C.MIN_BYTES_PER_THREAD  # enough bytes for several threads
    expected = reference_copy(np.full(dst_nbytes, POISON, dtype=np.uint8), src, boxes)
    for threads in range(1, 7):
        dst = np.full(dst_nbytes, POISON, dtype=np.uint8)
        assert _C.copy_boxes(dst.ctypes.data, dst.nbytes, src.ctypes.data, src.nbytes, boxes,
                             num_threads=threads) == total_bytes(boxes)
        np.testing.assert_array_equal(dst, expected, err_msg=f"{threads} threads")


def test_cpu_pool_starts_threads_once_and_small_batches_stay_on_the_caller():
    big_src = np.random.default_rng(1).integers(0, 256, size=8 << 20, dtype=np.uint8)
    big_dst = np.zeros_like(big_src)
    whole = make_boxes(0, 0, big_src.size)
    _C.copy_boxes(big_dst.ctypes.data, big_dst.nbytes, big_src.ctypes.data, big_src.nbytes, whole, num_threads=4)
    started = _C.copy_pool_stats()
    assert started["workers"] >= 3
    for _ in range(5):
        _C.copy_boxes(big_dst.ctypes.data, big_dst.nbytes, big_src.ctypes.data, big_src.nbytes, whole, num_threads=4)
    again = _C.copy_pool_stats()
    assert again["threads_started"] == started["threads_started"], "the pool must not start threads per call"
    assert again["jobs"] == started["jobs"] + 5
    np.testing.assert_array_equal(big_dst, big_src)
    # Many small batches: every one right, none of them handed to the pool.
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, size=1 << 16, dtype=np.uint8)
    for i in range(2000):
        boxes, dst_nbytes = random_boxes(rng, src.size, 1 + i % 4, aligned=False, max_run=2048, max_bytes=64 << 10)
        dst = np.full(dst_nbytes, POISON, dtype=np.uint8)
        _C.copy_boxes(dst.ctypes.data, dst.nbytes, src.ctypes.data, src.nbytes, boxes, num_threads=8)
        if i % 100 == 0:
            np.testing.assert_array_equal(dst, reference_copy(np.full(dst_nbytes, POISON, np.uint8), src, boxes))
    assert _C.copy_pool_stats()["jobs"] == again["jobs"]


def test_cpu_pool_serves_concurrent_callers():
    """Python threads copy at the same time (the GIL is released); jobs share the pool one at a time."""
    rng = np.random.default_rng(8)
    srcs = [rng.integers(0, 256, size=4 << 20, dtype=np.uint8) for _ in range(4)]
    dsts = [np.zeros_like(s) for s in srcs]
    boxes = make_boxes(np.arange(64) * 65536, np.arange(64)[::-1] * 65536, 65536)
    errors = []

    def worker(i):
        try:
            for _ in range(10):
                _C.copy_boxes(dsts[i].ctypes.data, dsts[i].nbytes, srcs[i].ctypes.data, srcs[i].nbytes, boxes,
                              num_threads=2 + i % 2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    for src, dst in zip(srcs, dsts):
        np.testing.assert_array_equal(dst.reshape(64, -1), src.reshape(64, -1)[::-1])


def test_cpu_pool_works_in_a_forked_child():
    """fork() copies only the calling thread: the child must start its own pool instead of waiting on the parent's
    workers (which it does not have)."""
    src = np.random.default_rng(3).integers(0, 256, size=8 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    whole = make_boxes(0, 0, src.size)
    _C.copy_boxes(dst.ctypes.data, dst.nbytes, src.ctypes.data, src.nbytes, whole, num_threads=3)  # parent's pool
    pid = os.fork()
    if pid == 0:  # child: a threaded copy, then exit without running pytest's teardown
        ok = False
        try:
            out = np.zeros_like(src)
            _C.copy_boxes(out.ctypes.data, out.nbytes, src.ctypes.data, src.nbytes, whole, num_threads=3)
            ok = bool((out == src).all()) and _C.copy_pool_stats()["jobs"] == 1
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in its first threaded copy")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _addresses(arrays):
    return np.array([a.ctypes.data for a in arrays], dtype=np.uint64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_bases_match_reference(seed, threads):
    """Same boxes over several (dst, src) pairs, each pair its own data; bytes outside the boxes stay poisoned."""
    rng = np.random.default_rng(100 + seed)
    layers = int(rng.integers(1, 9))
    srcs = [rng.integers(0, 256, size=1 << 20, dtype=np.uint8) for _ in range(layers)]
    boxes, dst_nbytes = random_boxes(rng, srcs[0].size, int(rng.integers(1, 40)), aligned=bool(seed % 2),
                                     max_run=1 << 17, max_bytes=1 << 20)
    dsts = [np.full(dst_nbytes, POISON, dtype=np.uint8) for _ in range(layers)]
    copied = _C.copy_boxes_bases(_addresses(dsts), dst_nbytes, _addresses(srcs), srcs[0].size, boxes,
                                 num_threads=threads)
    assert copied == layers * total_bytes(boxes)
    for dst, src in zip(dsts, srcs):
        np.testing.assert_array_equal(dst, reference_copy(np.full(dst_nbytes, POISON, np.uint8), src, boxes))


def test_cpu_bases_ordered_relayout_of_every_buffer():
    rng = np.random.default_rng(5)
    boxes = random_ordered_boxes(rng, 300, 10)
    bufs = [rng.integers(0, 256, size=300, dtype=np.uint8) for _ in range(7)]
    want = [reference_ordered(b, boxes) for b in bufs]
    _C.copy_boxes_bases(_addresses(bufs), 300, _addresses(bufs), 300, boxes, num_threads=3, ordered=True)
    for got, w in zip(bufs, want):
        np.testing.assert_array_equal(got, w)


def test_cpu_bases_reject_bad_input_before_copying():
    srcs = [np.zeros(64, np.uint8) for _ in range(3)]
    dsts = [np.full(64, POISON, np.uint8) for _ in range(3)]
    good, bad = [0, 0, 8, 1, 0, 0, 1, 0, 0, 1, 0, 0], [0, 60, 8, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="box 1 .* dst byte 68 of 64"):
        _C.copy_boxes_bases(_addresses(dsts), 64, _addresses(srcs), 64, np.array([good, bad]))
    with pytest.raises(ValueError, match="src_bases has 2 entries, expected 3"):
        _C.copy_boxes_bases(_addresses(dsts), 64, _addresses(srcs[:2]), 64, np.array([good]))
    with pytest.raises(ValueError, match=r"dst_bases\[1\] is null"):
        _C.copy_boxes_bases(np.array([dsts[0].ctypes.data, 0], np.uint64), 64, _addresses(srcs[:2]), 64,
                            np.array([good]))
    assert all(bool((d == POISON).all()) for d in dsts)


def test_cuda_error_type_is_runtime_error():
    if not getattr(_C, "cuda_compiled", False):
        pytest.skip("CUDA engine not compiled")
    assert issubclass(_C.CudaError, RuntimeError)
    assert _C.cuda_device_count() >= 0  # never throws, also without a driver
    # Descriptor space: grows with boxes, launches and layers.
    one = _C.cuda_descriptor_bytes(1)
    assert _C.cuda_descriptor_bytes(2) > one and _C.cuda_descriptor_bytes(1, 2) > one
    assert _C.cuda_descriptor_bytes(1, 1, 8) > one


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
    """The raw engine call, its descriptors in a torch tensor allocated on the current stream."""
    desc = torch.empty(_C.cuda_descriptor_bytes(len(boxes)), dtype=torch.uint8, device=dst.device)
    return _C.copy_boxes_cuda(dst.data_ptr(), dst.numel(), src.data_ptr(), src.numel(), boxes, desc.data_ptr(),
                              desc.numel(), dst.device.index, stream)


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


def _layers_on_device(hosts, shifts):
    """One device tensor per host array, each at its own byte shift from a 256-byte aligned allocation (layers of
    different alignment); returns (views, allocations)."""
    allocs, views = [], []
    for host, shift in zip(hosts, shifts):
        alloc = torch.full((host.size + 256,), POISON, dtype=torch.uint8, device="cuda")
        view = alloc[shift:shift + host.size]
        view.copy_(torch.from_numpy(host))
        allocs.append(alloc)
        views.append(view)
    return views, allocs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", range(6))
def test_cuda_bases_match_reference(seed):
    """Same boxes over several layers in one launch; layers at different alignments (the word width must suit
    every layer), each layer its own data, every destination byte outside the boxes still poisoned."""
    rng = np.random.default_rng(2000 + seed)
    layers = int(rng.integers(1, 12))
    aligned = seed % 2 == 0
    src_hosts = [rng.integers(0, 256, size=2 << 20, dtype=np.uint8) for _ in range(layers)]
    boxes, dst_nbytes = random_boxes(rng, src_hosts[0].size, int(rng.integers(1, 100)), aligned=aligned,
                                     max_run=1 << 19, max_bytes=4 << 20)
    shifts = [0] * layers if aligned else [int(x) for x in rng.integers(0, 16, size=layers)]
    srcs, _src_allocs = _layers_on_device(src_hosts, shifts)
    dst_shifts = shifts if seed % 3 else [int(x) for x in rng.integers(0, 16, size=layers)]
    dsts, _dst_allocs = _layers_on_device([np.full(dst_nbytes, POISON, np.uint8)] * layers, dst_shifts)
    copied = copy_boxes_bases(dsts, srcs, boxes)
    torch.cuda.synchronize()
    assert copied == layers * total_bytes(boxes)
    for dst, host in zip(dsts, src_hosts):
        np.testing.assert_array_equal(dst.cpu().numpy(),
                                      reference_copy(np.full(dst_nbytes, POISON, np.uint8), host, boxes))


@pytest.mark.gpu
@needs_cuda
def test_cuda_bases_kv_head_range_over_32_layers():
    boxes, src_nbytes, dst_nbytes = kv_nhd_boxes(64, 16, 8, 128, 2, 2, 6)
    hosts = [np.random.default_rng(i).integers(0, 256, size=src_nbytes, dtype=np.uint8) for i in range(32)]
    srcs = [torch.from_numpy(h).cuda() for h in hosts]
    dsts = [torch.full((dst_nbytes,), POISON, dtype=torch.uint8, device="cuda") for _ in hosts]
    copy_boxes_bases(dsts, srcs, boxes)
    torch.cuda.synchronize()
    for dst, host in zip(dsts, hosts):
        view = host.reshape(2, 64, 16, 8 * 128 * 2)[..., 2 * 256:6 * 256]
        np.testing.assert_array_equal(dst.cpu().numpy(), view.reshape(-1))


@pytest.mark.gpu
@needs_cuda
def test_cuda_short_descriptor_buffer_raises_before_launch():
    src = torch.arange(1024, device="cuda").to(torch.uint8)
    dst = torch.full((1024,), POISON, dtype=torch.uint8, device="cuda")
    boxes = make_boxes([0, 512], [0, 512], [16, 16])
    short = torch.empty(_C.cuda_descriptor_bytes(len(boxes)) - 1, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="descriptor buffer holds"):
        _C.copy_boxes_cuda(dst.data_ptr(), 1024, src.data_ptr(), 1024, boxes, short.data_ptr(), short.numel(),
                           0, 0)
    torch.cuda.synchronize()
    assert bool((dst == POISON).all())


def _sleep_stream(seconds: float):
    """Keeps the current stream busy for at least about `seconds` (a spinning kernel; GPU clocks stay below 2 GHz)."""
    torch.cuda._sleep(int(seconds * 2e9))


@pytest.mark.gpu
@needs_cuda
def test_cuda_calls_queue_behind_a_busy_stream_without_waiting_and_stay_correct():
    """Descriptors of consecutive calls must not share a pinned buffer while an upload from it is pending: queue
    many calls, each with different boxes, behind a long kernel, then check every result. The calls themselves
    must not wait for the stream (no synchronising copy, no allocation outside torch's allocator)."""
    n_calls, piece = 24, 4096
    src = torch.randint(0, 256, (n_calls * piece * 2,), dtype=torch.uint8, device="cuda")
    dst = torch.full((n_calls * piece,), POISON, dtype=torch.uint8, device="cuda")
    calls = [make_boxes(np.arange(i % 4 + 1) * 2 * piece // 4 + i * 2 * piece,
                        np.arange(i % 4 + 1) * piece // 4 + i * piece, piece // 4) for i in range(n_calls)]
    for boxes in calls:  # warm-up: pinned buffers and the caching allocator reach their steady state
        copy_boxes(dst, src, boxes)
    _sleep_stream(0.05)
    for boxes in calls:
        copy_boxes(dst, src, boxes)
    torch.cuda.synchronize()
    dst.fill_(POISON)
    allocated = torch.cuda.memory_allocated()
    _sleep_stream(1.0)
    start = time.perf_counter()
    for boxes in calls:
        copy_boxes(dst, src, boxes)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    assert queued < 0.3, f"{n_calls} calls took {queued:.3f} s of host time behind a 1 s kernel"
    assert torch.cuda.memory_allocated() == allocated, "descriptor tensors must go back to the caching allocator"
    expected = np.full(dst.numel(), POISON, np.uint8)
    host = src.cpu().numpy()
    for boxes in calls:
        expected = reference_copy(expected, host, boxes)
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_more_calls_than_pinned_buffers_stay_correct():
    """Beyond the pinned pool's size (32 buffers per device) a call waits for the oldest upload, never overwrites."""
    n_calls, piece = 80, 1024
    src = torch.randint(0, 256, (n_calls * piece,), dtype=torch.uint8, device="cuda")
    dst = torch.full((n_calls * piece,), POISON, dtype=torch.uint8, device="cuda")
    _sleep_stream(0.05)
    for i in range(n_calls):  # reversed order inside dst, one box per call
        copy_boxes(dst, src, make_boxes(i * piece, (n_calls - 1 - i) * piece, piece))
    torch.cuda.synchronize()
    want = src.view(n_calls, piece).flip(0).reshape(-1)
    assert torch.equal(dst, want)


@pytest.mark.gpu
@needs_cuda
def test_cuda_call_from_a_thread_with_another_current_device():
    """The engine makes the tensors' device current for the call and restores the caller's."""
    devices = torch.cuda.device_count()
    target = devices - 1  # another device than 0 when there are several
    src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, device=f"cuda:{target}")
    dst = torch.full((1 << 16,), POISON, dtype=torch.uint8, device=f"cuda:{target}")
    boxes = make_boxes(np.arange(8) * 8192, np.arange(8)[::-1] * 8192, 8192)
    errors, seen = [], []

    def worker():
        try:
            torch.cuda.set_device(0)
            copy_boxes(dst, src, boxes)
            copy_boxes_ordered(dst, make_boxes(8192, 0, 8192), torch.empty(4096, dtype=torch.uint8,
                                                                            device=f"cuda:{target}"))
            seen.append(torch.cuda.current_device())
            torch.cuda.synchronize(target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(60)
    assert not errors, errors
    assert seen == [0]
    expected = reference_copy(np.full(1 << 16, POISON, np.uint8), src.cpu().numpy(), boxes)
    expected = reference_ordered(expected, make_boxes(8192, 0, 8192))
    np.testing.assert_array_equal(dst.cpu().numpy(), expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scratch_nbytes", [0, 64, 4096])
def test_cuda_ordered_relayout_matches_run_by_run_memmoves(scratch_nbytes):
    """Any ordered boxes (runs up, down, onto themselves, overwriting each other) through the phase planner."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        size = int(rng.integers(16, 4000))
        boxes = random_ordered_boxes(rng, size, int(rng.integers(1, 12)))
        host = rng.integers(0, 256, size=size, dtype=np.uint8)
        buf = torch.from_numpy(host).cuda()
        copy_boxes_ordered(buf, boxes, torch.empty(scratch_nbytes, dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()
        np.testing.assert_array_equal(buf.cpu().numpy(), reference_ordered(host, boxes), err_msg=f"seed {seed}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scratch_mib", [0, 1, 64])
def test_cuda_in_place_compaction_of_a_large_buffer(scratch_mib):
    """A weight-shaped 2:1 compaction (4096 rows of 8 KiB keep their second half) of 32 MiB in place."""
    rows, old_len = 4096, 8192
    boxes = make_boxes(np.arange(rows) * old_len + old_len // 2, np.arange(rows) * (old_len // 2), old_len // 2)
    host = np.random.default_rng(1).integers(0, 256, size=rows * old_len, dtype=np.uint8)
    buf = torch.from_numpy(host).cuda()
    scratch = torch.empty(scratch_mib << 20, dtype=torch.uint8, device="cuda")
    copy_boxes_ordered(buf, boxes, scratch)
    torch.cuda.synchronize()
    want = host.reshape(rows, old_len)[:, old_len // 2:].reshape(-1)
    np.testing.assert_array_equal(buf.cpu().numpy()[:want.size], want)
    np.testing.assert_array_equal(buf.cpu().numpy()[want.size:], host[want.size:])


@pytest.mark.gpu
@needs_cuda
def test_cuda_ordered_relayout_of_many_layers():
    rng = np.random.default_rng(4)
    boxes, new_len = compaction_rows(rng, 300, 97)
    hosts = [rng.integers(0, 256, size=300 * 97, dtype=np.uint8) for _ in range(12)]
    bufs = [torch.from_numpy(h).cuda() for h in hosts]
    copied = copy_boxes_ordered_bases(bufs, boxes, torch.empty(12 * 2048, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    assert copied == 12 * 300 * new_len
    for buf, host in zip(bufs, hosts):
        np.testing.assert_array_equal(buf.cpu().numpy(), reference_ordered(host, boxes))
