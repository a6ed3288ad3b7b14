"""Python side of the byte engine: box construction, thread count, copies over many buffers, and in-place (ordered)
relayout planned as parallel phases (checked against a run-by-run reference)."""
import os

import numpy as np
import pytest
import torch

from amoeba_core import _C
from amoeba_core.errors import ConfigError, SpecMismatchError
from amoeba_core.execution.copy import (BOX_FIELDS, PHASE_DIRECT, PHASE_GATHER, PHASE_SCATTER, PrivateAnonymous, Terms,
                                        compact_in_place, copy_boxes, copy_boxes_bases, copy_boxes_ordered,
                                        copy_boxes_ordered_bases, copy_threads, expand_runs, make_boxes, ordered_phases,
                                        row_major_boxes, set_copy_threads)


def compaction_boxes(rows, old_len, new_len, keep):
    """Boxes that move columns keep=[(old_start, new_start, length)] of a (rows, old_len) byte matrix to a
    (rows, new_len) layout at the front of the same buffer."""
    return row_major_boxes([k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep], rows, old_len, new_len)


@pytest.mark.parametrize("staged", [False, True])
def test_in_place_compaction_matches_out_of_place(staged):
    rows, old_len, new_len = 37, 50, 21
    keep = [(3, 0, 7), (20, 7, 9), (45, 16, 5)]
    buf = torch.randint(0, 256, (rows * old_len,), dtype=torch.uint8)
    want = buf.view(rows, old_len)
    want = torch.cat([want[:, 3:10], want[:, 20:29], want[:, 45:50]], dim=1).reshape(-1)
    scratch = torch.empty(64, dtype=torch.uint8)  # smaller than the data: the staged path works in batches
    copy_boxes_ordered(buf, compaction_boxes(rows, old_len, new_len, keep), scratch, staged=staged)
    assert torch.equal(buf[:rows * new_len], want)


def test_staged_relayout_splits_runs_longer_than_scratch():
    buf = torch.arange(256, dtype=torch.int32).view(torch.uint8).clone()
    want = buf[100:1000].clone()
    copy_boxes_ordered(buf, make_boxes([100], [0], [900]), torch.empty(64, dtype=torch.uint8), staged=True)
    assert torch.equal(buf[:900], want)


def test_copy_boxes_between_dtypes_works_on_bytes():
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    dst = torch.zeros(3, 2, dtype=torch.float32)
    copy_boxes(dst, src, make_boxes(4, 0, 8, 3, 16, 8))  # columns 1..2 of every row
    assert torch.equal(dst, src[:, 1:3])


def test_expand_runs_orders_level0_fastest():
    boxes = make_boxes(0, 100, 2, 3, 10, 2)
    boxes[0, 6:9] = [2, 1000, 6]  # level 1: 2 repetitions
    runs = expand_runs(boxes)
    assert runs[:, 0].tolist() == [0, 10, 20, 1000, 1010, 1020]
    assert runs[:, 1].tolist() == [100, 102, 104, 106, 108, 110]


def test_invalid_boxes_raise_before_copying():
    src, dst = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reaches src byte 20 of 16"):
        copy_boxes(dst, src, make_boxes(10, 0, 10))
    assert dst.eq(1).all()


# ---------------------------------------------------------------------------------------------------------------
# Thread count of CPU copies


@pytest.fixture
def default_threads():
    """Restores the process default after a test that changes it."""
    yield
    set_copy_threads(None)


def test_copy_threads_default_to_the_affinity_mask(default_threads):
    set_copy_threads(None)
    assert copy_threads() == len(os.sched_getaffinity(0))


def test_set_copy_threads_changes_the_default_and_validates(default_threads):
    set_copy_threads(3)
    assert copy_threads() == 3
    set_copy_threads(0)
    assert copy_threads() == len(os.sched_getaffinity(0))
    for bad in (-1, 257, 2.0, "4", True):
        with pytest.raises(ConfigError, match="set_copy_threads"):
            set_copy_threads(bad)


def test_copy_with_default_threads_uses_the_pool(default_threads):
    """A large copy with the default thread count wakes pool workers; it never starts more than it keeps."""
    set_copy_threads(3)
    src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    before = _C.copy_pool_stats()
    copy_boxes(dst, src, make_boxes(0, 0, src.numel()))
    after = _C.copy_pool_stats()
    assert torch.equal(dst, src)
    assert after["jobs"] == before["jobs"] + 1
    assert after["workers"] >= 2 and after["threads_started"] == after["workers"]


# ---------------------------------------------------------------------------------------------------------------
# The same boxes over many buffers (Python wrapper; the engine itself is tested in test_cuda_copy.py)


def test_copy_boxes_bases_applies_boxes_to_every_pair():
    layers = [torch.arange(24, dtype=torch.int16) + 100 * i for i in range(5)]
    outs = [torch.full((6,), -1, dtype=torch.int16) for _ in range(5)]
    copied = copy_boxes_bases(outs, layers, make_boxes([4, 30], [0, 8], [8, 4]))  # elements 2..5 and 15..16
    assert copied == 5 * 12
    for layer, out in zip(layers, outs):
        assert out.tolist() == layer[[2, 3, 4, 5, 15, 16]].tolist()


def test_copy_boxes_bases_rejects_mismatched_lists():
    a, b = torch.zeros(16, dtype=torch.uint8), torch.zeros(32, dtype=torch.uint8)
    box = make_boxes(0, 0, 4)
    with pytest.raises(SpecMismatchError, match="2 destinations but 1 sources"):
        copy_boxes_bases([a, a.clone()], [a], box)
    with pytest.raises(SpecMismatchError, match=r"srcs\[1\] has 32 bytes, srcs\[0\] has 16"):
        copy_boxes_bases([a, a.clone()], [a.clone(), b], box)
    with pytest.raises(SpecMismatchError, match=r"dsts\[0\] is not contiguous"):
        copy_boxes_bases([b.view(4, 8).t()], [b], box)
    with pytest.raises(SpecMismatchError, match=r"srcs\[0\] is on meta"):
        copy_boxes_bases([a], [torch.empty(16, dtype=torch.uint8, device="meta")], box)
    with pytest.raises(SpecMismatchError, match="at least one tensor"):
        copy_boxes_bases([], [], box)


def test_boxes_of_the_wrong_shape_are_rejected_not_reinterpreted():
    buf = torch.zeros(256, dtype=torch.uint8)
    eleven = np.zeros((12, 11), dtype=np.int64)  # as many numbers as 11 boxes, but not boxes
    with pytest.raises(ValueError, match="columns=11"):
        copy_boxes(buf, buf.clone(), eleven)
    with pytest.raises(ValueError, match="columns=11"):
        copy_boxes_bases([buf], [buf.clone()], eleven)
    with pytest.raises(ValueError, match="columns=11"):
        copy_boxes_ordered(buf, eleven, torch.empty(0, dtype=torch.uint8), staged=True)


def test_copy_boxes_bases_checks_bounds_once_before_copying():
    dsts = [torch.full((16,), 7, dtype=torch.uint8) for _ in range(3)]
    srcs = [torch.zeros(16, dtype=torch.uint8) for _ in range(3)]
    with pytest.raises(ValueError, match="box 1 .* and dst byte 20 of 16"):
        copy_boxes_bases(dsts, srcs, make_boxes([0, 8], [0, 12], [4, 8]))
    assert all(bool(d.eq(7).all()) for d in dsts)


# ---------------------------------------------------------------------------------------------------------------
# Ordered (in-place) relayout: planned phases against a run-by-run reference


def box_runs(boxes):
    """(src, dst, n) of every run of every box, box order, level 0 fastest (plain loops, independent of the
    library's expand_runs)."""
    out = []
    for so, do, n, c0, s0, d0, c1, s1, d1, c2, s2, d2 in np.asarray(boxes, dtype=np.int64).reshape(-1, 12).tolist():
        for i2 in range(c2):
            for i1 in range(c1):
                for i0 in range(c0):
                    out.append((so + i0 * s0 + i1 * s1 + i2 * s2, do + i0 * d0 + i1 * d1 + i2 * d2, n))
    return out


def reference_ordered(buf: np.ndarray, boxes) -> np.ndarray:
    """The ordered semantics, literally: one memmove per run, in order."""
    out = buf.copy()
    for s, d, n in box_runs(boxes):
        out[d:d + n] = out[s:s + n].copy()
    return out


def check_phase_table(phases, buf_nbytes: int, scratch_nbytes: int):
    """Checks, byte by byte, the conditions under which each phase is safe as one parallel copy (the correctness
    argument of csrc/ordered_phases.cpp): a direct phase writes no byte twice and no byte it reads; a gather packs
    disjointly into scratch and is followed by a scatter of exactly its packed ranges; in a staged step no piece
    reads a byte an earlier piece wrote, and no byte is written twice."""
    kinds, starts, rows = phases
    assert starts[0] == 0 and starts[-1] == len(rows) and np.all(np.diff(starts) >= 0)
    p = 0
    while p < len(kinds):
        runs = box_runs(rows[starts[p]:starts[p + 1]])
        assert runs, f"phase {p} is empty"
        if kinds[p] == PHASE_DIRECT:
            writes, reads = np.zeros(buf_nbytes, np.int64), np.zeros(buf_nbytes, bool)
            for s, d, n in runs:
                writes[d:d + n] += 1
                reads[s:s + n] = True
            assert writes.max() <= 1, f"direct phase {p} writes a byte twice"
            assert not (reads & (writes > 0)).any(), f"direct phase {p} writes a byte it reads"
            p += 1
            continue
        assert kinds[p] == PHASE_GATHER and p + 1 < len(kinds) and kinds[p + 1] == PHASE_SCATTER, kinds[p:p + 2]
        scatter = box_runs(rows[starts[p + 1]:starts[p + 2]])
        packed = np.zeros(scratch_nbytes, np.int64)
        for _, q, n in runs:
            packed[q:q + n] += 1
        assert packed.max() <= 1, f"gather {p} packs two pieces onto the same scratch bytes"
        assert sorted((q, n) for _, q, n in runs) == sorted((q, n) for q, _, n in scatter), \
            f"scatter {p + 1} does not unpack exactly what gather {p} packed"
        dst_of = {q: d for q, d, _ in scatter}
        written = np.zeros(buf_nbytes, bool)
        for s, q, n in runs:  # pieces in step order
            assert not written[s:s + n].any(), f"staged step {p}: a piece reads what an earlier one wrote"
            d = dst_of[q]
            assert not written[d:d + n].any(), f"staged step {p}: a byte is written twice"
            written[d:d + n] = True
        p += 2


def run_phases_on_cpu(buf: np.ndarray, phases, scratch_nbytes: int, num_threads: int = 4) -> np.ndarray:
    out = buf.copy()
    scratch = np.zeros(max(scratch_nbytes, 1), np.uint8)
    _C.copy_phases(np.array([out.ctypes.data], np.uint64), out.nbytes, np.array([scratch.ctypes.data], np.uint64),
                   scratch_nbytes, *phases, num_threads)
    return out


def random_ordered_boxes(rng: np.random.Generator, size: int, num_boxes: int) -> np.ndarray:
    """Any in-buffer boxes: runs moving up or down, onto themselves, in place (src == dst), empty, repeated over
    levels with strides (0 included); destinations may overlap each other and later sources."""
    rows = []
    while len(rows) < num_boxes:
        n = int(rng.integers(0, size // 2 + 1))
        counts, sstr, dstr = [1, 1, 1], [0, 0, 0], [0, 0, 0]
        for level in range(int(rng.integers(0, 3))):
            counts[level] = int(rng.integers(1, 4))
            sstr[level] = int(rng.integers(0, size // 4 + 1))
            dstr[level] = int(rng.integers(0, size // 4 + 1))
        sext = n + sum((c - 1) * st for c, st in zip(counts, sstr))
        dext = n + sum((c - 1) * st for c, st in zip(counts, dstr))
        if sext > size or dext > size:
            continue
        so = int(rng.integers(0, size - sext + 1))
        do = so if rng.random() < 0.1 and so + dext <= size else int(rng.integers(0, size - dext + 1))
        rows.append([so, do, n, counts[0], sstr[0], dstr[0], counts[1], sstr[1], dstr[1], counts[2], sstr[2], dstr[2]])
    return np.asarray(rows, dtype=np.int64)


def compaction_rows(rng: np.random.Generator, rows: int, old_len: int):
    """The planners' in-place compaction: a random subset of columns of every row of a (rows, old_len) byte matrix
    packed to the front, row-major. Returns (boxes, new_len)."""
    cuts = np.sort(rng.choice(np.arange(1, old_len), size=int(rng.integers(1, min(6, old_len - 1) + 1)) * 2 - 1,
                              replace=False)) if old_len > 2 else np.array([1])
    edges = np.concatenate(([0], cuts, [old_len]))
    keep = [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]
    if rng.random() < 0.5:
        keep = [(int(a), int(b - a)) for a, b in zip(edges[1::2], edges[2::2])] or keep
    dst, new_len = [], 0
    for _, n in keep:
        dst.append(new_len)
        new_len += n
    return row_major_boxes([k[0] for k in keep], dst, [k[1] for k in keep], rows, old_len, new_len), new_len


@pytest.mark.parametrize("scratch_nbytes", [0, 64, 100, 4096])
@pytest.mark.parametrize("launch_bytes", [0, 256, 1 << 30])
def test_phases_of_random_relayouts_equal_run_by_run_memmoves(scratch_nbytes, launch_bytes):
    """Any ordered boxes, planned with and without scratch and with every direct/staged preference."""
    kinds_seen = set()
    for seed in range(150):
        rng = np.random.default_rng(seed)
        size = int(rng.integers(16, 400))
        boxes = random_ordered_boxes(rng, size, int(rng.integers(1, 12)))
        buf = rng.integers(0, 256, size=size, dtype=np.uint8)
        phases = ordered_phases(boxes, size, scratch_nbytes, launch_bytes=launch_bytes)
        check_phase_table(phases, size, scratch_nbytes)
        np.testing.assert_array_equal(run_phases_on_cpu(buf, phases, scratch_nbytes), reference_ordered(buf, boxes),
                                      err_msg=f"seed {seed}")
        kinds_seen.update(phases.kinds.tolist())
    if scratch_nbytes >= 64 and launch_bytes > 0:
        assert kinds_seen == {PHASE_DIRECT, PHASE_GATHER, PHASE_SCATTER}
    else:
        assert kinds_seen == {PHASE_DIRECT}


def test_phases_of_every_single_run_and_pair_of_runs_in_a_small_buffer():
    """Exhaustive over small cases: every run (src, dst, n) in a 12-byte buffer, and every pair of runs in a 5-byte
    buffer, planned direct-only and staged-preferring."""
    def runs_in(size):
        return [(s, d, n) for n in range(1, size + 1) for s in range(size - n + 1) for d in range(size - n + 1)]

    cases = [[r] for r in runs_in(12)] + [[a, b] for a in runs_in(5) for b in runs_in(5)]
    for case in cases:
        boxes = make_boxes(*zip(*case))
        size = 12 if len(case) == 1 else 5
        buf = np.arange(1, size + 1, dtype=np.uint8)
        want = reference_ordered(buf, boxes)
        for scratch_nbytes, launch_bytes in ((0, 0), (64, 1 << 30)):
            phases = ordered_phases(boxes, size, scratch_nbytes, launch_bytes=launch_bytes)
            check_phase_table(phases, size, scratch_nbytes)
            got = run_phases_on_cpu(buf, phases, scratch_nbytes, num_threads=1)
            assert got.tolist() == want.tolist(), (case, scratch_nbytes, phases)


@pytest.mark.parametrize("seed", range(8))
def test_compaction_takes_few_phases(seed):
    """The planners' compaction: direct phases that grow geometrically, so a 2:1 compaction of R rows needs about
    log2(R) phases without scratch, and staged phases only when a direct one would move little."""
    rng = np.random.default_rng(seed)
    rows, old_len = int(rng.integers(64, 2000)), int(rng.integers(3, 200))
    boxes, new_len = compaction_rows(rng, rows, old_len)
    size = rows * old_len
    buf = rng.integers(0, 256, size=size, dtype=np.uint8)
    want = reference_ordered(buf, boxes)
    for scratch_nbytes in (0, 256, size):
        phases = ordered_phases(boxes, size, scratch_nbytes, launch_bytes=4096)
        check_phase_table(phases, size, scratch_nbytes)
        np.testing.assert_array_equal(run_phases_on_cpu(buf, phases, scratch_nbytes), want)
    direct_only = ordered_phases(boxes, size, 0, launch_bytes=4096)
    # Row r lands at r * new_len: a direct phase from row a reaches up to about row a * old_len / new_len.
    ratio = old_len / new_len
    assert len(direct_only.kinds) <= 2 * (np.log(rows) / np.log(ratio) + 2) + 1 if ratio > 1 else True


def test_two_to_one_compaction_stages_only_its_start():
    """Staging the first rows (whose direct steps are tiny) and then doubling direct steps: the bytes copied twice
    stay within a few launches' worth, however large the scratch."""
    rows, old_len = 4096, 64
    boxes = make_boxes(np.arange(rows) * old_len + 32, np.arange(rows) * 32, 32)
    phases = ordered_phases(boxes, rows * old_len, rows * old_len, launch_bytes=1024)
    check_phase_table(phases, rows * old_len, rows * old_len)
    staged_bytes = sum(n for p in np.flatnonzero(phases.kinds == PHASE_GATHER)
                       for _, _, n in box_runs(phases.rows[phases.starts[p]:phases.starts[p + 1]]))
    assert 0 < staged_bytes <= 8 * 1024
    assert len(phases.kinds) <= np.log2(rows) + 3


def test_planned_relayout_of_one_long_shift_stages_through_scratch():
    """A long run moving down by a little: direct phases could move only `shift` bytes each; with scratch the
    planner stages scratch-sized steps instead."""
    size, shift = 1 << 16, 16
    boxes = make_boxes([shift], [0], [size - shift])
    phases = ordered_phases(boxes, size, 4096, launch_bytes=8 << 20)
    check_phase_table(phases, size, 4096)
    assert set(phases.kinds.tolist()) == {PHASE_GATHER, PHASE_SCATTER}
    assert len(phases.kinds) == 2 * -(-(size - shift) // (4096 - 15))
    buf = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    np.testing.assert_array_equal(run_phases_on_cpu(buf, phases, 4096), reference_ordered(buf, boxes))


def test_phase_table_is_checked_before_running():
    buf = np.zeros(32, np.uint8)
    addr = np.array([buf.ctypes.data], np.uint64)
    scratch = np.zeros(16, np.uint8)
    saddr = np.array([scratch.ctypes.data], np.uint64)
    kinds, starts, rows = np.array([1], np.int8), np.array([0, 1]), make_boxes(0, 8, 16)
    with pytest.raises(ValueError, match="phase 0: box 0 .* reaches src byte 16 of 32 and dst byte 24 of 16"):
        _C.copy_phases(addr, 32, saddr, 16, kinds, starts, rows)
    with pytest.raises(ValueError, match="unknown kind 7"):
        _C.copy_phases(addr, 32, saddr, 16, np.array([7], np.int8), starts, make_boxes(0, 0, 1))
    with pytest.raises(ValueError, match="starts must run from 0"):
        _C.copy_phases(addr, 32, saddr, 16, kinds, np.array([0, 2]), make_boxes(0, 0, 1))


@pytest.mark.parametrize("staged", [False, True])
def test_ordered_relayout_of_many_layers(staged):
    """copy_boxes_ordered_bases: the same compaction on every layer, scratch shared out between layers."""
    rng = np.random.default_rng(3)
    boxes, new_len = compaction_rows(rng, 40, 33)
    layers = [torch.randint(0, 256, (40 * 33,), dtype=torch.uint8) for _ in range(6)]
    want = [reference_ordered(t.numpy(), boxes) for t in layers]
    copied = copy_boxes_ordered_bases(layers, boxes, torch.empty(6 * 96, dtype=torch.uint8), staged=staged)
    assert copied == 6 * 40 * new_len
    for t, w in zip(layers, want):
        np.testing.assert_array_equal(t.numpy(), w)


def test_ordered_relayout_rejects_overlapping_buffers_and_scratch():
    base = torch.zeros(64, dtype=torch.uint8)
    boxes = make_boxes(8, 0, 8)
    with pytest.raises(SpecMismatchError, match="buffers 0 and 1 overlap"):
        copy_boxes_ordered_bases([base[:32], base[16:48]], boxes)
    with pytest.raises(SpecMismatchError, match="scratch .* overlaps buffer 0"):
        copy_boxes_ordered(base[:32], boxes, base[24:40], staged=True)


# ---- building boxes ------------------------------------------------------------------------------------------
def test_make_boxes_takes_scalars_arrays_and_terms_and_matches_a_row_by_row_build():
    rng = np.random.default_rng(0)
    values, table = rng.integers(0, 1 << 20, 50), rng.integers(0, 1 << 10, 7)
    index, group = rng.integers(0, 50, 30), rng.integers(0, 7, 30)
    packed = rng.integers(0, 1 << 16, 30)
    src = Terms(11, ((3, values, index), (5, table, group)))
    dst = Terms(0, ((1, packed, None), (2, table, group)))
    boxes = make_boxes(src, dst, np.full(30, 64), 16, 4096, 64, 2, 1 << 20, Terms(0, ((1, table, group),)))
    for i, row in enumerate(boxes.tolist()):
        assert row == [11 + 3 * values[index[i]] + 5 * table[group[i]], packed[i] + 2 * table[group[i]], 64,
                       16, 4096, 64, 2, 1 << 20, table[group[i]], 1, 0, 0]
    assert make_boxes(5, [1, 2], np.int64(3)).tolist() == [[5, 1, 3, 1, 0, 0, 1, 0, 0, 1, 0, 0],
                                                         [5, 2, 3, 1, 0, 0, 1, 0, 0, 1, 0, 0]]
    assert make_boxes(np.zeros(0, dtype=np.int64), 0, 8).shape == (0, BOX_FIELDS)


def test_make_boxes_rejects_columns_of_other_lengths_and_indices_out_of_range():
    with pytest.raises(ValueError, match="3 entries, expected 5"):
        make_boxes(np.arange(3), np.arange(5), 1)
    with pytest.raises(ValueError, match=r"index\[1\] = 9 is outside \[0, 4\)"):
        make_boxes(Terms(0, ((1, np.arange(4), np.array([0, 9])),)), 0, 1)


# ---- in-place compaction that moves whole pages (compact_in_place, _C.remap_boxes_ordered) -------------------
PAGE = os.sysconf("SC_PAGE_SIZE")


def _memmove_reference(buf: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """The run-by-run memmoves of the boxes applied to a copy of buf (the independent expectation)."""
    out = buf.clone()
    for src, dst, n in expand_runs(boxes).tolist():
        out[dst:dst + n] = out[src:src + n].clone()
    return out


@pytest.mark.parametrize("misalign", [0, 64, 1000])
def test_remapped_compaction_equals_memmoves_on_the_destinations(misalign):
    """Two long runs moved down (like gate_up's kept halves) and a short one: the long runs' whole pages are
    remapped, their unaligned ends and the short run copied; every destination byte equals the memmove result."""
    storage = torch.randint(0, 256, (96 * PAGE + misalign,), dtype=torch.uint8)
    buf = storage[misalign:]                       # torch CPU tensors are rarely page aligned: cover both
    n = 16 * PAGE + 123
    boxes = make_boxes([40 * PAGE + 5, 70 * PAGE + 128, 90 * PAGE], [5, n + 5, 2 * n + 5], [n, n, 300])
    want = _memmove_reference(buf, boxes)
    remapped = _C.remap_boxes_ordered(buf.data_ptr(), buf.numel(), boxes, 4 * PAGE)
    assert remapped >= 2 * 15 * PAGE, remapped   # both long runs went by page table, not by copy
    end = 2 * n + 5 + 300
    assert torch.equal(buf[:end], want[:end])


def test_remap_is_not_used_when_runs_read_the_same_bytes():
    """Overlapping sources (not a compaction): a remapped source would hold other bytes, so every run is copied
    and the whole buffer equals the memmoves."""
    buf = torch.randint(0, 256, (64 * PAGE,), dtype=torch.uint8)
    boxes = make_boxes([32 * PAGE, 32 * PAGE], [0, 16 * PAGE], [16 * PAGE, 16 * PAGE])
    want = _memmove_reference(buf, boxes)
    assert _C.remap_boxes_ordered(buf.data_ptr(), buf.numel(), boxes, PAGE) == 0
    assert torch.equal(buf, want)


def test_remap_leaves_runs_that_overlap_their_destination_to_memmove():
    buf = torch.randint(0, 256, (64 * PAGE,), dtype=torch.uint8)
    boxes = make_boxes([8 * PAGE], [0], [40 * PAGE])  # moves down by less than its length
    want = _memmove_reference(buf, boxes)
    assert _C.remap_boxes_ordered(buf.data_ptr(), buf.numel(), boxes, PAGE) == 0
    assert torch.equal(buf, want)


def test_compact_in_place_of_a_weight_like_tensor_is_bit_exact():
    """A (rows, 2 * cols) tensor whose second column half moves down by whole-page distances (a merged column
    weight keeping half of each section), through the executor's entry point."""
    rows, cols = 256, 2048                       # 4 MiB: both halves of each section are long runs
    t = torch.randn(2 * rows, cols, dtype=torch.float32)
    row_bytes = cols * 4
    boxes = make_boxes([0, 2 * rows // 2 * row_bytes + rows // 2 * row_bytes],
                       [0, rows // 2 * row_bytes], [rows // 2 * row_bytes] * 2)
    want = _memmove_reference(t.view(-1).view(torch.uint8), boxes)[:rows * row_bytes]
    compact_in_place(t, boxes, torch.empty(0, dtype=torch.uint8))
    assert torch.equal(t.view(-1).view(torch.uint8)[:rows * row_bytes], want)


def test_compact_in_place_copies_inside_a_shared_mapping(tmp_path):
    """A tensor in a shared file mapping is not private anonymous memory: remapping would show the file and other
    processes other bytes, so it is copied (and still exact)."""
    path = str(tmp_path / "shared.bin")
    t = torch.from_file(path, shared=True, size=64 * PAGE, dtype=torch.uint8)
    t.copy_(torch.randint(0, 256, (64 * PAGE,), dtype=torch.uint8))
    assert not PrivateAnonymous().covers(t.data_ptr(), t.numel())
    boxes = make_boxes([32 * PAGE], [0], [16 * PAGE])
    want = _memmove_reference(t, boxes)
    compact_in_place(t, boxes, torch.empty(0, dtype=torch.uint8))
    assert torch.equal(t, want)                  # copied: even the source stretch keeps its bytes
