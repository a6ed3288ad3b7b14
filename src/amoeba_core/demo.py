"""python -m amoeba_core.demo: a running TP service changes its degree mid-generation and keeps its tokens.

    python -m amoeba_core.demo --world-size 4 --schedule 4x1,2x2,1x4,2x2,4x1 --json out.json

"NxD" is N instances of TP degree D (N * D = world size); the first entry is the starting configuration.

--engine reference (default): the reference engine (amoeba_core.reference) serves a few prompts of mixed lengths
with greedy decoding on CPU ranks; between decode steps its scheduler calls retp (weights and paged KV cache
together) for each entry of the schedule. After each transition every rank compares its weights with shard() of
the checkpoint tensors and every live KV block with the bytes it held before. At the end the tokens are compared
with a TP=1 run of the same prompts without transitions.

--engine synthetic: no model forward; a Llama-shaped model and a KV pool of many live sequences with mixed
lengths and shared prefixes (a prefix block moves once per destination instance), filled with verifiable bytes.

Both print a table per transition and write JSON with world_size and transitions (from, to, weight_bytes_moved
counted at the transport, weight_bytes_min and kv_bytes_min from an independent exhaustive search over
placements, kv_bytes_moved, kv_blocks_live, peak_extra_bytes and kv_peak_extra_bytes (the library's
bookkeeping), measured_peak_extra_bytes (resident-memory high-water mark), memory_bound_bytes (largest new shard +
scratch + staging), within_budget (measured <= bound + MEASUREMENT_ALLOWANCE), scratch_bytes, seconds, verified); the reference engine adds generated (token ids per prompt, in prompt order) and matches_tp1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Tuple

import torch
import torch.distributed as dist

from .api import retp
from .config import TPConfig
from .errors import ConfigError
from .kv import KVCache, KVLayout
from .launch import RankPool
from .layout import llama_param_specs, model_param_specs, shard
from .verify import (full_weights, kv_check, kv_fill, kv_min_bytes, random_sequences, same_bytes,
                     weight_min_bytes)

# The measured peak (resident memory on these CPU ranks) may exceed the library's device-memory bound by the host
# side of a call: planning tables and interpreter allocations. For the demo's small models this allowance dominates.
MEASUREMENT_ALLOWANCE = 4 << 20

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
        res = retp(None, degree, config=config, specs=specs, weights=weights,
                   kv=KVCache(layout, layers, tables), scratch_bytes=scratch_bytes)
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
            "kv_peak_extra_bytes": res.stats.kv_peak_extra_bytes,
            "measured_peak_extra_bytes": res.stats.measured_peak_extra_bytes,
            "memory_bound_bytes": res.stats.memory_bound_bytes, "seconds": seconds,
            "verified": bool(flag.item()), "kv_blocks_live": len({(i, b) for i, t in all_seqs.values() for b in t}),
            "plan": res.plan.summary() if rank == 0 else None,
        })
        config, weights, layers, tables = res.config, res.weights, res.kv.layers, res.kv.block_tables
    return records


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
            "measured_peak_extra_bytes": max(r["measured_peak_extra_bytes"] for r in recs),
            "memory_bound_bytes": max(r["memory_bound_bytes"] for r in recs),
            "within_budget": all(r["measured_peak_extra_bytes"] <= r["memory_bound_bytes"] + MEASUREMENT_ALLOWANCE
                                 for r in recs),
            "scratch_bytes": scratch_bytes,
            "seconds": max(r["seconds"] for r in recs),
            "verified": all(r["verified"] for r in recs),
        })
        if r0.get("capacity"):
            cap = r0["capacity"]
            memory = [r["measured_memory_bytes"] for r in recs if r.get("measured_memory_bytes")]
            out[-1].update(
                kv_capacity_tokens_before=cap["old_tokens"], kv_capacity_tokens_after=cap["new_tokens"],
                kv_capacity_tokens_no_handoff=cap["no_handoff_tokens"], kv_bytes_mapped=cap["mapped_bytes"],
                kv_bytes_unmapped=cap["unmapped_bytes"], measured_memory_bytes=memory,
                # weights + mapped KV + scratch <= max(before, after) + the scratch budget, measured, on every rank
                memory_invariant_holds=bool(memory) and all(
                    m["peak"] <= max(m["before"], m["after"]) + scratch_bytes + MEASUREMENT_ALLOWANCE
                    for m in memory))
    return out


def print_table(transitions: list, file=sys.stdout) -> None:
    cols = [("from", 5), ("to", 5), ("weight_bytes_moved", 12), ("weight_bytes_min", 12), ("kv_bytes_moved", 12),
            ("kv_bytes_min", 12), ("kv_blocks_live", 6), ("peak_extra_bytes", 10), ("measured_peak_extra_bytes", 10),
            ("memory_bound_bytes", 10), ("seconds", 8), ("verified", 8)]
    heads = ["from", "to", "w moved", "w min", "kv moved", "kv min", "blocks", "tracked", "measured", "bound",
             "seconds", "verified"]
    print("  ".join(h.rjust(w) for h, (_, w) in zip(heads, cols)), file=file)
    for t in transitions:
        cells = [f"{t[k]:.3f}" if k == "seconds" else str(t[k]) for k, _ in cols]
        print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, cols)), file=file)


DEMO_ENGINE_MODEL = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=344,
                         num_hidden_layers=2, vocab_size=512, architectures=["LlamaForCausalLM"],
                         rms_norm_eps=1e-5, rope_theta=10000.0)
DEMO_PROMPT_LENGTHS = (5, 33, 12, 61, 3, 24, 47, 9)


def default_prompts(vocab_size: int, seed: int) -> list:
    """A few prompts of mixed lengths with deterministic token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in DEMO_PROMPT_LENGTHS]


def _engine_records(records: list) -> list:
    """The reference engine's transition records in the form summarize() reads."""
    out = []
    for r in records:
        st = r["stats"]
        out.append({"from": r["from"], "to": r["to"], "old_slots": r["old_slots"], "new_degree": r["new_degree"],
                    "sequences": r["sequences"], "destinations": r["destinations"],
                    "weight_bytes_received": st["weight_bytes_received"],
                    "kv_bytes_received": st["kv_bytes_received"], "peak_extra_bytes": st["peak_extra_bytes"],
                    "kv_peak_extra_bytes": st["kv_peak_extra_bytes"],
                    "measured_peak_extra_bytes": st["measured_peak_extra_bytes"],
                    "memory_bound_bytes": st["memory_bound_bytes"], "seconds": st["seconds"]["total"],
                    "verified": bool(r["verified"]), "step": r["step"],
                    "kv_blocks_live": len({(i, b) for i, t in r["sequences"].values() for b in t}),
                    "capacity": r.get("capacity", {}), "measured_memory_bytes": r.get("measured_memory_bytes", {})})
    return out


def run_reference(args, schedule, scratch: int) -> dict:
    from .reference import load_hf_checkpoint, run_generation
    from .reference.families import kv_layout_for
    if args.model_dir:
        model, _ = load_hf_checkpoint(args.model_dir)
    else:
        model = dict(DEMO_ENGINE_MODEL, torch_dtype=args.dtype)
    prompts = default_prompts(model["vocab_size"], args.seed)
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [[int(t) for t in p] for p in json.load(f)]
    common = dict(prompts=prompts, max_new_tokens=args.max_new_tokens, model_dir=args.model_dir,
                  config=None if args.model_dir else model, seed=args.seed, dtype=args.dtype,
                  scratch_bytes=scratch, block_size=args.block_size, num_blocks=args.num_blocks)
    with RankPool(args.world_size, timeout_s=args.timeout) as pool:
        per_rank = pool.run(run_generation, schedule=schedule, **common)
        baseline = pool.run(run_generation, schedule=[(args.world_size, 1)], verify=False, **common)
    model = dict(model, torch_dtype=args.dtype)
    specs = model_param_specs(model)
    layout = kv_layout_for(model, "vllm_flash_attn", "NHD", args.block_size)
    transitions = summarize([_engine_records(r["transitions"]) for r in per_rank], specs, layout, scratch)
    generated = per_rank[0]["tokens"]
    return {"engine": "reference", "transitions": transitions, "generated": generated,
            "matches_tp1": generated == baseline[0]["tokens"], "preemptions": sum(r["preemptions"] for r in per_rank)}


LONG_CONTEXT_SHORT = (12, 10, 7, 11, 9, 6, 8, 12, 5, 10)      # short prompts, arriving over the whole run
LONG_CONTEXT_ARRIVALS = (0, 0, 1, 2, 3, 6, 9, 12, 15, 18, 21)  # the long prompt is the 5th, at step 3
LONG_PROMPT_TOKENS = 600


def run_long_context(args, scratch: int) -> dict:
    """world 4 at 4x1 under a per-rank memory limit (weights + KV) that leaves each TP1 instance 64 KiB of KV:
    the long prompt fits no TP1 instance, nor a merged TP4 instance whose pool kept its bytes, only one whose pool
    took the weight memory the merge freed. The TP policy merges when it arrives and splits back when it is done;
    the short requests keep running throughout. Tokens are compared with a TP=1 run without a memory limit."""
    from .capacity import weight_bytes_per_gpu
    from .reference import run_generation
    from .reference.families import kv_layout_for
    from .reference.run import serve_with_policy
    model = dict(DEMO_ENGINE_MODEL, torch_dtype=args.dtype)
    specs = llama_param_specs(model)
    g = torch.Generator().manual_seed(args.seed)
    lengths = list(LONG_CONTEXT_SHORT[:4]) + [LONG_PROMPT_TOKENS] + list(LONG_CONTEXT_SHORT[4:])
    prompts = [torch.randint(1, model["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    arrivals = list(LONG_CONTEXT_ARRIVALS)
    long_index = lengths.index(LONG_PROMPT_TOKENS)
    limit = weight_bytes_per_gpu(specs, 1) + (64 << 10)
    common = dict(prompts=prompts, max_new_tokens=args.max_new_tokens, config=model, seed=args.seed,
                  dtype=args.dtype)
    with RankPool(args.world_size, timeout_s=args.timeout) as pool:
        per_rank = pool.run(serve_with_policy, arrivals=arrivals, memory_limit_bytes=limit, scratch_bytes=scratch,
                            block_size=args.block_size, **common)
        baseline = pool.run(run_generation, schedule=[(args.world_size, 1)], verify=False,
                            block_size=args.block_size, num_blocks=2 * (LONG_PROMPT_TOKENS + args.max_new_tokens),
                            **common)
    layout = kv_layout_for(model, "vllm_flash_attn", "NHD", args.block_size)
    transitions = summarize([_engine_records(r["transitions"]) for r in per_rank], specs, layout, scratch)
    per_token = {d: layout.num_layers * layout.block_bytes(d) // layout.block_size for d in (1, args.world_size)}
    for t in transitions:
        d_old, d_new = int(t["from"].split("x")[1]), int(t["to"].split("x")[1])
        if d_new > d_old:  # a merge: the pool grew by the weight bytes it freed, less page rounding
            freed = weight_bytes_per_gpu(specs, d_old) - weight_bytes_per_gpu(specs, d_new)
            rounding = layout.num_layers * layout.num_buffers * 4096 // per_token[d_new] + 2 * layout.block_size
            t["freed_weight_bytes"] = freed
            t["handoff_tokens_expected"] = freed // per_token[d_new]
            gain = t["kv_capacity_tokens_after"] - t["kv_capacity_tokens_no_handoff"]
            t["handoff_matches_freed_bytes"] = 0 <= t["handoff_tokens_expected"] - gain <= rounding
    generated = per_rank[0]["tokens"]
    return {"engine": "reference", "scenario": "long-context", "transitions": transitions, "generated": generated,
            "matches_tp1": generated == baseline[0]["tokens"], "memory_limit_bytes": limit,
            "long_prompt_tokens": LONG_PROMPT_TOKENS, "long_prompt_index": long_index,
            "served_long_prompt": len(generated[long_index]) == args.max_new_tokens,
            "capacity_tokens": {str(d): n * args.block_size for d, n in per_rank[0]["capacity_blocks"].items()},
            "decisions": per_rank[0]["decisions"], "final_config": per_rank[0]["final_config"],
            "preemptions": sum(r["preemptions"] for r in per_rank)}


def run_synthetic(args, schedule, scratch: int) -> dict:
    engine, order = args.kv_layout.split(":")
    kv_args = dict(engine=engine, order=order, num_layers=DEMO_MODEL["num_hidden_layers"],
                   num_kv_heads=DEMO_MODEL["num_key_value_heads"], head_dim=32, block_size=16, dtype="float32")
    with RankPool(args.world_size, timeout_s=args.timeout) as pool:
        per_rank = pool.run(_synthetic_rank, schedule, DEMO_MODEL, kv_args, args.num_blocks, args.fill, scratch,
                            args.seed)
    specs = llama_param_specs(DEMO_MODEL)
    return {"engine": "synthetic", "transitions": summarize(per_rank, specs, KVLayout(**kv_args), scratch)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m amoeba_core.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--schedule", default="4x1,2x2,1x4,2x2,4x1")
    p.add_argument("--engine", choices=("reference", "synthetic"), default="reference")
    p.add_argument("--scenario", choices=("schedule", "long-context"), default="schedule",
                   help="schedule: the degrees follow --schedule; long-context: the TP policy merges for a long "
                        "prompt under a memory limit and splits back (reference engine, elastic KV pools)")
    p.add_argument("--model-dir", help="HF model directory (config.json + model.safetensors); default: a small "
                                       "random Llama-shaped model")
    p.add_argument("--prompts", metavar="FILE", help="JSON list of token-id lists (default: 8 prompts, 3-61 tokens)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--scratch-mib", type=float, default=1.0, help="scratch budget per rank (MiB)")
    p.add_argument("--block-size", type=int, default=4, help="reference engine: tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per rank at the starting degree (default: 64 reference, 96 synthetic)")
    p.add_argument("--kv-layout", default="vllm_flash_attn:NHD", help="synthetic: ENGINE:ORDER of the KV pool")
    p.add_argument("--fill", type=float, default=0.45, help="synthetic: fraction of each pool holding live blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300, help="seconds before a hung rank fails the run")
    args = p.parse_args(argv)
    schedule = parse_schedule(args.schedule, args.world_size)
    scratch = int(args.scratch_mib * (1 << 20))
    if args.num_blocks is None:
        args.num_blocks = 64 if args.engine == "reference" else 96
    what = f"scenario {args.scenario}" if args.scenario != "schedule" else f"schedule {args.schedule}"
    print(f"amoeba_core demo ({args.engine}): world {args.world_size}, {what}, scratch {scratch} bytes", flush=True)
    t0 = time.perf_counter()
    if args.scenario == "long-context":
        report = run_long_context(args, scratch)
    elif args.engine == "reference":
        report = run_reference(args, schedule, scratch)
    else:
        report = run_synthetic(args, schedule, scratch)
    transitions = report["transitions"]
    print_table(transitions)
    ok = all(t["verified"] and t["weight_bytes_moved"] == t["weight_bytes_min"]
             and t["kv_bytes_moved"] == t["kv_bytes_min"] and t["within_budget"] for t in transitions)
    if report.get("scenario") == "long-context":
        for t in transitions:
            print(f"  {t['from']} -> {t['to']}: KV tokens per instance {t['kv_capacity_tokens_before']} -> "
                  f"{t['kv_capacity_tokens_after']} (without the handoff: {t['kv_capacity_tokens_no_handoff']}); "
                  f"memory invariant measured on every rank: {t['memory_invariant_holds']}")
        print(f"long prompt of {report['long_prompt_tokens']} tokens served: {report['served_long_prompt']}; "
              f"policy decisions (step, action, degree): {report['decisions']}")
        ok = ok and report["served_long_prompt"] and len(transitions) >= 2 and all(
            t["memory_invariant_holds"] and t.get("handoff_matches_freed_bytes", True) for t in transitions)
    if "generated" in report:
        print(f"generated {sum(len(g) for g in report['generated'])} tokens for {len(report['generated'])} prompts; "
              f"identical to a TP=1 run without transitions: {report['matches_tp1']}")
        ok = ok and report["matches_tp1"]
    report = {"world_size": args.world_size, "schedule": args.schedule, **report,
              "seconds": time.perf_counter() - t0}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    print("all transitions verified, minimal and within the scratch budget" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
