"""Profile single retp calls of one transition on every rank: phase times of each repetition and, optionally, a
cProfile of one repetition per rank (the fixed per-call cost of a merge is what this looks at).

    python bench/merge_profile.py --old 4x1 --new 2 --transport samehost --reps 5 --profile /tmp/prof

Same model and KV state as bench/retp_bench.py (Llama-3-8B dims, 2 layers, tied vocab, bf16, 1024 blocks at degree
1, fill 0.45). Prints, per repetition, the slowest rank's wall time and its phases; with --profile, writes
<prefix>.<rank>.txt (cumulative and total-time listings of the last repetition).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch.distributed as dist  # noqa: E402

import amoeba_core as A  # noqa: E402
from amoeba_core.config import TPConfig  # noqa: E402
from amoeba_core.kv import KVCache  # noqa: E402
from amoeba_core.launch import RankPool  # noqa: E402

from bench import baselines as B  # noqa: E402
from bench import retp_bench as RB  # noqa: E402


_EVENTS: list = []


def _wrap(owner, name: str, label=None) -> None:
    """Record (label, start, end) of every call of owner.name in _EVENTS (perf_counter: CLOCK_MONOTONIC, the same
    clock in every process)."""
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            lab = label or name
            if name == "exchange" and len(args) > 1:
                lab = f"exchange:{args[1]}"
            _EVENTS.append((lab, t0, time.perf_counter()))
    setattr(owner, name, timed)


def _instrument() -> None:
    from amoeba_core import api
    from amoeba_core.execution import executor, memory
    from amoeba_core.transport import control, samehost
    if getattr(api, "_profiled", False):
        return
    api._profiled = True
    for name in ("validate", "make_plan", "prepare", "fetch_tables"):
        _wrap(api._Call, name)
    _wrap(api, "build_weight_program")
    _wrap(api, "build_kv_program")
    _wrap(control.ControlChannel, "exchange")
    _wrap(control.ControlChannel, "decide")
    _wrap(executor.Executor, "run_weights")
    _wrap(executor.Executor, "run_kv")
    _wrap(executor.Executor, "copy", "kv_copy")
    _wrap(samehost.SameHostTransport, "pull")
    _wrap(samehost.SameHostTransport, "_wait")
    _wrap(memory, "_reset_rss_peak")


def rank_profile(rank: int, world: int, c: dict) -> dict:
    if c["timeline"]:
        _instrument()
    st = RB._state(c)
    specs = A.llama_param_specs(c["model"], dtype=c["dtype"])
    layout = RB._layout(c)
    old = TPConfig.from_instances(c["old"])
    o = old.slot(rank)
    seqs = RB._sequences(c, old)
    n_old = RB._pool_blocks(layout, c["num_blocks"], old.degree)
    out = []
    text = None
    for rep in range(c["reps"]):
        tables = {s: list(t) for s, t in seqs[o.instance].items()}
        weights = B.build_weights(st["model"], specs, o.tp_rank, o.degree)
        layers = B.build_kv(layout, n_old, old.degree, o.tp_rank, o.instance, tables, "cpu")
        dist.barrier()
        _EVENTS.clear()
        prof = cProfile.Profile() if c["profile"] and rep == c["reps"] - 1 else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        res = A.retp(None, c["new_degree"], config=old, specs=specs, weights=weights,
                     kv=KVCache(layout, layers, tables), scratch_bytes=c["scratch_bytes"], transport=c["transport"],
                     measure_memory=c["measure"])
        if prof:
            prof.disable()
        t1 = time.perf_counter()
        out.append(dict(res.stats.seconds, wall=t1 - t0, t0=t0, events=list(_EVENTS)))
        if prof:
            s = io.StringIO()
            ps = pstats.Stats(prof, stream=s)
            ps.sort_stats("cumulative").print_stats(60)
            ps.sort_stats("tottime").print_stats(40)
            text = s.getvalue()
        del res, weights, layers
        dist.barrier()
    return {"reps": out, "profile": text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="4x1", help="starting configuration NxD")
    p.add_argument("--new", type=int, default=2, help="new degree")
    p.add_argument("--transport", default="samehost")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--profile", metavar="PREFIX", help="cProfile the last repetition, write PREFIX.<rank>.txt")
    p.add_argument("--timeline", action="store_true", help="print every rank's timeline of the last repetition")
    p.add_argument("--no-measure", action="store_true", help="measure_memory=False")
    args = p.parse_args(argv)
    n, d = (int(x) for x in args.old.split("x"))
    world = n * d
    model = dict(RB.PRESETS["llama3-8b"], num_hidden_layers=args.layers, tie_word_embeddings=True)
    c = dict(model=model, dtype="bfloat16", device="cpu", head_dim=128, block_size=16, num_blocks=1024, fill=0.45,
             seed=0, index=0, scratch_bytes=64 << 20, old=[list(r) for r in TPConfig.contiguous(world, d).instances()],
             new_degree=args.new, transport=args.transport, reps=args.reps, profile=bool(args.profile),
             measure=not args.no_measure, timeline=args.timeline)
    if args.old == "2x2" and args.new == 4:
        c["index"] = 1  # the bench's second transition (same sequences as retp_bench's 2x2->1x4)
    with RankPool(world, timeout_s=600) as pool:
        per_rank = pool.run(rank_profile, c)
    keys = list(per_rank[0]["reps"][0])
    for i in range(args.reps):
        recs = [r["reps"][i] for r in per_rank]
        slow = max(recs, key=lambda r: r["wall"])
        print(f"rep {i}: wall {slow['wall']:.4f} | " + " ".join(f"{k} {slow[k]:.4f}" for k in keys
                                                                  if k not in ("wall", "t0", "events")))
    walls = [max(r["reps"][i]["wall"] for r in per_rank) for i in range(1, args.reps)]
    if walls:
        print(f"median wall (reps 1..): {statistics.median(walls):.4f}")
    if args.timeline:
        start = min(r["reps"][-1]["t0"] for r in per_rank)
        for r, rec in enumerate(per_rank):
            last = rec["reps"][-1]
            print(f"rank {r}: starts at {1e3 * (last['t0'] - start):.1f} ms, ends at "
                  f"{1e3 * (last['t0'] + last['wall'] - start):.1f} ms")
            merged = {}
            for lab, a, b in last["events"]:
                if lab in ("kv_copy", "pull", "_wait", "_reset_rss_peak"):
                    m = merged.setdefault(lab, [a, b, 0.0, 0])
                    m[1], m[2], m[3] = b, m[2] + b - a, m[3] + 1
                    continue
                print(f"   {lab:<22} {1e3 * (a - start):8.1f} -> {1e3 * (b - start):8.1f}  ({1e3 * (b - a):.1f} ms)")
            for lab, (a, b, tot, n) in merged.items():
                print(f"   {lab:<22} {1e3 * (a - start):8.1f} -> {1e3 * (b - start):8.1f}  ({n} calls, "
                      f"{1e3 * tot:.1f} ms in them)")
    if args.profile:
        for r, rec in enumerate(per_rank):
            with open(f"{args.profile}.{r}.txt", "w") as f:
                f.write(rec["profile"] or "")
        print(f"wrote {args.profile}.<rank>.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
