"""Host cost of a transformation: planning plus all of one rank's preparation, without moving a byte (a dry run).

    python bench/host_cost.py [--quick] [--json out.json]

For an 80-layer Llama-3-70B-shaped model with 200k and 1M live KV blocks at 8 and 64 ranks (a merge and a split of
instance pairs), times plan_retp (every rank runs it) and the preparation of rank 0's programs
(planning.weight_program / kv_program: every copy's boxes and every message, for every round; the layers reuse
them), median of 5 runs. JSON: a list `cases` of {layers, world_size, old_degree, new_degree, kv_blocks,
seconds_plan, seconds_prepare} (kv_blocks: live block moves; medians), plus seconds_total_min (the best run: the
machine's noise only ever adds), the targets and whether each is met (on the medians).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import amoeba_core as A  # noqa: E402
from amoeba_core.planning.kv_program import build_kv_program  # noqa: E402
from amoeba_core.planning.weight_program import build_weight_program  # noqa: E402
from bench.planner_scaling import LLAMA_70B, kv_request  # noqa: E402

CASES = [(8, 4, 8), (8, 8, 4), (64, 4, 8), (64, 8, 4)]
# The targets, seconds for plan + prepare: (world size, live blocks) -> limit.
TARGETS = {(8, 200_000): 0.05, (8, 1_000_000): 0.1, (64, 1_000_000): 1.0}


def host_cost(blocks_list, repeats: int = 5) -> list:
    specs = A.llama_param_specs(LLAMA_70B)
    out = []
    for total in blocks_list:
        for world, old, new in CASES:
            req = kv_request(world, old, total)
            config = A.TPConfig.contiguous(world, old)
            plans, preps = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plan = A.plan_retp(config, new, specs, kv=req)
                t1 = time.perf_counter()
                weights = build_weight_program(plan, 0)
                kv = build_kv_program(plan, 0)
                t2 = time.perf_counter()
                plans.append(t1 - t0)
                preps.append(t2 - t1)
            case = {"layers": LLAMA_70B["num_hidden_layers"], "world_size": world, "old_degree": old,
                    "new_degree": new, "kv_blocks": plan.kv.num_moves, "live_blocks_requested": total,
                    "seconds_plan": statistics.median(plans), "seconds_prepare": statistics.median(preps),
                    "seconds_total_min": min(a + b for a, b in zip(plans, preps)),
                    "weight_rounds": len(weights.rounds), "kv_rounds_per_layer": len(kv.rounds),
                    "program_host_bytes": kv.host_bytes}
            limit = TARGETS.get((world, total))
            if limit is not None:
                case["target_seconds"] = limit
                case["target_met"] = case["seconds_plan"] + case["seconds_prepare"] < limit
            out.append(case)
            print(f"{world // old}x{old} -> {world // new}x{new}, {total} blocks requested ({plan.kv.num_moves} moves):"
                  f" plan {case['seconds_plan'] * 1e3:.1f} ms, prepare rank 0 {case['seconds_prepare'] * 1e3:.1f} ms"
                  f" (best run {case['seconds_total_min'] * 1e3:.1f} ms; {len(kv.rounds)} KV rounds, {len(weights.rounds)} weight rounds)"
                  + (f", target {limit * 1e3:.0f} ms {'met' if case['target_met'] else 'MISSED'}" if limit else ""),
                  flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200k live blocks only")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    cases = host_cost([200_000] if args.quick else [200_000, 1_000_000])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
