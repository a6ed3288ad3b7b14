"""Bandwidth of the byte engine: the CUDA kernel (_C.copy_boxes_cuda) next to torch's contiguous device-to-device
copy, the multi-layer path (copy_boxes_bases: the same boxes over many layers in one launch) next to one call per
layer, in-place compaction through the phase planner (copy_boxes_ordered); and with --device cpu the CPU engine:
bandwidth with 1 vs N pool threads on large batches, the per-call cost of tiny batches, multi-layer calls and
in-place compaction.

GB/s counts bytes read + bytes written (2 x copied bytes) for every column; the CUDA baseline copies the same number
of bytes with dst.copy_(src) on contiguous uint8 tensors. Every case is checked against a torch strided view first.

    python bench/cuda_copy_bench.py [--device cuda|cpu] [--mib 512] [--iters 20] [--json PATH]

Writes cuda_copy_bench.json (cpu_copy_bench.json for --device cpu) under $OUT as well when OUT is set. Always exits 0
when it could run; the PASS/MISS column of the CUDA table compares against the targets (>= 80% of the baseline for
runs >= 4 KiB, >= 50% below; the multi-layer and compaction rows: >= 80%).
"""
import argparse
import json
import os
import statistics
import sys

import time

import numpy as np
import torch

from amoeba_core import _C
from amoeba_core.execution.copy import (copy_boxes, copy_boxes_bases, copy_boxes_ordered, copy_threads, make_boxes,
                                        ordered_phases, set_copy_threads)

U8 = torch.uint8


def _row(so, do, run, c0=1, s0=0, d0=0, c1=1, s1=0, d1=0, c2=1, s2=0, d2=0):
    return [so, do, run, c0, s0, d0, c1, s1, d1, c2, s2, d2]


def weight_slice_case(run: int, total: int):
    """Column half of a row-major [rows, 2*run] weight: one box, runs strided by 2*run on the source."""
    rows = total // run
    boxes = np.array([_row(run // 2 // 16 * 16, 0, run, rows, 2 * run, run)], dtype=np.int64)

    def expected(src):
        off = run // 2 // 16 * 16
        return src[: rows * 2 * run].view(rows, 2 * run)[:, off:off + run]

    return boxes, rows * 2 * run, rows * run, expected


def kv_nhd_case(run: int, total: int, per_block_boxes: bool = False):
    """Head range of a K/V cache [2, blocks, 16 tokens, heads, head_dim] (bf16, head_dim 128; the cache holds 4x
    the local heads): levels token, block, K/V. per_block_boxes emits one box per (K/V, block), as a planner that
    moves scattered blocks would."""
    block_size, token = 16, 4 * run
    lo = run  # second quarter of the heads
    blocks = total // (2 * block_size * run)
    plane_src, plane_dst = blocks * block_size * token, blocks * block_size * run
    if per_block_boxes:
        rows = [_row(kv * plane_src + b * block_size * token + lo, kv * plane_dst + b * block_size * run, run,
                     block_size, token, run) for kv in range(2) for b in range(blocks)]
    else:
        rows = [_row(lo, 0, run, block_size, token, run, blocks, block_size * token, block_size * run, 2, plane_src,
                     plane_dst)]

    def expected(src):
        return src[: 2 * plane_src].view(2, blocks, block_size, token)[..., lo:lo + run]

    return np.array(rows, dtype=np.int64), 2 * plane_src, 2 * plane_dst, expected


def kv_hnd_case(run: int, total: int):
    """Head range of a K/V cache [2, blocks, heads, 16 tokens, head_dim]: per block one contiguous run of
    (local heads x 16 x head_dim x itemsize) bytes; the cache holds 4x the local heads."""
    per_block_src = 4 * run
    blocks = total // (2 * run)
    plane_src, plane_dst = blocks * per_block_src, blocks * run
    rows = [_row(run, 0, run, blocks, per_block_src, run, 2, plane_src, plane_dst)]

    def expected(src):
        return src[: 2 * plane_src].view(2, blocks, per_block_src)[..., run:2 * run]

    return np.array(rows, dtype=np.int64), 2 * plane_src, 2 * plane_dst, expected


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median device time of fn in milliseconds (CUDA events on the current stream)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median host wall time of fn in milliseconds (CPU copies are synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compaction_boxes(rows: int, old_len: int):
    """In-place 2:1 compaction: every row of a (rows, old_len) byte matrix keeps its second half, packed to the
    front row-major (the weight executor's in-place split)."""
    half = old_len // 2
    return make_boxes(np.arange(rows) * old_len + half, np.arange(rows) * half, half), rows * half


def _write_report(report: dict, args, name: str) -> None:
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], name))
    for path in paths:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def cuda_main(args) -> int:
    if not (torch.cuda.is_available() and getattr(_C, "cuda_compiled", False)):
        print("cuda_copy_bench: needs a CUDA device and _C.cuda_compiled; skipped")
        return 0

    total = args.mib << 20
    cases = [
        ("weight 4KiB runs", 4096, weight_slice_case(4096, total)),
        ("weight 64KiB runs", 65536, weight_slice_case(65536, total)),
        ("weight 1MiB runs", 1 << 20, weight_slice_case(1 << 20, total)),
        ("kv NHD 256B runs", 256, kv_nhd_case(256, total)),
        ("kv NHD 512B runs", 512, kv_nhd_case(512, total)),
        ("kv NHD 256B, box/block", 256, kv_nhd_case(256, total // 4, per_block_boxes=True)),
        ("kv HND 4KiB runs", 4096, kv_hnd_case(4096, total)),
        ("kv HND 16KiB runs", 16384, kv_hnd_case(16384, total)),
    ]
    results = []
    print(f"device: {torch.cuda.get_device_name()}  ({args.mib} MiB per case, median of {args.iters})", flush=True)

    def add(name, run, boxes, copied, ms, base_ms, correct, target, **extra):
        gbps, base_gbps = 2 * copied / ms / 1e6, 2 * copied / base_ms / 1e6
        pct = 100 * gbps / base_gbps
        results.append(dict(case=name, run_bytes=run, boxes=int(boxes), bytes=int(copied), ms=ms, gbps=gbps,
                            torch_gbps=base_gbps, pct=pct, target_pct=target, correct=correct,
                            verdict="PASS" if pct >= target and correct else "MISS", **extra))

    def baseline_ms(copied):
        base_src = torch.empty(copied, dtype=U8, device="cuda")
        base_dst = torch.empty(copied, dtype=U8, device="cuda")
        return time_ms(lambda: base_dst.copy_(base_src), args.iters)

    for name, run, (boxes, src_nbytes, dst_nbytes, expected) in cases:
        src = torch.randint(0, 256, (src_nbytes,), dtype=U8, device="cuda")
        dst = torch.empty(dst_nbytes, dtype=U8, device="cuda")
        copied = copy_boxes(dst, src, boxes)
        torch.cuda.synchronize()
        correct = bool(torch.equal(dst.view(expected(src).shape), expected(src)))
        ms = time_ms(lambda: copy_boxes(dst, src, boxes), args.iters)
        del src, dst
        add(name, run, boxes.shape[0], copied, ms, baseline_ms(copied), correct, 80 if run >= 4096 else 50)
        torch.cuda.empty_cache()

    # The same boxes over 32 layers (each layer its own buffers): one launch vs one call per layer.
    layers = 32
    layer_cases = [
        ("32 layers kv NHD 256B", 256, kv_nhd_case(256, total // layers)),
        ("32 layers kv NHD 256B box/block", 256, kv_nhd_case(256, total // layers // 4, per_block_boxes=True)),
        ("32 layers weight 4KiB", 4096, weight_slice_case(4096, total // layers)),
    ]
    for name, run, (boxes, src_nbytes, dst_nbytes, expected) in layer_cases:
        srcs = [torch.randint(0, 256, (src_nbytes,), dtype=U8, device="cuda") for _ in range(layers)]
        dsts = [torch.empty(dst_nbytes, dtype=U8, device="cuda") for _ in range(layers)]
        copied = copy_boxes_bases(dsts, srcs, boxes)
        torch.cuda.synchronize()
        correct = all(bool(torch.equal(dsts[i].view(expected(srcs[i]).shape), expected(srcs[i])))
                      for i in (0, layers - 1))
        ms = time_ms(lambda: copy_boxes_bases(dsts, srcs, boxes), args.iters)

        def per_layer():
            for d, s_ in zip(dsts, srcs):
                copy_boxes(d, s_, boxes)

        loop_ms = time_ms(per_layer, args.iters)
        host_ms = wall_ms(lambda: copy_boxes_bases(dsts, srcs, boxes), args.iters)
        host_loop_ms = wall_ms(per_layer, args.iters)
        torch.cuda.synchronize()
        del srcs, dsts
        add(name + " (bases)", run, boxes.shape[0], copied, ms, baseline_ms(copied), correct, 80,
            per_layer_calls_ms=loop_ms, host_ms=host_ms, host_per_layer_calls_ms=host_loop_ms)
        torch.cuda.empty_cache()

    # In-place compaction through the phase planner, 64 MiB of scratch.
    row = 8192
    boxes, kept = compaction_boxes(total // row, row)
    buf = torch.randint(0, 256, (total,), dtype=U8, device="cuda")
    want = buf.view(-1, row)[:, row // 2:].reshape(-1).clone()
    scratch = torch.empty(64 << 20, dtype=U8, device="cuda")
    phases = ordered_phases(boxes, total, scratch.numel())
    copy_boxes_ordered(buf, boxes, scratch)
    torch.cuda.synchronize()
    correct = bool(torch.equal(buf[:kept], want))
    del want
    ms = time_ms(lambda: copy_boxes_ordered(buf, boxes, scratch), args.iters)
    host_ms = wall_ms(lambda: copy_boxes_ordered(buf, boxes, scratch), args.iters)
    torch.cuda.synchronize()
    del buf, scratch
    add("in-place 2:1 compaction 8KiB rows", row // 2, boxes.shape[0], kept, ms, baseline_ms(kept), correct, 80,
        phases=int(len(phases.kinds)), staged_phases=int((phases.kinds != 0).sum()), host_ms=host_ms)

    header = (f"{'case':<40}{'boxes':>8}{'MiB':>7}{'ms':>9}{'GB/s':>9}{'torch':>9}{'%':>7}{'target':>8}  ok  "
              f"verdict  notes")
    lines = [header, "-" * len(header)]
    for r in results:
        notes = []
        if "per_layer_calls_ms" in r:
            notes.append(f"32 calls: {r['per_layer_calls_ms']:.3f} ms device, host {r['host_ms']:.3f} vs "
                         f"{r['host_per_layer_calls_ms']:.3f} ms")
        if "phases" in r:
            notes.append(f"{r['phases']} phases ({r['staged_phases']} staged), host {r['host_ms']:.3f} ms")
        lines.append(f"{r['case']:<40}{r['boxes']:>8}{r['bytes'] / 2**20:>7.0f}{r['ms']:>9.3f}{r['gbps']:>9.0f}"
                     f"{r['torch_gbps']:>9.0f}{r['pct']:>7.1f}{r['target_pct']:>7}%  {'y' if r['correct'] else 'N'}"
                     f"   {r['verdict']}    {'; '.join(notes)}")
    _write_report(dict(device=torch.cuda.get_device_name(), mib_per_case=args.mib, iters=args.iters,
                       results=results), args, "cuda_copy_bench.json")
    print("\n".join(lines), flush=True)
    return 0


def cpu_main(args) -> int:
    total = args.mib << 20
    threads_max = copy_threads()
    thread_counts = sorted({1, 2, threads_max} if threads_max > 1 else {1})
    print(f"cpu: {_C.affinity_cpu_count()} CPUs in the affinity mask, pool default {threads_max} threads; "
          f"{args.mib} MiB per case, median of {args.iters}", flush=True)
    results = []

    # 1. Large batches: bandwidth with 1, 2 and all pool threads; torch's contiguous copy of the same bytes.
    for name, (boxes, src_nbytes, dst_nbytes, expected) in [
            ("weight 64KiB runs", weight_slice_case(65536, total)),
            ("kv NHD 256B runs", kv_nhd_case(256, total)),
            ("kv NHD 256B, box/block", kv_nhd_case(256, total, per_block_boxes=True))]:
        src = torch.randint(0, 256, (src_nbytes,), dtype=U8)
        dst = torch.empty(dst_nbytes, dtype=U8)
        copied = copy_boxes(dst, src, boxes)
        correct = bool(torch.equal(dst.view(expected(src).shape), expected(src)))
        row = dict(kind="bandwidth", case=name, boxes=int(boxes.shape[0]), bytes=int(copied), correct=correct)
        for t in thread_counts:
            ms = wall_ms(lambda: copy_boxes(dst, src, boxes, num_threads=t), args.iters)
            row[f"gbps_{t}t"] = 2 * copied / ms / 1e6
        base_src, base_dst = src[:copied], dst[:copied]
        row["torch_copy_gbps"] = 2 * copied / wall_ms(lambda: base_dst.copy_(base_src), args.iters) / 1e6
        results.append(row)
        del src, dst, base_src, base_dst

    # 2. Tiny batches: cost of one call (they stay on the calling thread).
    src = torch.randint(0, 256, (1 << 17,), dtype=U8)
    dst = torch.empty(1 << 17, dtype=U8)
    for n_boxes, run in ((1, 64), (16, 64), (256, 256)):
        boxes = make_boxes(np.arange(n_boxes) * 2 * run, np.arange(n_boxes) * run, run)
        calls = 2000
        row = dict(kind="per_call", case=f"{n_boxes} box(es) of {run} B", boxes=n_boxes, bytes=n_boxes * run)

        def python_api():
            for _ in range(calls):
                copy_boxes(dst, src, boxes)

        def raw():
            d, s_ = dst.data_ptr(), src.data_ptr()
            for _ in range(calls):
                _C.copy_boxes(d, 1 << 17, s_, 1 << 17, boxes)

        row["us_per_call_python"] = wall_ms(python_api, 5) * 1e3 / calls
        row["us_per_call_raw"] = wall_ms(raw, 5) * 1e3 / calls
        results.append(row)

    # 3. The same boxes over 32 layers: one call vs one call per layer.
    layers = 32
    boxes, src_nbytes, dst_nbytes, expected = kv_nhd_case(256, total // layers, per_block_boxes=True)
    srcs = [torch.randint(0, 256, (src_nbytes,), dtype=U8) for _ in range(layers)]
    dsts = [torch.empty(dst_nbytes, dtype=U8) for _ in range(layers)]
    copied = copy_boxes_bases(dsts, srcs, boxes)
    correct = all(bool(torch.equal(dsts[i].view(expected(srcs[i]).shape), expected(srcs[i])))
                  for i in (0, layers - 1))

    def per_layer():
        for d, s_ in zip(dsts, srcs):
            copy_boxes(d, s_, boxes)

    ms = wall_ms(lambda: copy_boxes_bases(dsts, srcs, boxes), args.iters)
    loop_ms = wall_ms(per_layer, args.iters)
    results.append(dict(kind="layers", case=f"{layers} layers kv NHD 256B box/block", boxes=int(boxes.shape[0]),
                        bytes=int(copied), correct=correct, ms_bases=ms, ms_per_layer_calls=loop_ms,
                        gbps_bases=2 * copied / ms / 1e6, gbps_per_layer_calls=2 * copied / loop_ms / 1e6))
    del srcs, dsts

    # 4. In-place compaction: run by run on one thread vs planned phases on the pool (64 MiB scratch).
    row_len = 8192
    boxes, kept = compaction_boxes(total // row_len, row_len)
    buf = torch.randint(0, 256, (total,), dtype=U8)
    want = buf.view(-1, row_len)[:, row_len // 2:].reshape(-1).clone()
    scratch = torch.empty(64 << 20, dtype=U8)
    copy_boxes_ordered(buf, boxes, scratch, staged=True)
    correct = bool(torch.equal(buf[:kept], want))
    del want
    seq_ms = wall_ms(lambda: copy_boxes_ordered(buf, boxes, scratch), args.iters)
    phase_ms = wall_ms(lambda: copy_boxes_ordered(buf, boxes, scratch, staged=True), args.iters)
    phases = ordered_phases(boxes, total, scratch.numel(), launch_bytes=128 << 10)
    results.append(dict(kind="compaction", case="in-place 2:1 compaction 8KiB rows", boxes=int(boxes.shape[0]),
                        bytes=int(kept), correct=correct, ms_run_by_run=seq_ms, ms_phases=phase_ms,
                        phases=int(len(phases.kinds)), gbps_run_by_run=2 * kept / seq_ms / 1e6,
                        gbps_phases=2 * kept / phase_ms / 1e6))

    print("\nbandwidth (GB/s = 2 x bytes / s)")
    print(f"{'case':<26}{'boxes':>8}{'MiB':>6}" + "".join(f"{str(t) + ' thr':>9}" for t in thread_counts)
          + f"{'torch':>9}  ok")
    for r in results:
        if r["kind"] == "bandwidth":
            print(f"{r['case']:<26}{r['boxes']:>8}{r['bytes'] / 2**20:>6.0f}"
                  + "".join(f"{r[f'gbps_{t}t']:>9.2f}" for t in thread_counts)
                  + f"{r['torch_copy_gbps']:>9.2f}  {'y' if r['correct'] else 'N'}")
    print("\nper call (calling thread only)")
    for r in results:
        if r["kind"] == "per_call":
            print(f"{r['case']:<26} python copy_boxes {r['us_per_call_python']:6.2f} us   "
                  f"_C.copy_boxes {r['us_per_call_raw']:6.2f} us")
    for r in results:
        if r["kind"] == "layers":
            print(f"\n{r['case']}: one call {r['ms_bases']:.1f} ms ({r['gbps_bases']:.2f} GB/s), "
                  f"{layers} calls {r['ms_per_layer_calls']:.1f} ms ({r['gbps_per_layer_calls']:.2f} GB/s)  "
                  f"{'y' if r['correct'] else 'N'}")
        if r["kind"] == "compaction":
            print(f"\n{r['case']}: run by run {r['ms_run_by_run']:.1f} ms ({r['gbps_run_by_run']:.2f} GB/s), "
                  f"{r['phases']} phases on the pool {r['ms_phases']:.1f} ms ({r['gbps_phases']:.2f} GB/s)  "
                  f"{'y' if r['correct'] else 'N'}")
    _write_report(dict(device="cpu", affinity_cpus=_C.affinity_cpu_count(), pool_threads=threads_max,
                       mib_per_case=args.mib, iters=args.iters, results=results), args, "cpu_copy_bench.json")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--mib", type=int, default=None, help="bytes copied per case, MiB (default: 512 cuda, 128 cpu)")
    ap.add_argument("--iters", type=int, default=None, help="timed repetitions (default: 20 cuda, 5 cpu)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: the pool's default thread count")
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args()
    if args.device == "cpu":
        args.mib = args.mib or 128
        args.iters = args.iters or 5
        if args.threads:
            set_copy_threads(args.threads)
        return cpu_main(args)
    args.mib = args.mib or 512
    args.iters = args.iters or 20
    return cuda_main(args)


if __name__ == "__main__":
    sys.exit(main())
