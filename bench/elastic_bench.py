"""Resize throughput of elastic regions and how closely the measured memory follows the mapped size.

For each case, a region of --mib MiB is grown from 0 to full and shrunk back to 0 in --steps equal steps, --repeats
times. Per case: median grow and shrink throughput (MiB/s of mapped / unmapped bytes, wall clock around resize),
and the largest gap between the measured memory and the mapped size over all steps: process VmRSS on CPU,
driver used memory (torch.cuda.mem_get_info) on CUDA.

    python bench/elastic_bench.py [--mib 1024] [--steps 8] [--repeats 3] [--device cpu|cuda] [--json PATH]
"""
import argparse
import gc
import json
import statistics
import time

import torch

from amoeba_core.elastic import ElasticRegion

MiB = 1 << 20


def measured_bytes(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return total - free
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def run_case(device: str, mib: int, steps: int, repeats: int, granularity, shareable: bool) -> dict:
    region = ElasticRegion(mib * MiB, device=device, granularity=granularity, shareable=shareable)
    step = region.max_bytes // steps // region.granularity * region.granularity
    sizes = [step * i for i in range(1, steps)] + [region.max_bytes]
    gc.collect()
    base = measured_bytes(device)
    grow, shrink, worst_gap = [], [], 0
    for _ in range(repeats):
        for direction, targets in (("grow", sizes), ("shrink", sizes[-2::-1] + [0])):
            for target in targets:
                before = region.mapped_bytes
                t0 = time.perf_counter()
                region.resize(target)
                seconds = time.perf_counter() - t0
                moved = abs(region.mapped_bytes - before)
                (grow if direction == "grow" else shrink).append(moved / MiB / seconds)
                worst_gap = max(worst_gap, abs(measured_bytes(device) - base - region.mapped_bytes))
    region.close()
    return {"device": device, "mib": mib, "granularity": region.granularity, "shareable": shareable,
            "grow_mib_s": statistics.median(grow), "shrink_mib_s": statistics.median(shrink),
            "max_gap_mib": worst_gap / MiB, "steps": steps, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cpu":
        cases = [(None, False), (2 * MiB, False), (None, True)]
    else:
        cases = [(None, False), (None, True)]
    rows = []
    print(f"{'device':>6} {'MiB':>6} {'granularity':>11} {'memfd/fd':>8} {'grow MiB/s':>11} {'shrink MiB/s':>12} "
          f"{'max |measured - mapped| MiB':>28}")
    for granularity, shareable in cases:
        try:
            row = run_case(args.device, args.mib, args.steps, args.repeats, granularity, shareable)
        except Exception as e:  # e.g. no POSIX fd handles on this GPU: report and go on
            print(f"{args.device:>6} {args.mib:>6} {str(granularity):>11} {str(shareable):>8}  skipped: {e}")
            continue
        rows.append(row)
        print(f"{row['device']:>6} {row['mib']:>6} {row['granularity']:>11} {str(shareable):>8} "
              f"{row['grow_mib_s']:>11.0f} {row['shrink_mib_s']:>12.0f} {row['max_gap_mib']:>28.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
