"""Bandwidth of the CUDA byte engine (_C.copy_boxes_cuda) next to torch's contiguous device-to-device copy.

GB/s counts bytes read + bytes written (2 x copied bytes) for both columns; the baseline copies the same number of
bytes with dst.copy_(src) on contiguous uint8 tensors. Every case is checked against a torch strided view first.

    python bench/cuda_copy_bench.py [--mib 512] [--iters 20] [--json PATH]

Writes cuda_copy_bench.json under $OUT as well when OUT is set. Always exits 0 when it could run; the PASS/MISS
column compares against the targets (>= 80% of the baseline for runs >= 4 KiB, >= 50% below).
"""
import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

from amoeba_core import _C

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="bytes copied per case, MiB")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args()
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
    stream = torch.cuda.current_stream()
    results = []
    print(f"device: {torch.cuda.get_device_name()}  ({args.mib} MiB per case, median of {args.iters})", flush=True)
    for name, run, (boxes, src_nbytes, dst_nbytes, expected) in cases:
        src = torch.randint(0, 256, (src_nbytes,), dtype=U8, device="cuda")
        dst = torch.empty(dst_nbytes, dtype=U8, device="cuda")

        def engine():
            return _C.copy_boxes_cuda(dst.data_ptr(), dst.numel(), src.data_ptr(), src.numel(), boxes,
                                      stream.cuda_stream)

        copied = engine()
        torch.cuda.synchronize()
        correct = bool(torch.equal(dst.view(expected(src).shape), expected(src)))
        ms = time_ms(engine, args.iters)
        base_src = src[:copied]
        base_dst = dst[:copied]
        base_ms = time_ms(lambda: base_dst.copy_(base_src), args.iters)
        gbps, base_gbps = 2 * copied / ms / 1e6, 2 * copied / base_ms / 1e6
        target = 80 if run >= 4096 else 50
        pct = 100 * gbps / base_gbps
        results.append(dict(case=name, run_bytes=run, boxes=int(boxes.shape[0]), bytes=int(copied), ms=ms,
                            gbps=gbps, torch_gbps=base_gbps, pct=pct, target_pct=target, correct=correct,
                            verdict="PASS" if pct >= target and correct else "MISS"))
        del src, dst, base_src, base_dst
        torch.cuda.empty_cache()

    header = f"{'case':<24}{'boxes':>8}{'MiB':>7}{'ms':>9}{'GB/s':>9}{'torch':>9}{'%':>7}{'target':>8}  ok  verdict"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['case']:<24}{r['boxes']:>8}{r['bytes'] / 2**20:>7.0f}{r['ms']:>9.3f}{r['gbps']:>9.0f}"
                     f"{r['torch_gbps']:>9.0f}{r['pct']:>7.1f}{r['target_pct']:>7}%  {'y' if r['correct'] else 'N'}"
                     f"   {r['verdict']}")
    report = dict(device=torch.cuda.get_device_name(), mib_per_case=args.mib, iters=args.iters, results=results)
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "cuda_copy_bench.json"))
    for path in paths:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
