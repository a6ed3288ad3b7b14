"""Planner scaling: time plan_retp for a 70B-shaped model (80 layers) with ~1M live KV blocks.

    python bench/planner_scaling.py [--quick] [--json PATH]

Planning is pure (no process group), so this runs in one process. The KV request is built as retp builds it on
every rank (KVRequest from the instances' block tables); only plan_retp is timed (median of a few runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import amoeba_core as A
from amoeba_core.kv import KVLayout, KVRequest

LLAMA_70B = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                 num_hidden_layers=80, vocab_size=128256, torch_dtype="bfloat16")

# (world size, old degree, new degree): a merge and a split of instance pairs at each scale.
CASES = [(8, 4, 8), (8, 8, 4), (64, 4, 8), (64, 8, 4)]


def kv_request(world: int, degree: int, total_blocks: int, seed: int = 0) -> KVRequest:
    """~total_blocks live blocks spread over the instances, sequences of 1-128 blocks on fragmented pools filled to
    ~85%, some sharing a prefix."""
    layout = KVLayout("vllm_flash_attn", "NHD", LLAMA_70B["num_hidden_layers"], LLAMA_70B["num_key_value_heads"],
                      128, 16, "bfloat16")
    instances = world // degree
    per_instance = total_blocks // instances
    num_blocks = int(per_instance / 0.85) + 1
    rng = np.random.default_rng(seed)
    seqs, next_id = [], 0
    for inst in range(instances):
        ids = rng.permutation(num_blocks)[:per_instance]
        lens = rng.integers(1, 129, size=per_instance // 32 + 1)
        bounds = np.minimum(np.concatenate(([0], np.cumsum(lens))), per_instance)
        bounds = bounds[:np.searchsorted(bounds, per_instance) + 1]
        prev = None
        for a, b in zip(bounds[:-1], bounds[1:]):
            table = ids[a:b].tolist()
            if prev is not None and rng.random() < 0.2:
                table = prev[:int(rng.integers(1, len(prev) + 1))] + table
            seqs.append((inst, next_id, tuple(table)))
            next_id += 1
            prev = table
    buffer_bytes = num_blocks * layout.block_bytes(degree)
    return KVRequest(layout, num_blocks, buffer_bytes, tuple(seqs))


def planner_scaling(quick: bool = False, repeats: int = 3) -> list:
    """[{layers, world_size, old_degree, new_degree, kv_blocks, seconds}] for the CASES."""
    specs = A.llama_param_specs(LLAMA_70B)
    total_blocks = 200_000 if quick else 1_000_000
    out = []
    for world, old, new in CASES:
        req = kv_request(world, old, total_blocks)
        config = A.TPConfig.contiguous(world, old)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = A.plan_retp(config, new, specs, kv=req)
            times.append(time.perf_counter() - t0)
        live = sum(len(set(t)) for _, _, t in req.sequences)  # upper bound; shared prefixes counted per sequence
        out.append({"layers": LLAMA_70B["num_hidden_layers"], "world_size": world, "old_degree": old,
                    "new_degree": new, "kv_blocks": plan.kv.num_moves, "table_entries": live,
                    "seconds": statistics.median(times)})
        print(f"plan {world // old}x{old} -> {world // new}x{new}: {plan.kv.num_moves} KV block moves, "
              f"{len(plan.transfers)} weight transfers, {statistics.median(times) * 1e3:.1f} ms", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200k KV blocks instead of 1M")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = planner_scaling(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"planner": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
