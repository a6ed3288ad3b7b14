"""Bandwidth of the same-host pull against a local copy of the same boxes, across two processes.

    python bench/samehost_bench.py --device cpu  --json /tmp/pull_cpu.json   # process_vm_readv (_C.pull_boxes)
    python bench/samehost_bench.py --device cuda --json /tmp/pull_cuda.json  # CUDA IPC + the box kernel

A child process allocates a buffer and publishes it (its pid and address on CPU; torch's CUDA IPC export on CUDA);
the parent pulls strided boxes from it (runs of --runs bytes at twice the run's stride: every other run, the shape of
a KV head split) into a local buffer, and copies the same boxes between two local buffers for reference (the local
box engine: memcpy on CPU, device-to-device on CUDA). GB/s counts the bytes delivered; best of --repeats.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from amoeba_core import _C  # noqa: E402
from amoeba_core.execution.copy import copy_boxes, make_boxes  # noqa: E402


def _hold(conn, nbytes: int, device: str) -> None:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    if device == "cpu":
        conn.send(("cpu", os.getpid(), data.data_ptr()))
    else:
        from torch.multiprocessing.reductions import reduce_tensor
        torch.cuda.synchronize()
        conn.send(("cuda",) + reduce_tensor(data))
    conn.recv()


def _best(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mib", type=int, default=256, help="buffer size")
    p.add_argument("--runs", default="256,1024,4096,65536,contiguous")
    p.add_argument("--threads", type=int, default=0, help="CPU pull threads (0: the copy pool's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold, args=(child, nbytes, args.device), daemon=True)
    proc.start()
    msg = parent.recv()
    if msg[0] == "cpu":
        remote = None
        pid, address = msg[1], msg[2]
    else:
        remote = msg[1](*msg[2])  # the child's buffer, opened through CUDA IPC
    local = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.device)
    local.zero_()
    rows = []
    print(f"same-host pull vs local copy ({args.device}, {args.mib} MiB buffer, best of {args.repeats})")
    print(f"{'run bytes':>10} {'delivered':>10} {'pull GB/s':>10} {'local GB/s':>11} {'pull/local':>10}")
    for run_text in args.runs.split(","):
        if run_text == "contiguous":
            boxes, run = make_boxes(0, 0, nbytes), nbytes
        else:
            run = int(run_text)
            boxes = make_boxes(0, 0, run, nbytes // (2 * run), 2 * run, 2 * run)
        delivered = int((boxes[:, 2] * boxes[:, 3]).sum())
        if remote is None:
            pull = _best(lambda: _C.pull_boxes(pid, address, nbytes, local.data_ptr(), nbytes, boxes, args.threads),
                         args.repeats, "cpu")
        else:
            pull = _best(lambda: copy_boxes(local, remote, boxes), args.repeats, "cuda")
        copy = _best(lambda: copy_boxes(local, source, boxes), args.repeats, args.device)
        row = {"run_bytes": run, "delivered_bytes": delivered, "pull_gb_per_s": delivered / pull / 1e9,
               "local_gb_per_s": delivered / copy / 1e9}
        row["pull_over_local"] = row["pull_gb_per_s"] / row["local_gb_per_s"]
        rows.append(row)
        print(f"{run_text:>10} {delivered >> 20:>7} MiB {row['pull_gb_per_s']:>10.2f} {row['local_gb_per_s']:>11.2f} "
              f"{row['pull_over_local']:>10.2f}", flush=True)
    parent.send("exit")
    proc.join(10)
    if args.json:
        name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": name, "buffer_bytes": nbytes, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
