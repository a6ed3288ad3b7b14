"""When does a TP change pay off? Trace-driven simulation of static and adaptive TP on H100-class GPUs.

    python bench/simulate.py --quick --json /tmp/sim.json             # a few minutes on 2 cores
    python bench/simulate.py --json bench/sim_results.json --plot-prefix bench/sim   # full sweep (see NOTES)

For each trace (../shared/traces, stem = name), model shape (bench/model_shapes.py) and GPU count, every policy is
run over a sweep of load levels (arrival times divided by the load: 1 = the trace as recorded):

  adaptive              amoeba_core.policy.TPPolicy, instances start at the smallest degree the model fits and
                        merge / split with the memory handoff (capacity.py "with handoff" pool sizes); its base
                        degree (rule 0) follows a ReplayPredictor of the last window_s of arrivals
  adaptive_no_handoff   the same policy, but a merged instance's pool keeps the bytes of its parts (capacity.py
                        "no handoff"): rule 2c never fires, merges only serve requests no instance can hold
  adaptive_kv_only      the policy without a predictor (no rule 0: base = the lowest degree, merges only for KV),
                        with the memory handoff: the rule set of the first version of this bench, for comparison
  static:<NxD,...>      a fixed mix of instances, each with the pool its degree leaves (e.g. static:4x1, static:2x1,1x2)

The serving model, scheduler and transformation model are amoeba_core.simulator's (read its docstring); capacities
come from amoeba_core.capacity (bf16 weights and KV, 80 GB H100 at 90 % utilisation); transformation costs from
amoeba_core.policy.ByteCostModel. SLO of a request (assumption, fixed before any run): TTFT <= max(1 s, 5 x its
prefill alone on one instance of the base degree) and TPOT <= max(0.1 s, 5 x one batch-1 decode step at the base
degree at its mean context); requests never served count as misses. "Throughput at SLO" of a policy is the highest
throughput among the loads whose SLO attainment is >= --slo-target (0.9); the best static configuration is chosen
per (trace, model, GPUs) with hindsight by that figure.

JSON: {"runs": [{trace, model, num_gpus, policy, load, throughput_tokens_s (prompt + output tokens of served
requests per second of the run), throughput_requests_s, ttft_p99_s, tpot_p99_s, slo_attainment, unserved,
transformations, seconds_transforming, and more}], "summary": [...], "roofline_check": [...], "setup": {...}}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

import numpy as np  # noqa: E402

from amoeba_core import llama_param_specs  # noqa: E402
from amoeba_core.capacity import capacity_report  # noqa: E402
from amoeba_core.layout.kv import KVLayout  # noqa: E402
from amoeba_core.policy import ByteCostModel, PolicyParams, TPPolicy  # noqa: E402
from amoeba_core.simulator import (Hardware, ModelShape, ReplayPredictor, RooflineTime, SimConfig,  # noqa: E402
                                   Simulator)
from bench.model_shapes import DISPLAY, MODELS  # noqa: E402

# ../shared/traces beside the checkout (/work/main), or two levels up for a worktree (/work/wt/<name>)
TRACE_DIR = next((d for d in (os.path.join(os.path.dirname(ROOT), "shared", "traces"),
                              os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "traces"))
                  if os.path.isdir(d)), os.path.join(os.path.dirname(ROOT), "shared", "traces"))
TRACES = ("azure2023_code", "azure2023_conv", "mooncake_conversation", "mooncake_synthetic")
SIM_MODELS = ("qwen2.5-32b", "llama3-70b")
GPU_COUNTS = (4, 8)
UTILISATION = 0.9
BLOCK_SIZE = 16
SLO_SCALE, TTFT_FLOOR_S, TPOT_FLOOR_S = 5.0, 1.0, 0.1
ADAPTIVE = ("adaptive", "adaptive_no_handoff", "adaptive_kv_only")
DISPATCH = "fifo"


# ---- traces ------------------------------------------------------------------------------------------------------
def load_trace(name: str, trace_dir: str = TRACE_DIR, minutes: Optional[float] = None) -> List[Tuple[float, int, int]]:
    """(arrival seconds from the first request, prompt tokens, output tokens), in arrival order. Outputs of 0
    tokens (none in these files) would be served as 1."""
    path_jsonl, path_csv = os.path.join(trace_dir, name + ".jsonl"), os.path.join(trace_dir, name + ".csv")
    rows = []
    if os.path.exists(path_jsonl):
        with open(path_jsonl) as f:
            for line in f:
                r = json.loads(line)
                rows.append((r["timestamp"] / 1000.0, int(r["input_length"]), max(int(r["output_length"]), 1)))
    else:
        with open(path_csv) as f:
            for r in csv.DictReader(f):
                t = datetime.datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
                rows.append((t, int(r["ContextTokens"]), max(int(r["GeneratedTokens"]), 1)))
    rows.sort(key=lambda x: x[0])
    t0 = rows[0][0]
    rows = spread_ties([(t - t0, p, o) for t, p, o in rows])
    if minutes is not None:
        rows = [r for r in rows if r[0] < minutes * 60]
    return rows


def spread_ties(rows: List[Tuple[float, int, int]]) -> List[Tuple[float, int, int]]:
    """Requests that share a timestamp are spread evenly, in file order, over the gap to the next timestamp (the
    Mooncake conversation trace is quantised to 3 s: 12,031 requests on 1,180 distinct times; replayed as is,
    every 3 s a burst of ~10 prompts would arrive in the same instant at every load level)."""
    times = sorted({t for t, _, _ in rows})
    if len(times) == len(rows):
        return rows
    gaps = np.diff(times)
    last_gap = float(np.median(gaps)) if len(gaps) else 0.0
    nxt = {t: (times[i + 1] if i + 1 < len(times) else t + last_gap) for i, t in enumerate(times)}
    counts = Counter(t for t, _, _ in rows)
    seen: Counter = Counter()
    out = []
    for t, p, o in rows:
        k = seen[t]
        seen[t] += 1
        out.append((t + (nxt[t] - t) * k / counts[t], p, o))
    return out


# ---- the setup of one (model, GPU count) -------------------------------------------------------------------------
class Setup:
    """Capacities, serving model and cost model of one model shape on num_gpus GPUs."""

    def __init__(self, model: str, num_gpus: int, hardware: Hardware = Hardware()):
        cfg = MODELS[model]
        self.model, self.num_gpus, self.hw = model, num_gpus, hardware
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        self.layout = KVLayout("vllm_flash_attn", "NHD", cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                               head_dim, BLOCK_SIZE, "bfloat16")
        degrees = [d for d in (1, 2, 4, 8) if d <= num_gpus]
        rows = capacity_report(llama_param_specs(cfg), self.layout, hardware.memory_bytes, UTILISATION, degrees)
        self.capacity = {r.degree: r for r in rows}
        self.degrees = tuple(r.degree for r in rows if r.fits)
        if not self.degrees:
            raise SystemExit(f"{model} fits none of {degrees} on {num_gpus} GPUs")
        self.base = self.degrees[0]
        self.caps = {d: self.capacity[d].kv_blocks for d in self.degrees}
        self.caps_no_handoff = {d: self.capacity[d].kv_blocks_no_handoff for d in self.degrees}
        self.shape = ModelShape.from_config(cfg, self.layout, self.degrees)
        self.time = RooflineTime(self.shape, hardware)
        self.cost = ByteCostModel(self.shape.weight_bytes, self.shape.kv_bytes_per_token)

    def static_configs(self) -> List[List[int]]:
        """Every multiset of allowed degrees that adds up to the GPU count, largest instances first."""
        out = []

        def rec(left, max_d, acc):
            if left == 0:
                out.append(list(acc))
                return
            for d in sorted(self.degrees, reverse=True):
                if d <= max_d and d <= left:
                    rec(left - d, d, acc + [d])
        rec(self.num_gpus, self.num_gpus, [])
        return out

    def slo(self, reqs: Sequence[Tuple[float, int, int]], max_batched_tokens: int) -> Tuple[np.ndarray, np.ndarray]:
        """Per request (TTFT SLO, TPOT SLO) in seconds, from its latency alone on a base-degree instance."""
        ttft, tpot = np.empty(len(reqs)), np.empty(len(reqs))
        for i, (_, p, o) in enumerate(reqs):
            ttft[i], tpot[i] = self.request_slo(p, o, max_batched_tokens)
        return ttft, tpot

    def request_slo(self, p: int, o: int, max_batched_tokens: int = 2048) -> Tuple[float, float]:
        """(TTFT SLO, TPOT SLO) of one request of p prompt and o output tokens (the adaptive policy's predictor
        knows the SLO, as an engine given its targets does)."""
        cache = self.__dict__.setdefault("_alone", {})
        if (p, max_batched_tokens) not in cache:
            alone, off = 0.0, 0
            while off < p:
                c = min(max_batched_tokens, p - off)
                alone += self.time.step_seconds(self.base, [(off, c)], 0, 0, sampled=int(off + c == p))
                off += c
            cache[(p, max_batched_tokens)] = alone
        return (max(TTFT_FLOOR_S, SLO_SCALE * cache[(p, max_batched_tokens)]),
                max(TPOT_FLOOR_S, SLO_SCALE * self.time.step_seconds(self.base, [], 1, p + o // 2 + 1)))


def policy_name(config: Sequence[int]) -> str:
    counts = Counter(config)
    return "static:" + ",".join(f"{counts[d]}x{d}" for d in sorted(counts))


def simulate(setup: Setup, reqs, policy: str, load: float, slo, *, max_batched_tokens: int = 2048,
             timeline_interval: Optional[float] = None, policy_interval: float = 1.0,
             dispatch: Optional[str] = None):
    """One run; returns (metrics dict, SimResult). dispatch: the simulated dispatcher (default DISPATCH)."""
    dispatch = DISPATCH if dispatch is None else dispatch
    scaled = [(a / load, p, o) for a, p, o in reqs]
    cfg = SimConfig(block_size=BLOCK_SIZE, max_batched_tokens=max_batched_tokens, policy_interval=policy_interval,
                    timeline_interval=timeline_interval,
                    dispatch="fifo" if policy == "adaptive_kv_only" else dispatch)
    if policy.startswith("static:"):
        start = []
        for part in policy[len("static:"):].split(","):
            n, d = part.split("x")
            start += [int(d)] * int(n)
        sim = Simulator(sorted(start, reverse=True), setup.caps, setup.time, config=cfg)
    elif policy in ADAPTIVE:  # every adaptive variant starts at the lowest degree
        caps = setup.caps_no_handoff if policy == "adaptive_no_handoff" else setup.caps
        params = PolicyParams(setup.degrees, caps, BLOCK_SIZE)
        predictor = (None if policy == "adaptive_kv_only" else
                     ReplayPredictor(caps, setup.time, lambda p, o: setup.request_slo(p, o, max_batched_tokens), cfg))
        sim = Simulator([setup.base] * (setup.num_gpus // setup.base), caps, setup.time,
                        policy=TPPolicy(params, setup.cost, predictor), cost_model=setup.cost, config=cfg)
    else:
        raise SystemExit(f"unknown policy {policy!r}")
    wall = time.perf_counter()
    res = sim.run(scaled)
    wall = time.perf_counter() - wall
    return metrics(res, scaled, slo, wall), res


def metrics(res, reqs, slo, wall_s: float) -> dict:
    ttft_slo, tpot_slo = slo
    served = [r for r in res.requests if r.finish_time is not None]
    start = min(a for a, _, _ in reqs)
    end = max((r.finish_time for r in served), default=start)
    duration = max(end - start, 1e-9)
    ttft = np.array([r.first_token_time - r.arrival for r in served])
    tpot_pairs = [((r.finish_time - r.first_token_time) / (r.output_tokens - 1), r.request_id) for r in served
                  if r.output_tokens > 1]
    tpot = np.array([t for t, _ in tpot_pairs])
    ok = 0
    for r in served:
        i = r.request_id
        t_ok = r.first_token_time - r.arrival <= ttft_slo[i]
        p_ok = r.output_tokens == 1 or (r.finish_time - r.first_token_time) / (r.output_tokens - 1) <= tpot_slo[i]
        ok += t_ok and p_ok
    pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else None)
    done = [t for t in res.transformations if t.done_at is not None]
    return {
        "throughput_tokens_s": sum(r.prompt_tokens + r.output_tokens for r in served) / duration,
        "throughput_output_tokens_s": sum(r.output_tokens for r in served) / duration,
        "throughput_requests_s": len(served) / duration,
        "goodput_requests_s": ok / duration,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "slo_attainment": ok / max(len(reqs), 1),
        "requests": len(reqs), "served": len(served),
        "unserved": sum(1 for r in res.requests if r.unserved),
        "transformations": len(done),
        "merges": sum(1 for t in done if t.kind == "merge"),
        "splits": sum(1 for t in done if t.kind == "split"),
        "seconds_transforming": sum(t.done_at - t.started_at for t in done),
        "duration_s": duration, "sim_wall_s": wall_s,
    }


# ---- the sweep ---------------------------------------------------------------------------------------------------
def sweep(setup: Setup, trace: str, reqs, policies, slo, target: float, log, refine: int = 1,
          max_batched_tokens: int = 2048, min_load: float = 1 / 64, max_load: float = 64.0) -> List[dict]:
    """For each policy: runs at loads a factor 2 apart from 1 (up while SLO attainment >= target, down while it is
    below), then `refine` bisection steps (geometric) between the highest load meeting the target and the lowest
    one above it that does not."""
    runs = []
    for pol in policies:
        mine: Dict[float, dict] = {}

        def one(load):
            if load in mine:
                return mine[load]
            m, _ = simulate(setup, reqs, pol, load, slo, max_batched_tokens=max_batched_tokens)
            row = {"trace": trace, "model": setup.model, "num_gpus": setup.num_gpus, "policy": pol, "load": load, **m}
            mine[load] = row
            log(f"  {trace:22s} {DISPLAY[setup.model]:12s} {setup.num_gpus}GPU {pol:22s} load {load:8.4f}  "
                f"slo {m['slo_attainment']:.3f}  req/s {m['throughput_requests_s']:7.3f}  unserved {m['unserved']:4d}"
                f"  transf {m['transformations']:4d}  ({m['sim_wall_s']:.1f}s)")
            return row
        load = 1.0
        if one(load)["slo_attainment"] >= target:
            while load < max_load and one(load * 2)["slo_attainment"] >= target:
                load *= 2
        else:
            while load > min_load and one(load / 2)["slo_attainment"] < target:
                load /= 2
        for _ in range(refine):
            ok = [l for l, r in mine.items() if r["slo_attainment"] >= target]
            if not ok:
                break
            bad = [l for l, r in mine.items() if r["slo_attainment"] < target and l > max(ok)]
            if not bad:
                break
            one(round(math.sqrt(max(ok) * min(bad)), 5))
        runs.extend(mine[l] for l in sorted(mine))
    return runs


def at_slo(runs: List[dict], target: float, all_served: bool = False) -> Optional[dict]:
    """The run with the highest throughput among those meeting the SLO target (and, with all_served, leaving no
    request unserved); None if none does."""
    ok = [r for r in runs if r["slo_attainment"] >= target and (not all_served or r["unserved"] == 0)]
    return max(ok, key=lambda r: r["throughput_requests_s"]) if ok else None


def summarise(runs: List[dict], target: float, all_served: bool = False) -> List[dict]:
    """Per (trace, model, GPUs): each policy's throughput at SLO (at_slo), the best static one with hindsight,
    the static configuration of only lowest-degree instances and the one of a single instance."""
    out = []
    keys = sorted({(r["trace"], r["model"], r["num_gpus"]) for r in runs})
    for trace, model, gpus in keys:
        mine = [r for r in runs if (r["trace"], r["model"], r["num_gpus"]) == (trace, model, gpus)]
        best = {}
        for pol in sorted({r["policy"] for r in mine}):
            best[pol] = at_slo([r for r in mine if r["policy"] == pol], target, all_served)
        statics = {p: b for p, b in best.items() if p.startswith("static:")}
        ranked = sorted(((b["throughput_requests_s"] if b else 0.0, p) for p, b in statics.items()), reverse=True)
        best_static = ranked[0][1] if ranked and ranked[0][0] > 0 else None
        lowest = min(int(p.split("x")[-1]) for p in statics)             # "static:NxD": a single degree
        low = f"static:{gpus // lowest}x{lowest}"
        high = f"static:1x{gpus}" if f"static:1x{gpus}" in statics else None
        row = {"trace": trace, "model": model, "num_gpus": gpus, "slo_target": target, "all_served": all_served,
               "best_static": best_static}
        for label, pol in (("adaptive", "adaptive"), ("adaptive_no_handoff", "adaptive_no_handoff"),
                           ("adaptive_kv_only", "adaptive_kv_only"),
                           ("best_static", best_static), ("static_low", low), ("static_high", high)):
            b = best.get(pol) if pol else None   # None: never run (e.g. adaptive_kv_only in older files)
            row[label + "_policy"] = pol
            row[label + "_requests_s"] = b["throughput_requests_s"] if b else 0.0
            row[label + "_tokens_s"] = b["throughput_tokens_s"] if b else 0.0
            row[label + "_load"] = b["load"] if b else None
            row[label + "_unserved"] = b["unserved"] if b else None
        bs = row["best_static_requests_s"]
        row["adaptive_vs_best_static"] = row["adaptive_requests_s"] / bs if bs else None
        row["adaptive_no_handoff_vs_best_static"] = row["adaptive_no_handoff_requests_s"] / bs if bs else None
        row["adaptive_kv_only_vs_best_static"] = row["adaptive_kv_only_requests_s"] / bs if bs else None
        out.append(row)
    return out


def markdown_summary(summary: List[dict]) -> str:
    """The summary as a markdown table (requests/s at the SLO target; load in brackets; unserved in parentheses)."""
    def cell(s, label):
        v, load, un = s[label + "_requests_s"], s[label + "_load"], s[label + "_unserved"]
        if not v:
            return "none meets it"
        return f"{v:.3f} [{load:g}]" + (f" ({un} unserved)" if un else "")
    kv_only = any(s.get("adaptive_kv_only_requests_s") for s in summary)
    extra = " adaptive, KV rules only |" if kv_only else ""
    out = ["| trace | model | GPUs | adaptive | adaptive, no handoff |" + extra + " all lowest degree | one instance | "
           "best static (hindsight) | adaptive / best static |", "|---|---|---:|---:|---:|" + "---:|" * kv_only +
           "---:|---:|---:|---:|"]
    for s in summary:
        ratio = s["adaptive_vs_best_static"]
        extra = f" {cell(s, 'adaptive_kv_only')} |" if kv_only else ""
        out.append(f"| {s['trace']} | {DISPLAY[s['model']]} | {s['num_gpus']} | {cell(s, 'adaptive')} | "
                   f"{cell(s, 'adaptive_no_handoff')} |{extra} {s['static_low_policy']}: {cell(s, 'static_low')} | "
                   f"{s['static_high_policy']}: {cell(s, 'static_high')} | {s['best_static_policy']}: "
                   f"{cell(s, 'best_static')} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(out)


# ---- the roofline against published latencies -------------------------------------------------------------------
def roofline_check() -> List[dict]:
    """Predicted batch-1 latencies against NVIDIA's published NIM figures (docs.nvidia.com/nim/benchmarking/llm,
    Performance page, Llama-3.3-70B-Instruct, NIM 1.8.0, 2 x H100 80G, fp8 TP2, concurrency 1): 5000 input / 500
    output tokens: TTFT 406.77 ms, ITL 18.58 ms; 500 input / 2000 output: TTFT 47.77 ms, ITL 18.91 ms. The model
    is evaluated with fp8 weights (1 byte) at the fp8 dense peak (1,979 TFLOP/s) and bf16 KV; everything else is
    the defaults used in the simulations."""
    cfg = MODELS["llama3-70b"]
    layout = KVLayout("vllm_flash_attn", "NHD", cfg["num_hidden_layers"], cfg["num_key_value_heads"], 128,
                      BLOCK_SIZE, "bfloat16")
    shape = ModelShape.from_config(cfg, layout, [2], dtype="float8_e4m3fn")
    tm = RooflineTime(shape, Hardware(peak_flops=1979e12))
    out = []
    for prompt, output, ttft_ms, itl_ms in ((5000, 500, 406.77, 18.58), (500, 2000, 47.77, 18.91)):
        ttft = tm.step_seconds(2, [(0, prompt)], 0, 0, sampled=1)
        itl = tm.decode_seconds(2, 1, prompt + 1, output - 1) / (output - 1)
        out.append({"case": f"Llama-3.3-70B fp8 TP2 on 2xH100, {prompt} in / {output} out, batch 1",
                    "ttft_ms_predicted": ttft * 1e3, "ttft_ms_published": ttft_ms,
                    "itl_ms_predicted": itl * 1e3, "itl_ms_published": itl_ms})
    return out


# ---- plots -------------------------------------------------------------------------------------------------------
def plot_load(runs: List[dict], summary: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    keys = sorted({(r["model"], r["num_gpus"]) for r in runs})
    traces = [t for t in TRACES if any(r["trace"] == t for r in runs)]
    fig, axes = plt.subplots(len(keys), len(traces), figsize=(4.2 * len(traces), 3.2 * len(keys)), squeeze=False)
    for i, (model, gpus) in enumerate(keys):
        for j, trace in enumerate(traces):
            ax = axes[i][j]
            srow = next((s for s in summary if (s["trace"], s["model"], s["num_gpus"]) == (trace, model, gpus)), None)
            show = ["adaptive", "adaptive_no_handoff"]
            for p in ((srow["static_low_policy"], srow["static_high_policy"], srow["best_static_policy"])
                      if srow else ()):
                if p and p not in show:
                    show.append(p)
            for pol in show:
                mine = sorted((r for r in runs if (r["trace"], r["model"], r["num_gpus"], r["policy"]) ==
                               (trace, model, gpus, pol)), key=lambda r: r["load"])
                if not mine:
                    continue
                style = "-" if pol.startswith("adaptive") else "--"
                ax.plot([r["load"] for r in mine], [r["goodput_requests_s"] for r in mine], style, marker="o",
                        ms=3, label=pol)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_title(f"{trace}\n{DISPLAY[model]}, {gpus} GPUs", fontsize=8)
            ax.set_xlabel("load (x trace rate)", fontsize=7)
            ax.set_ylabel("requests/s within SLO", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(result, title: str, path: str, num_gpus: int, window_s: float = 3600.0) -> None:
    """GPUs per instance degree and KV use over the first window_s of the run (10 s samples)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = [s for s in result.timeline if s[0] <= window_s]
    t = np.array([s[0] for s in samples])
    degrees = sorted({d for _, insts in samples for d, _, _ in insts})
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    stacks = [[sum(d for d2, _, _ in insts if d2 == d) for _, insts in samples] for d in degrees]
    a1.stackplot(t / 60, stacks, labels=[f"GPUs in TP{d} instances" for d in degrees], step="post")
    a1.set_ylim(0, num_gpus)
    a1.set_ylabel("GPUs")
    a1.legend(fontsize=7, loc="upper right")
    a1.set_title(title, fontsize=9)
    used = [sum(u for _, u, _ in insts) / max(sum(tot for _, _, tot in insts), 1) for _, insts in samples]
    a2.plot(t / 60, used, lw=0.8)
    a2.set_ylabel("KV blocks used / total")
    a2.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    global SLO_SCALE, DISPATCH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="first 20 minutes of each trace, one refinement step")
    ap.add_argument("--json", help="write runs, summary and the roofline check here")
    ap.add_argument("--plot-prefix", help="write <prefix>_load.png and <prefix>_timeline.png")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--models", default=",".join(SIM_MODELS))
    ap.add_argument("--gpus", default=",".join(map(str, GPU_COUNTS)))
    ap.add_argument("--minutes", type=float, help="use only the first MINUTES of each trace")
    ap.add_argument("--slo-target", type=float, default=0.9)
    ap.add_argument("--refine", type=int, help="bisection steps near each policy's SLO limit (default 1 with "
                    "--quick, else 3)")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--slo-scale", type=float, default=SLO_SCALE, help="SLO = this x the request's latency alone "
                    "at the base degree (floors 1 s TTFT, 0.1 s TPOT)")
    ap.add_argument("--dispatch", choices=("fifo", "size"), default=DISPATCH, help="the simulated engine's "
                    "dispatcher for every policy but adaptive_kv_only (always fifo): fifo (default) or size-aware")
    ap.add_argument("--from-json", help="summarise and plot the runs of an earlier --json file instead of running")
    ap.add_argument("--markdown", help="write the two summary tables (all runs; runs serving every request) here")
    args = ap.parse_args(argv)
    SLO_SCALE, DISPATCH = args.slo_scale, args.dispatch
    minutes = args.minutes if args.minutes is not None else (20.0 if args.quick else None)
    refine = args.refine if args.refine is not None else (1 if args.quick else 3)
    traces = [t for t in args.traces.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    gpu_counts = [int(g) for g in args.gpus.split(",") if g]

    began = time.time()
    log = (lambda s: print(s, flush=True))
    check = roofline_check()
    for c in check:
        log(f"roofline check: {c['case']}: TTFT {c['ttft_ms_predicted']:.1f} ms (published {c['ttft_ms_published']}),"
            f" ITL {c['itl_ms_predicted']:.2f} ms (published {c['itl_ms_published']})")
    runs, setups = [], {}
    if args.from_json:
        with open(args.from_json) as f:
            runs = [r for r in json.load(f)["runs"] if r["trace"] in traces and r["model"] in models
                    and r["num_gpus"] in gpu_counts]
    for model in models:
        for gpus in gpu_counts:
            setup = setups[(model, gpus)] = Setup(model, gpus)
            if args.from_json:
                continue
            policies = list(ADAPTIVE) + [policy_name(c) for c in setup.static_configs()]
            log(f"{DISPLAY[model]} on {gpus} GPUs: degrees {setup.degrees}, KV blocks per instance "
                f"{setup.caps} (no handoff {setup.caps_no_handoff}); {len(policies)} policies")
            for trace in traces:
                reqs = load_trace(trace, minutes=minutes)
                slo = setup.slo(reqs, args.max_batched_tokens)
                runs += sweep(setup, trace, reqs, policies, slo, args.slo_target, log, refine=refine,
                              max_batched_tokens=args.max_batched_tokens)
    summary = summarise(runs, args.slo_target)
    summary_all = summarise(runs, args.slo_target, all_served=True)
    for title, rows in (("", summary), (", every request served", summary_all)):
        log(f"\nthroughput at SLO attainment >= {args.slo_target:.2f}{title} (requests/s [load] unserved)")
        for s in rows:
            ratio = s["adaptive_vs_best_static"]
            log(f"  {s['trace']:22s} {DISPLAY[s['model']]:12s} {s['num_gpus']} GPUs  adaptive "
                f"{s['adaptive_requests_s']:.3f} [{s['adaptive_load']}]  no-handoff "
                f"{s['adaptive_no_handoff_requests_s']:.3f} ({s['adaptive_no_handoff_unserved']})  kv-only "
                f"{s['adaptive_kv_only_requests_s']:.3f}  best static "
                f"{s['best_static_policy']} {s['best_static_requests_s']:.3f} [{s['best_static_load']}] "
                f"({s['best_static_unserved']})  ratio {ratio if ratio is None else round(ratio, 2)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Throughput (requests/s) at SLO attainment >= {args.slo_target}\n\n{markdown_summary(summary)}\n\n"
                    f"Same, counting only runs that serve every request\n\n{markdown_summary(summary_all)}\n")
    timeline = None
    if args.plot_prefix:
        plot_load(runs, summary, args.plot_prefix + "_load.png")
        tl_trace = "mooncake_conversation" if "mooncake_conversation" in traces else traces[0]
        tl_model, tl_gpus = models[0], gpu_counts[0]
        srow = next(s for s in summary if (s["trace"], s["model"], s["num_gpus"]) == (tl_trace, tl_model, tl_gpus))
        load = srow["adaptive_load"] or min(r["load"] for r in runs if r["trace"] == tl_trace)
        setup = setups[(tl_model, tl_gpus)]
        reqs = load_trace(tl_trace, minutes=minutes)
        _, res = simulate(setup, reqs, "adaptive", load, setup.slo(reqs, args.max_batched_tokens),
                          max_batched_tokens=args.max_batched_tokens, timeline_interval=10.0)
        timeline = {"trace": tl_trace, "model": tl_model, "num_gpus": tl_gpus, "load": load}
        plot_timeline(res, f"adaptive, {tl_trace}, {DISPLAY[tl_model]}, {tl_gpus} GPUs, load {load} (first hour)",
                      args.plot_prefix + "_timeline.png", tl_gpus)
    elapsed = time.time() - began
    log(f"\n{len(runs)} runs in {elapsed:.0f} s")
    if args.json:
        setup_info = {f"{DISPLAY[m]} {g}": {"degrees": s.degrees, "kv_blocks": s.caps,
                                             "kv_blocks_no_handoff": s.caps_no_handoff, "block_size": BLOCK_SIZE}
                      for (m, g), s in setups.items()}
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "summary_all_served": summary_all, "roofline_check": check,
                       "timeline_run": timeline,
                       "setup": {"hardware": Hardware().__dict__, "utilisation": UTILISATION, "quick": args.quick,
                                 "command": " ".join(sys.argv),
                                 "minutes": minutes, "slo": {"scale": SLO_SCALE, "ttft_floor_s": TTFT_FLOOR_S,
                                                             "tpot_floor_s": TPOT_FLOOR_S,
                                                             "target": args.slo_target},
                                 "max_batched_tokens": args.max_batched_tokens, "refine": refine,
                                 "dispatch": DISPATCH,
                                 "instances": setup_info, "seconds": elapsed}}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
