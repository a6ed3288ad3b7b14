"""KV tokens per instance at TP 1/2/4/8, with and without the memory handoff (issue 10, item 3). No GPU needed.

    python bench/capacity_table.py --json bench/capacity.json

Model shapes from the public HF configs (bench/model_shapes.py), bf16 weights and KV cache, vLLM FlashAttention
layout (block 16; the block count per layer buffer is rounded down), on "80 GB" H100s: 81,559 MiB (what nvidia-smi
reports) x 0.90 utilisation, nothing else reserved. Without the handoff a merged instance's pool keeps the bytes it
had at the base degree (the smallest degree the weights fit); with it, each GPU's pool is everything the weights at
that degree leave (amoeba_core.capacity).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

from amoeba_core import llama_param_specs  # noqa: E402
from amoeba_core.capacity import H100_80GB_MEMORY_BYTES, capacity_report  # noqa: E402
from amoeba_core.layout.kv import KVLayout  # noqa: E402
from bench.model_shapes import DISPLAY, MODELS  # noqa: E402


def table(memory_bytes: int = H100_80GB_MEMORY_BYTES, utilisation: float = 0.9, degrees=(1, 2, 4, 8),
          block_size: int = 16) -> list:
    rows = []
    for key, cfg in MODELS.items():
        layout = KVLayout("vllm_flash_attn", "NHD", cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                          cfg["hidden_size"] // cfg["num_attention_heads"], block_size, "bfloat16")
        for r in capacity_report(llama_param_specs(cfg), layout, memory_bytes, utilisation, degrees):
            rows.append({"model": DISPLAY[key], **r.to_dict()})
    return rows


def fmt_tokens(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def markdown(rows) -> str:
    out = ["| model | TP | weights / GPU | KV / token / GPU | KV pool / GPU (handoff) | tokens / instance, no "
           "handoff | tokens / instance, handoff | handoff gain |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['model']} | {r['degree']} | {r['weight_bytes'] / 1e9:.1f} GB | "
                       f"{r['kv_bytes_per_token'] / 1024:.0f} KiB | weights do not fit | - | - | - |"
                       if r["status"] == "weights_do_not_fit" else
                       f"| {r['model']} | {r['degree']} | invalid degree | | | | | |")
            continue
        nh, h = r["kv_tokens_per_instance_no_handoff"], r["kv_tokens_per_instance"]
        gain = f"{h / nh:.1f}x" if nh else "-"
        out.append(f"| {r['model']} | {r['degree']} | {r['weight_bytes'] / 1e9:.1f} GB | "
                   f"{r['kv_bytes_per_token'] / 1024:.0f} KiB | {r['kv_pool_bytes'] / 1e9:.1f} GB | "
                   f"{fmt_tokens(nh)} | {fmt_tokens(h)} | {gain} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--memory-mib", type=int, default=H100_80GB_MEMORY_BYTES >> 20)
    ap.add_argument("--utilisation", type=float, default=0.9)
    args = ap.parse_args(argv)
    rows = table(args.memory_mib << 20, args.utilisation)
    print(f"{args.memory_mib} MiB per GPU x {args.utilisation} utilisation = "
          f"{int((args.memory_mib << 20) * args.utilisation) / 1e9:.2f} GB for weights + KV; bf16; block 16\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory_bytes": args.memory_mib << 20, "utilisation": args.utilisation, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
