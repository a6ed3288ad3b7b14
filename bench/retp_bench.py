"""retp against the alternatives and the physical floor, on a model with Llama-3-8B per-layer dimensions.

    python bench/retp_bench.py --quick --json /tmp/q.json --plot /tmp/q.png       # < 5 min on 2 CPU cores
    python bench/retp_bench.py --json bench/results.json --plot bench/results.png  # ~15 min

World size ranks (RankPool: CPU processes with gloo, or --device cuda with NCCL) hold a TP-sharded model with the
real per-layer dims of --preset (hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 14336; fewer
layers, see --layers / --vocab) and a paged KV cache (vllm_flash_attn NHD, block 16) of live sequences with mixed
lengths and shared prefixes (verify.random_sequences). For each transition of --schedule every method below runs
from the same starting state (rebuilt untimed before every repetition) to the same new configuration (the
placement retp chooses):

  retp     amoeba_core.retp: weights + KV cache, in place, in one call, once per --transport: "torch" (point-to-
           point messages over gloo / NCCL) and "samehost" (every rank pulls what it receives straight from its
           peers' memory: transport.samehost)
  floor    what no method can avoid: the per-(src, dst) byte counts of retp's plan (plan.pair_bytes(), the KV part
           checked against plan.kv.sent / received) sent as one contiguous uint8 message per
           peer with one batch_isend_irecv, plus one copy of the bytes each rank relocates locally
           (plan.local_relocation_bytes: retained stretches, compactions, KV parts that stay; buffers preallocated
           and touched, untimed; the received bytes land in fresh memory, like retp's new shards)
  floor_samehost  the floor of the same-host path (run when --transport includes samehost): every rank copies
           each byte it receives once, at memcpy speed, from the sender's shared mapping (/dev/shm files, written
           and mapped untimed) into fresh memory, plus the same one copy of its local relocations
  naive    per tensor all_gather within the old instance, rebuild the full tensor, shard() it; KV: all_gather the
           instance's live blocks (all heads), send full-head blocks to the new instances' ranks, copy them into a
           newly allocated second pool
  dcp      torch.distributed.checkpoint: dcp.save of the old shards (DTensors on an (instances, degree) mesh, one
           per fused section) to /dev/shm, release them, dcp.load into views of the new fused shards (a real
           resharding load); the KV cache takes the naive path (DCP has no notion of block tables)
  restart  a restarted engine: read the full model from a safetensors file in /dev/shm, shard() it, then rebuild
           the KV cache by prefilling the live sequences with the reference engine (amoeba_core.reference); with
           --restart-tokens N only N tokens per new instance are prefilled and the prefill time is scaled
           linearly to all live tokens (marked "estimated")

Timing: barrier, host timer around the method on every rank (CUDA synchronised), seconds = max over ranks, median
over --reps after --warmup. bytes_moved: bytes received over the transport, all ranks (restart: bytes read from the
checkpoint). peak_extra_bytes: max over ranks of the bytes a method holds beyond the old and new state (retp: its
own tracker; baselines: tracked the same way; dcp adds its tmpfs checkpoint share); rss_extra_bytes: VmHWM after
minus VmRSS before (clear_refs 5), an independent check; for retp its own RetpStats.measured_peak_extra_bytes (the
same high-water mark read per phase, above max(before, after)), and the budget check compares that measurement with
RetpStats.memory_bound_bytes + amoeba_core.demo.MEASUREMENT_ALLOWANCE.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import amoeba_core as A  # noqa: E402
from amoeba_core.config import TPConfig  # noqa: E402
from amoeba_core.planning.cost import Bandwidths, calibrate  # noqa: E402
from amoeba_core.demo import MEASUREMENT_ALLOWANCE  # noqa: E402
from amoeba_core.kv import KVCache, KVLayout  # noqa: E402
from amoeba_core.launch import RankPool  # noqa: E402
from amoeba_core.verify import kv_check, random_sequences  # noqa: E402

from bench import baselines as B  # noqa: E402

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      num_hidden_layers=32, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                      architectures=["LlamaForCausalLM"]),
}
METHODS = ("retp", "floor", "floor_samehost", "naive", "dcp", "restart")
TRANSPORTS = ("torch", "samehost")
# method -> (op, goal) of method / retp (retp / floor for the floors), compared with retp over the transport the
# method itself uses (the baselines all send over torch.distributed)
TARGETS = {"floor": ("<=", 1.25), "floor_samehost": ("<=", 1.25), "naive": (">=", 2.0), "dcp": (">=", 2.0),
           "restart": (">=", 10.0)}
METHOD_TRANSPORT = {"floor_samehost": "samehost", "restart": "none"}  # all others: torch (retp: its own)


# ---- rank side ---------------------------------------------------------------------------------------------
_STATE: dict = {}


def _state(c: dict) -> dict:
    key = (c["dtype"], c["device"])
    if _STATE.get("key") != key:
        _STATE.clear()
        _STATE["key"] = key
        _STATE["model"] = B.FullModel(getattr(torch, c["dtype"]), c["device"])
    return _STATE


def _layout(c: dict) -> KVLayout:
    m = c["model"]
    return KVLayout("vllm_flash_attn", "NHD", m["num_hidden_layers"], m["num_key_value_heads"], c["head_dim"],
                    c["block_size"], c["dtype"])


def _pool_blocks(layout: KVLayout, blocks_deg1: int, degree: int) -> int:
    return layout.num_blocks_for(blocks_deg1 * layout.block_bytes(1), degree)


def _sequences(c: dict, old: TPConfig) -> dict:
    layout = _layout(c)
    n_old = _pool_blocks(layout, c["num_blocks"], old.degree)
    return random_sequences(old.num_instances, n_old, c["fill"], c["seed"] + 1000 * c["index"])


def _origins(seqs: dict) -> dict:
    return {s: [(i, b) for b in t] for i in seqs for s, t in seqs[i].items()}


def rank_case(rank: int, world: int, c: dict) -> dict:
    """Run one (transition, method) on this rank: warm-up + timed repetitions from a freshly built state."""
    st = _state(c)
    model, device, method = st["model"], c["device"], c["method"]
    specs = A.llama_param_specs(c["model"], dtype=c["dtype"])
    layout = _layout(c)
    old = TPConfig.from_instances(c["old"])
    new = TPConfig.from_instances(c["new"]) if c.get("new") else None
    o = old.slot(rank)
    seqs = _sequences(c, old)
    n_old = _pool_blocks(layout, c["num_blocks"], old.degree)
    B.instance_groups(old)
    if new is not None:
        B.instance_groups(new)
    if method == "dcp":
        B.mesh_of(old, device)
        B.mesh_of(new, device)
    out = {"reps": [], "info": {}}
    for rep in range(c["warmup"] + c["reps"]):
        timed = rep >= c["warmup"]
        check = timed and rep == c["warmup"] and (c["verify"] is True or (bool(c["verify"]) and method in c["verify"]))
        tables = {s: list(t) for s, t in seqs[o.instance].items()}
        if method in ("floor", "floor_samehost", "restart"):
            weights = layers = None   # floor needs no model; restart starts in a fresh process
        else:
            weights = B.build_weights(model, specs, o.tp_rank, o.degree)
            layers = B.build_kv(layout, n_old, old.degree, o.tp_rank, o.instance, tables, device)
        rec = {}
        pre = None
        if method == "floor":
            pre = B.floor_buffers(np.array(c["pairs"]), rank, device, c["local_bytes"][rank])
        if method == "floor_samehost":
            pre = B.floor_samehost_buffers(np.array(c["pairs"]), rank, c["local_bytes"][rank], c["shm"],
                                           f"{c['index']}_{rep}")
        if method == "dcp" and rank == 0:
            B.cleanup(c["dcp_path"])
        gc.collect()
        rss0 = B.rss_reset()
        B.sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        if method == "retp":
            res = A.retp(None, c["new_degree"], config=old, specs=specs, weights=weights,
                         kv=KVCache(layout, layers, tables), scratch_bytes=c["scratch_bytes"],
                         transport=c["transport"])
            B.sync(device)
            t1 = time.perf_counter()
            n = res.slot
            rec.update(received=res.stats.bytes_received, sent=res.stats.bytes_sent,
                       peak_extra=res.stats.peak_extra_bytes, parts=dict(res.stats.seconds),
                       budget=res.stats.memory_bound_bytes, measured=res.stats.measured_peak_extra_bytes,
                       transport=res.stats.transport)
            new_w, new_layers, new_tables, new_cfg = res.weights, res.kv.layers, res.kv.block_tables, res.config
            if rep == 0:
                out["info"].update(new=[list(r) for r in res.config.instances()],
                                   destinations=dict(res.kv.destinations),
                                   plan_bytes=int(res.plan.bytes_moved), kv_plan_bytes=int(res.plan.kv_bytes_moved))
                if rank == 0:
                    out["info"]["pairs"] = B.plan_pair_bytes(res.plan).tolist()
                    out["info"]["plan"] = res.plan.summary()
                    out["info"]["local_bytes"] = [res.plan.local_relocation_bytes(r) for r in range(world)]
                    estimate = res.plan.estimate(Bandwidths(**c["bandwidths"]))
                    out["info"]["predicted_seconds"] = estimate.seconds
                    out["info"]["estimate"] = estimate.summary()
            del res
        elif method == "floor":
            B.floor_exchange(*pre)
            B.sync(device)
            t1 = time.perf_counter()
            rec.update(received=sum(B.nbytes(t) for t in pre[1].values()),
                       sent=sum(B.nbytes(t) for t in pre[0].values()),
                       peak_extra=sum(B.nbytes(t) for d in pre[:2] for t in d.values()) +
                       sum(B.nbytes(t) for t in pre[2][:1]), local_bytes=c["local_bytes"][rank])
            new_w = new_layers = None
        elif method == "floor_samehost":
            B.floor_samehost_copy(*pre[:3])
            t1 = time.perf_counter()
            rec.update(received=sum(B.nbytes(t) for t in pre[1].values()), sent=0,
                       peak_extra=sum(B.nbytes(t) for t in pre[1].values()) + sum(B.nbytes(t) for t in pre[2][:1]),
                       local_bytes=c["local_bytes"][rank])
            pre[3]()
            new_w = new_layers = None
        elif method in ("naive", "dcp"):
            mem = B.Tracker()
            dests = c["destinations"]
            if method == "naive":
                got_w = B.naive_weights(rank, specs, weights, old, new, mem)
            else:
                got_w = B.dcp_reshard(rank, specs, weights, old, new, c["dcp_path"], device, mem)
            B.sync(device)
            tw = time.perf_counter()
            new_layers, new_tables, got_kv = B.naive_kv(rank, layout, layers, tables, old, new, dests, mem, device)
            layers = None
            B.sync(device)
            t1 = time.perf_counter()
            new_w, new_cfg = weights, new
            peak = mem.peak
            if method == "dcp":
                dist.barrier()
                ck = B.dir_bytes(c["dcp_path"])
                peak += ck // world   # this rank's share of the checkpoint held in tmpfs
                rec["checkpoint_bytes"] = ck
            rec.update(received=got_w + got_kv, peak_extra=peak, parts={"weights": tw - t0, "kv": t1 - tw})
        elif method == "restart":
            n = new.slot(rank)
            weights = B.restart_load(c["ckpt"], specs, n.tp_rank, n.degree, device)
            from amoeba_core.reference import SeqState, TPEngine
            hf = dict(c["model"], torch_dtype=c["dtype"], tie_word_embeddings=c["model"].get("tie_word_embeddings",
                                                                                              False))
            n_new = _pool_blocks(layout, c["num_blocks"], new.degree)
            engine = TPEngine(rank, hf, specs, weights, new, layout, layout.allocate(n_new, new.degree, device), [])
            B.sync(device)
            tl = time.perf_counter()
            dests = c["destinations"]
            mine = sorted((s for s, d in dests.items() if d == n.instance), key=repr)
            all_tables = {s: t for i in seqs for s, t in seqs[i].items()}
            live_tokens = sum(len(all_tables[s]) for s in mine) * layout.block_size
            budget = c["restart_tokens"] or live_tokens
            batch, batch_tokens, done_tokens = [], 0, 0
            g = torch.Generator().manual_seed(1234)
            vocab = c["model"]["vocab_size"]

            def flush():
                for sq in batch:
                    engine.seqs[sq.seq_id] = sq
                    engine.owned.append(sq.seq_id)
                while any(engine.seqs[sq.seq_id].status != "finished" for sq in batch):
                    engine.step()
                batch.clear()

            for s in mine:
                if done_tokens >= budget:
                    break
                ntok = len(all_tables[s]) * layout.block_size
                prompt = torch.randint(0, vocab, (ntok,), generator=g).tolist()
                batch.append(SeqState(s, prompt, 1))
                batch_tokens += ntok
                done_tokens += ntok
                if batch_tokens >= c["prefill_batch"]:
                    flush()
                    batch_tokens = 0
            if batch:
                flush()
            B.sync(device)
            t1 = time.perf_counter()
            prefill = t1 - tl
            scale = live_tokens / done_tokens if done_tokens else 1.0
            t1 = tl + prefill * scale
            largest_full = max(int(np.prod(s.shape)) * s.itemsize for s in specs)
            rec.update(received=os.path.getsize(c["ckpt"]), peak_extra=largest_full,
                       parts={"load": tl - t0, "prefill_measured": prefill, "prefill_scaled": prefill * scale},
                       live_tokens=live_tokens, prefilled_tokens=done_tokens, estimated=done_tokens < live_tokens)
            new_w, new_layers, new_cfg = engine.weights, None, new
            del engine
        hwm = B.rss_peak()
        rec["seconds"] = t1 - t0
        # retp resets the high-water mark at its phase boundaries: use its own measurement (the same VmHWM, taken
        # per phase, above max(before, after)); the other methods are measured around the call.
        rec["rss_extra"] = rec["measured"] if method == "retp" else max(0, hwm - rss0)
        dist.barrier()
        if check and new_w is not None:
            nslot = new_cfg.slot(rank)
            rec["bad_weights"] = B.weights_ok(model, specs, new_w, nslot.tp_rank, nslot.degree)
            if new_layers is not None:
                rec["bad_kv"] = len(kv_check(layout, new_layers, new_tables, _origins(seqs),
                                             layout.head_range(nslot.tp_rank, nslot.degree)))
        if timed:
            out["reps"].append(rec)
        if method == "dcp":
            dist.barrier()
            if rank == 0:
                B.cleanup(c["dcp_path"])
        weights = layers = new_w = new_layers = pre = None
        gc.collect()
        dist.barrier()
    return out


def rank_calibrate(rank: int, world: int, device: str) -> dict:
    """This machine's speeds for the cost model (planning.cost.calibrate), the same on every rank."""
    return dataclasses.asdict(calibrate(None, device))


def rank_write_checkpoint(rank: int, world: int, c: dict, path: str) -> int:
    size = 0
    if rank == 0:
        st = _state(c)
        specs = A.llama_param_specs(c["model"], dtype=c["dtype"])
        size = B.write_safetensors(path, st["model"], specs)
    dist.barrier()
    return size


# ---- driver ------------------------------------------------------------------------------------------------
def parse_schedule(text: str, world: int):
    out = []
    for item in text.split(","):
        n, d = (int(x) for x in item.lower().split("x"))
        if n * d != world:
            raise SystemExit(f"schedule entry {item} does not cover world size {world}")
        out.append((n, d))
    return out


def fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def summarize(transition: str, method: str, per_rank: list, new_degree_cfg) -> dict:
    reps = list(zip(*[r["reps"] for r in per_rank]))   # per rep: tuple of rank records
    secs = [max(r["seconds"] for r in rep) for rep in reps]
    first = reps[0]
    transport = METHOD_TRANSPORT.get(method, "torch")
    if method == "retp":
        transport = first[0]["transport"]
    case = {
        "transition": transition, "method": method, "transport": transport, "seconds": statistics.median(secs),
        "seconds_all": secs,
        "bytes_moved": int(sum(r["received"] for r in first)),
        "peak_extra_bytes": int(max(r["peak_extra"] for r in first)),
        "rss_extra_bytes": int(max(r["rss_extra"] for r in first)),
    }
    parts = [r.get("parts") for r in first if r.get("parts")]
    if parts:
        case["parts_seconds"] = {k: max(p[k] for p in parts) for k in parts[0]}
    if "budget" in first[0]:
        case["peak_budget_bytes"] = int(min(r["budget"] for r in first))
        case["peak_within_budget"] = all(r["measured"] <= r["budget"] + MEASUREMENT_ALLOWANCE for r in first)
    if "bad_weights" in first[0]:
        case["verified"] = all(not r["bad_weights"] and not r.get("bad_kv") for r in first)
    if method == "restart":
        case["estimated"] = any(r["estimated"] for r in first)
        case["live_tokens"] = int(sum(r["live_tokens"] for r in first if True) // max(1, new_degree_cfg))
        case["prefilled_tokens"] = int(sum(r["prefilled_tokens"] for r in first) // max(1, new_degree_cfg))
        case["bytes_moved"] = int(sum(r["received"] for r in first))
    if method == "dcp":
        case["checkpoint_bytes"] = int(first[0].get("checkpoint_bytes", 0))
    return case


def print_header() -> None:
    print(f"{'transition':>10} {'method':>14} {'transport':>9} {'seconds':>9} {'x retp':>8} {'bytes moved':>12} "
          f"{'GB/s':>7} "
          f"{'peak extra':>11} {'rss extra':>11}  notes", flush=True)


def print_row(case: dict, retp_s) -> None:
    ratio = case["seconds"] / retp_s if retp_s else float("nan")
    gbps = case["bytes_moved"] / case["seconds"] / 1e9 if case["seconds"] > 0 else 0.0
    notes = []
    if "verified" in case:
        notes.append("verified" if case["verified"] else "MISMATCH")
    if case.get("estimated"):
        notes.append(f"prefill scaled from {case['prefilled_tokens']} of {case['live_tokens']} tokens")
    if "peak_within_budget" in case:
        notes.append(f"budget {fmt_bytes(case['peak_budget_bytes'])} " +
                     ("ok" if case["peak_within_budget"] else "EXCEEDED"))
    if case.get("predicted_seconds"):
        notes.append(f"predicted {case['predicted_seconds']:.3f} s")
    print(f"{case['transition']:>10} {case['method']:>14} {case['transport']:>9} {case['seconds']:>9.3f} {ratio:>8.2f} "
          f"{fmt_bytes(case['bytes_moved']):>12} {gbps:>7.2f} {fmt_bytes(case['peak_extra_bytes']):>11} "
          f"{fmt_bytes(case['rss_extra_bytes']):>11}  {', '.join(notes)}", flush=True)


def evaluate_targets(cases: list) -> list:
    """One entry per (transition, target): ratio, goal and whether it is met. Each method is compared with retp
    over the transport it uses itself (floor_samehost with retp over samehost, the others with retp over torch)."""
    out = []
    by = {(c["transition"], c["method"], c["transport"]): c for c in cases}
    for tr in dict.fromkeys(c["transition"] for c in cases):
        retps = {t: by[(tr, "retp", t)] for t in TRANSPORTS if (tr, "retp", t) in by}
        if not retps:
            continue
        for m, (op, goal) in TARGETS.items():
            mt = METHOD_TRANSPORT.get(m, "torch")
            c = by.get((tr, m, mt))
            r = retps.get(mt if mt in retps else "torch", next(iter(retps.values())))
            if c is None:
                continue
            if m.startswith("floor"):
                ratio = r["seconds"] / c["seconds"] if c["seconds"] > 0 else float("inf")
                what = f"retp[{r['transport']}] / {m}"
            else:
                ratio = c["seconds"] / r["seconds"]
                what = f"{m} / retp[{r['transport']}]"
            met = ratio <= goal if op == "<=" else ratio >= goal
            out.append({"transition": tr, "target": f"{what} {op} {goal}", "ratio": ratio, "met": bool(met)})
        old_deg, new_deg = (int(x.split("x")[1]) for x in tr.split("->"))
        if len(retps) == 2 and new_deg < old_deg:  # splits: the same-host path against gloo
            ratio = retps["torch"]["seconds"] / retps["samehost"]["seconds"]
            out.append({"transition": tr, "target": "retp[torch] / retp[samehost] >= 3.0", "ratio": ratio,
                        "met": bool(ratio >= 3.0)})
        for t, r in retps.items():
            # A merge that stages nothing in new memory has a bound of 0 B (its KV scratch lives in storage the
            # weights left behind): the ratio is then 0 and "met" says whether the measurement stayed within the
            # allowance; the bookkeeping's host tables are not part of the bound.
            budget = r.get("peak_budget_bytes", 1)
            out.append({"transition": tr, "target": f"retp[{t}] peak extra <= scratch + largest new shard",
                        "ratio": r["peak_extra_bytes"] / budget if budget > 0 else 0.0,
                        "met": bool(r.get("peak_within_budget"))})
        r = retps.get("torch")
        if r is not None and r.get("predicted_seconds"):  # the cost model is calibrated for the torch transport
            ratio = r["predicted_seconds"] / r["seconds"]
            out.append({"transition": tr, "target": "cost model within +-30 % (predicted / measured)",
                        "ratio": ratio, "met": bool(0.7 <= ratio <= 1.3)})
    return out


def label(case: dict) -> str:
    return f"retp[{case['transport']}]" if case["method"] == "retp" else case["method"]


def plot(cases: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trs = list(dict.fromkeys(c["transition"] for c in cases))
    methods = list(dict.fromkeys(label(c) for c in sorted(cases, key=lambda c: METHODS.index(c["method"]))))
    by = {(c["transition"], label(c)): c for c in cases}
    fig, ax = plt.subplots(figsize=(2.2 * len(trs) + 2, 4.5))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(trs))]
        ys = [max(by[(t, m)]["seconds"], 1e-5) if (t, m) in by else 0 for t in trs]
        ax.bar(xs, ys, width, label=m + (" (prefill scaled)" if m == "restart" and any(
            by.get((t, m), {}).get("estimated") for t in trs) else ""))
        for x, y in zip(xs, ys):
            if y:
                ax.text(x, y * 1.08, f"{y:.2g}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks(range(len(trs)))
    ax.set_xticklabels(trs)
    ax.set_ylabel("seconds (median, max over ranks)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def planner_hook(quick: bool):
    """bench/planner_scaling.py (written separately): planner_scaling(quick) -> [{layers, world_size, kv_blocks,
    seconds}]; None when the module is missing."""
    try:
        from bench.planner_scaling import planner_scaling
    except ImportError:
        return None  # TODO: bench/planner_scaling.py not present yet
    return planner_scaling(quick=quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 layer, vocab 8192, small KV pool, 1 repetition (< 5 min)")
    p.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--schedule", default=None, help="default 4x1,2x2,1x4,2x2,4x1 (world 4)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; --quick 1)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the preset's; --quick 8192)")
    p.add_argument("--untied", action="store_true", help="separate lm_head (Llama-3-8B is untied; default ties "
                   "it to the embedding so the full run fits 24 GiB with 4 ranks)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per rank at degree 1 (default 1024; "
                   "--quick 512); the pool keeps its bytes at other degrees")
    p.add_argument("--fill", type=float, default=0.45, help="fraction of each starting pool holding live blocks")
    p.add_argument("--scratch-mib", type=float, default=64.0)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--transport", default="torch,samehost", help="retp's data paths, each timed as its own case "
                   "(floor_samehost runs when samehost is one of them)")
    p.add_argument("--restart-tokens", type=int, default=None, help="tokens prefilled per new instance by restart "
                   "(0: all live tokens; default 2048; --quick 128); the prefill time is scaled linearly")
    p.add_argument("--prefill-batch", type=int, default=1024, help="max tokens per prefill step (restart)")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exact check of the first timed rep")
    p.add_argument("--verify-all", action="store_true", help="--quick checks retp only unless this is given")
    p.add_argument("--no-planner", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shm", default="/dev/shm", help="tmpfs directory for the dcp and restart checkpoints")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    q = args.quick
    layers = args.layers or (1 if q else 2)
    reps = args.reps or (1 if q else 3)
    num_blocks = args.num_blocks or (512 if q else 1024)
    restart_tokens = args.restart_tokens if args.restart_tokens is not None else (128 if q else 2048)
    model = dict(PRESETS[args.preset], num_hidden_layers=layers, tie_word_embeddings=not args.untied)
    model["vocab_size"] = args.vocab or (8192 if q else model["vocab_size"])
    schedule = parse_schedule(args.schedule or "4x1,2x2,1x4,2x2,4x1", args.world_size)
    transports = [t for t in args.transport.split(",") if t]
    if not transports or any(t not in TRANSPORTS for t in transports):
        p.error(f"--transport takes a comma-separated subset of {','.join(TRANSPORTS)}")
    methods = [m for m in args.methods.split(",") if m and (m != "floor_samehost" or "samehost" in transports)]
    specs = A.llama_param_specs(model, dtype=args.dtype)
    model_bytes = sum(int(np.prod(s.shape)) * s.itemsize for s in specs)
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    base = dict(model=model, dtype=args.dtype, device=args.device, head_dim=head_dim, block_size=16,
                num_blocks=num_blocks, fill=args.fill, seed=args.seed, scratch_bytes=int(args.scratch_mib * 2**20),
                warmup=args.warmup, reps=reps, verify=(False if args.no_verify else ("retp",) if q and not args.verify_all else True), restart_tokens=restart_tokens,
                prefill_batch=args.prefill_batch)
    layout = KVLayout("vllm_flash_attn", "NHD", layers, model["num_key_value_heads"], head_dim, 16, args.dtype)
    kv_pool = num_blocks * layout.block_bytes(1) * layers
    work = os.path.join(args.shm, f"amoeba_bench_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    print(f"retp_bench: {args.preset} dims, {layers} layers, vocab {model['vocab_size']} "
          f"({'untied' if args.untied else 'tied'}), {args.dtype}, model {fmt_bytes(model_bytes)}; KV pool "
          f"{fmt_bytes(kv_pool)} per rank ({num_blocks} blocks at degree 1, fill {args.fill}); world "
          f"{args.world_size} ({args.device}, {'nccl' if args.device == 'cuda' else 'gloo'}); schedule "
          f"{','.join(f'{n}x{d}' for n, d in schedule)}; scratch {args.scratch_mib:g} MiB; {args.warmup} warm-up + "
          f"{reps} timed reps; methods {','.join(methods)}; transports {','.join(transports)}", flush=True)
    cases, infos = [], {}
    backend = "nccl" if args.device == "cuda" else "gloo"
    try:
        with RankPool(args.world_size, timeout_s=args.timeout, backend=backend) as pool:
            bw = pool.run(rank_calibrate, args.device)[0]
            base["bandwidths"] = bw
            print("calibrated: " + ", ".join(f"{k} {v:.4g}" for k, v in bw.items()), flush=True)
            old = TPConfig.contiguous(args.world_size, schedule[0][1])
            print_header()
            plan = []
            for k, (n, d) in enumerate(schedule[1:]):
                name = f"{old.num_instances}x{old.degree}->{n}x{d}"
                c = dict(base, index=k, old=[list(r) for r in old.instances()], new_degree=d, method="retp",
                         shm=work)
                first = None
                for transport in transports:
                    t = time.perf_counter()
                    per_rank = pool.run(rank_case, dict(c, transport=transport))
                    info = dict(per_rank[0]["info"])
                    case = summarize(name, "retp", per_rank, d)
                    case["wall_seconds"] = time.perf_counter() - t
                    if transport == "torch":  # the cost model describes the message path
                        case["predicted_seconds"] = info["predicted_seconds"]
                        case["estimate"] = info["estimate"]
                    cases.append(case)
                    print_row(case, (first or case)["seconds"])
                    first = first or case
                    if transport == transports[0]:
                        first_info = info
                info = first_info
                infos[name] = {"config_before": old.describe(), "plan": info.get("plan")}
                case = first
                new = TPConfig.from_instances(info["new"])
                infos[name]["config_after"] = new.describe()
                follow = dict(c, new=info["new"], destinations=info["destinations"], pairs=info["pairs"],
                              local_bytes=info["local_bytes"], dcp_path=os.path.join(work, f"dcp_{k}"))
                plan.append((name, follow, case["seconds"], d))
                for m in methods:
                    if m in ("retp", "restart"):
                        continue
                    t = time.perf_counter()
                    per_rank = pool.run(rank_case, dict(follow, method=m))
                    cs = summarize(name, m, per_rank, d)
                    cs["wall_seconds"] = time.perf_counter() - t
                    cases.append(cs)
                    print_row(cs, case["seconds"])
                old = new
            if "restart" in methods:
                ckpt = os.path.join(work, "model.safetensors")
                size = pool.run(rank_write_checkpoint, base, ckpt)[0]
                print(f"restart: wrote {fmt_bytes(size)} safetensors checkpoint to {ckpt}", flush=True)
                for name, follow, retp_s, d in plan:
                    t = time.perf_counter()
                    per_rank = pool.run(rank_case, dict(follow, method="restart", ckpt=ckpt, warmup=0, reps=1))
                    cs = summarize(name, "restart", per_rank, d)
                    cs["wall_seconds"] = time.perf_counter() - t
                    cases.append(cs)
                    print_row(cs, retp_s)
                os.remove(ckpt)
    finally:
        B.cleanup(work)
    order = {m: i for i, m in enumerate(METHODS)}
    trs = list(dict.fromkeys(c["transition"] for c in cases))
    cases.sort(key=lambda c: (trs.index(c["transition"]), order[c["method"]],
                              transports.index(c["transport"]) if c["transport"] in transports else 0))
    retp_by = {}
    for c in cases:
        if c["method"] == "retp":
            retp_by.setdefault(c["transition"], c["seconds"])  # the first transport's
    for c in cases:
        c["ratio_to_retp"] = c["seconds"] / retp_by[c["transition"]] if retp_by.get(c["transition"]) else None
        c["gb_per_s"] = c["bytes_moved"] / c["seconds"] / 1e9 if c["seconds"] > 0 else None
    print("\nsummary (sorted):")
    print_header()
    for c in cases:
        print_row(c, retp_by.get(c["transition"]))
    targets = evaluate_targets(cases)
    print("\ntargets:")
    for tg in targets:
        print(f"  {tg['transition']:>10}  {tg['target']:<48} {tg['ratio']:>9.3f}  "
              f"{'met' if tg['met'] else 'MISSED'}")
    planner = None
    if not args.no_planner:
        t = time.perf_counter()
        planner = planner_hook(q)
        if planner is None:
            print("planner: bench/planner_scaling.py not found (TODO hook)")
        else:
            print(f"planner scaling ({time.perf_counter() - t:.1f} s):")
            for row in planner:
                print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in row.items()))
    total = time.perf_counter() - t_start
    print(f"total wall time {total:.1f} s")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv, "quick": q,
        "machine": {"cpus": os.cpu_count(), "device": args.device, "backend": backend, "torch": torch.__version__},
        "model": model, "dtype": args.dtype, "model_bytes": model_bytes, "kv_pool_bytes_per_rank": kv_pool,
        "world_size": args.world_size, "schedule": [f"{n}x{d}" for n, d in schedule], "transports": transports,
        "scratch_bytes": base["scratch_bytes"], "reps": reps, "warmup": args.warmup,
        "restart_tokens": restart_tokens, "cases": cases, "targets": targets, "transitions": infos,
        "bandwidths": base.get("bandwidths"),
        "planner": planner, "total_seconds": total,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(cases, args.plot, f"retp vs alternatives: {args.preset} dims, {layers} layers, world "
                               f"{args.world_size} ({args.device}/{backend}), {args.dtype}")
        print(f"wrote {args.plot}")
    bad = [c for c in cases if c.get("verified") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
