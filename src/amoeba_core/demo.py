"""python -m amoeba_core.demo: run a schedule of TP changes on CPU ranks and verify every byte after each step.

    python -m amoeba_core.demo --world-size 4 --schedule 4x1,2x2,1x4,2x2,4x1 --json out.json

"NxD" is N instances of TP degree D (N * D = world size); the first entry is the starting configuration. Each
transition calls retp on every rank (weights and the paged KV cache together), then every rank compares its
weights with shard() of the checkpoint tensors and every live KV block with its expected bytes. The table and
the JSON report bytes moved (counted at the transport) next to the minimum over all placements (an independent
exhaustive search), peak extra memory and time.

--engine synthetic (this mode) moves a Llama-shaped model and a KV pool of live sequences with mixed lengths and
shared prefixes, filled with verifiable bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Tuple

import torch
import torch.distributed as dist

from .config import TPConfig
from .errors import ConfigError
from .kv import KVCache, KVLayout
from .launch import RankPool
from .layout import llama_param_specs, shard
from .verify import (full_weights, kv_check, kv_fill, kv_min_bytes, random_sequences, same_bytes,
                     weight_min_bytes)

DEMO_MODEL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688,
                  num_hidden_layers=4, vocab_size=1000, architectures=["LlamaForCausalLM"])


def parse_schedule(text: str, world_size: int) -> List[Tuple[int, int]]:
    """'4x1,2x2' -> [(4, 1), (2, 2)]; every entry must cover the world."""
    out = []
    for item in text.split(","):
        try:
            n, d = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"schedule entry {item!r} is not of the form NxD (e.g. 2x2)") from None
        if n * d != world_size:
            raise ConfigError(f"schedule entry {item!r} covers {n * d} ranks, the world has {world_size}")
        out.append((n, d))
    if len(out) < 2:
        raise ConfigError(f"schedule {text!r} needs at least two entries (a start and one change)")
    return out


def _synthetic_rank(rank, world, schedule, model, kv_args, num_blocks, fill, scratch_bytes, seed):
    """Runs on every rank: returns one record per transition (the rank's view)."""
    specs = llama_param_specs(model)
    full = full_weights(specs, seed)
    layout = KVLayout(**kv_args)
    config = TPConfig.contiguous(world, schedule[0][1])
    inst, tp = config.slots[rank]
    weights = {s.name: shard(full[s.name], s, tp, config.degree) for s in specs}
    sequences = random_sequences(config.num_instances, num_blocks, fill, seed)
    origins = {s: [(i, b) for b in t] for i in sequences for s, t in sequences[i].items()}
    layers = layout.allocate(num_blocks, config.degree)
    live = sorted({b for t in sequences[inst].values() for b in t})
    kv_fill(layout, layers, inst, live, layout.head_range(tp, config.degree), seed=seed + rank)
    tables = dict(sequences[inst])
    records = []
    for n, degree in schedule[1:]:
        # Every rank learns the whole group's sequences (for the report's independent minimum).
        gathered = [None] * world
        dist.all_gather_object(gathered, (config.slots[rank][0], tables))
        all_seqs = {s: (i, t) for i, tb in gathered for s, t in tb.items()}
        t0 = time.perf_counter()
        res = retp_call(config, degree, specs, weights, layout, layers, tables, scratch_bytes)
        seconds = time.perf_counter() - t0
        ok_w = all(same_bytes(res.weights[s.name], shard(full[s.name], s, res.slot.tp_rank, degree)) for s in specs)
        bad_kv = kv_check(layout, res.kv.layers, res.kv.block_tables, origins,
                          layout.head_range(res.slot.tp_rank, degree))
        flag = torch.tensor([int(ok_w and not bad_kv)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        records.append({
            "from": f"{config.num_instances}x{config.degree}", "to": f"{n}x{degree}",
            "old_slots": config.slots, "new_degree": degree, "sequences": all_seqs,
            "destinations": res.kv.destinations, "weight_bytes_received": res.stats.weight_bytes_received,
            "kv_bytes_received": res.stats.kv_bytes_received, "peak_extra_bytes": res.stats.peak_extra_bytes,
            "kv_peak_extra_bytes": res.stats.kv_peak_extra_bytes, "seconds": seconds,
            "verified": bool(flag.item()), "kv_blocks_live": len({(i, b) for i, t in all_seqs.values() for b in t}),
            "plan": res.plan.summary() if rank == 0 else None,
        })
        config, weights, layers, tables = res.config, res.weights, res.kv.layers, res.kv.block_tables
    return records


def retp_call(config, degree, specs, weights, layout, layers, tables, scratch_bytes):
    from .api import retp
    return retp(None, degree, config=config, specs=specs, weights=weights,
                kv=KVCache(layout, layers, tables), scratch_bytes=scratch_bytes)


def summarize(per_rank: list, specs, layout, scratch_bytes: int) -> list:
    """Combine the ranks' records into one entry per transition, with the independent minima."""
    out = []
    for k, r0 in enumerate(per_rank[0]):
        recs = [r[k] for r in per_rank]
        out.append({
            "from": r0["from"], "to": r0["to"],
            "weight_bytes_moved": sum(r["weight_bytes_received"] for r in recs),
            "weight_bytes_min": weight_min_bytes(specs, r0["old_slots"], r0["new_degree"]),
            "kv_bytes_moved": sum(r["kv_bytes_received"] for r in recs),
            "kv_bytes_min": kv_min_bytes(layout, r0["old_slots"], r0["new_degree"], r0["sequences"],
                                         r0["destinations"]),
            "kv_blocks_live": r0["kv_blocks_live"],
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in recs),
            "kv_peak_extra_bytes": max(r["kv_peak_extra_bytes"] for r in recs),
            "scratch_bytes": scratch_bytes,
            "seconds": max(r["seconds"] for r in recs),
            "verified": all(r["verified"] for r in recs),
        })
    return out


def print_table(transitions: list, file=sys.stdout) -> None:
    cols = [("from", 5), ("to", 5), ("weight_bytes_moved", 12), ("weight_bytes_min", 12), ("kv_bytes_moved", 12),
            ("kv_bytes_min", 12), ("kv_blocks_live", 6), ("peak_extra_bytes", 12), ("kv_peak_extra_bytes", 12),
            ("seconds", 8), ("verified", 8)]
    heads = ["from", "to", "w moved", "w min", "kv moved", "kv min", "blocks", "peak extra", "kv peak", "seconds",
             "verified"]
    print("  ".join(h.rjust(w) for h, (_, w) in zip(heads, cols)), file=file)
    for t in transitions:
        cells = [f"{t[k]:.3f}" if k == "seconds" else str(t[k]) for k, _ in cols]
        print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, cols)), file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m amoeba_core.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--schedule", default="4x1,2x2,1x4,2x2,4x1")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--scratch-mib", type=float, default=1.0, help="scratch budget per rank (MiB)")
    p.add_argument("--kv-layout", default="vllm_flash_attn:NHD", help="ENGINE:ORDER of the KV pool")
    p.add_argument("--num-blocks", type=int, default=96, help="KV blocks per rank at the starting degree")
    p.add_argument("--fill", type=float, default=0.45, help="fraction of each starting pool holding live blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300, help="seconds before a hung rank fails the run")
    args = p.parse_args(argv)
    schedule = parse_schedule(args.schedule, args.world_size)
    engine, order = args.kv_layout.split(":")
    kv_args = dict(engine=engine, order=order, num_layers=DEMO_MODEL["num_hidden_layers"],
                   num_kv_heads=DEMO_MODEL["num_key_value_heads"], head_dim=32, block_size=16, dtype="float32")
    scratch = int(args.scratch_mib * (1 << 20))
    print(f"amoeba_core demo: world {args.world_size}, schedule {args.schedule}, scratch {scratch} bytes, "
          f"KV {engine} {order}", flush=True)
    with RankPool(args.world_size, timeout_s=args.timeout) as pool:
        per_rank = pool.run(_synthetic_rank, schedule, DEMO_MODEL, kv_args, args.num_blocks, args.fill, scratch,
                            args.seed)
    specs = llama_param_specs(DEMO_MODEL)
    transitions = summarize(per_rank, specs, KVLayout(**kv_args), scratch)
    print_table(transitions)
    report = {"world_size": args.world_size, "schedule": args.schedule, "engine": "synthetic",
              "transitions": transitions}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    ok = all(t["verified"] and t["weight_bytes_moved"] == t["weight_bytes_min"]
             and t["kv_bytes_moved"] == t["kv_bytes_min"] and t["kv_peak_extra_bytes"] <= t["scratch_bytes"]
             for t in transitions)
    print("all transitions verified, minimal and within the scratch budget" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
