"""retp on CUDA tensors (marked gpu; skipped without a GPU).

Path used: several processes share the one GPU (NCCL refuses two ranks on one device), so these tests run a gloo
group whose CUDA buffers are staged through pinned host memory (`stage_via_host`, chosen automatically for a gloo
group holding CUDA tensors). The copies, the in-place KV relayout and the weight compaction run on the GPU with the
CUDA byte engine; memory is checked against the CUDA caching allocator's peak.
"""
import pytest
import torch

import amoeba_core as A
from amoeba_core import _C
from amoeba_core.kv import KVLayout

import kv_fns
import rank_fns
from models import GQA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(_C, "cuda_compiled", False)),
    reason="needs a CUDA device and the CUDA engine")]


@pytest.mark.parametrize("world", [2, 4])
def test_weights_on_cuda_bit_exact(pools, world):
    specs = A.llama_param_specs(GQA, dtype="bfloat16")
    for t0, t1 in [(1, world), (world, 1), (2, 1), (1, 2)]:
        scratch = 1 << 16
        results = pools(world).run(rank_fns.retp_weights_and_check, specs, A.TPConfig.contiguous(world, t0), t1,
                                   scratch, None, "cuda")
        for r in results:
            assert r["bad"] == [] and r["on_device"] and r["received"] == r["planned_received"]
            # Measured by the CUDA caching allocator (deltas, the engine's statistics untouched).
            assert r["method"].startswith("cuda_allocator"), r["method"]
            assert r["measured"] <= r["largest"] + scratch + (1 << 20), r  # allocator rounding


@pytest.mark.parametrize("engine, order", [("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "HND"),
                                           ("sglang", "NHD")])
def test_kv_on_cuda_in_place(pools, engine, order):
    model = dict(GQA, num_key_value_heads=4)
    layout = KVLayout(engine, order, 2, 4, 64, 16, "bfloat16")
    for t0, t1 in [(1, 4), (4, 1), (2, 4), (4, 2)]:
        seqs = kv_fns.make_sequences(4 // t0, 64, 0.85 if t1 >= t0 else 0.4, seed=t0 + t1)
        scratch = 1 << 16
        results = pools(4).run(kv_fns.kv_transition, model, layout, 64, A.TPConfig.contiguous(4, t0), t1, seqs,
                               scratch, device="cuda")
        for r in results:
            assert r["bad_kv"] == [] and r["bad_w"] == [] and r["in_place"]
            assert r["kv_received"] == r["kv_planned"]
            assert r["kv_measured"] <= scratch + (1 << 20), r["kv_measured"]  # allocator rounding


def test_single_rank_nccl_group_runs_retp():
    """World 1 over NCCL: the NCCL code path (no host staging) with a trivial exchange."""
    from amoeba_core.launch import RankPool
    with RankPool(1, backend="nccl") as pool:
        out = pool.run(rank_fns.retp_weights_and_check, A.llama_param_specs(GQA), A.TPConfig.contiguous(1, 1), 1,
                       1 << 16, None, "cuda")
    assert out[0]["bad"] == []


# ---- the same-host transport on one GPU: processes read each other's buffers through CUDA IPC -----------------
@pytest.mark.parametrize("world", [2, 4])
def test_samehost_weights_on_one_gpu_bit_exact(pools, world):
    """Several processes on the one GPU, transport="samehost": each opens its peers' shards through CUDA IPC and its
    box kernel reads them in place (no NCCL, no host staging, no scratch for the weights)."""
    specs = A.llama_param_specs(GQA, dtype="bfloat16")
    for t0, t1 in [(1, world), (world, 1), (2, 1), (1, 2)]:
        results = pools(world).run(rank_fns.retp_weights_and_check, specs, A.TPConfig.contiguous(world, t0), t1,
                                   1 << 16, None, "cuda", "samehost")
        for r in results:
            assert r["transport"] == "samehost" and r["bad"] == [] and r["on_device"]
            assert r["received"] == r["planned_received"]
            assert r["measured"] <= r["largest"] + (1 << 20), r  # nothing staged: the largest new shard + rounding


@pytest.mark.parametrize("engine, order", [("vllm_flash_attn", "NHD"), ("sglang", "NHD")])
def test_samehost_kv_on_one_gpu_in_place(pools, engine, order):
    model = dict(GQA, num_key_value_heads=4)
    layout = KVLayout(engine, order, 2, 4, 64, 16, "bfloat16")
    for t0, t1 in [(1, 4), (4, 1), (2, 4), (4, 2)]:
        seqs = kv_fns.make_sequences(4 // t0, 64, 0.85 if t1 >= t0 else 0.4, seed=t0 + t1)
        results = pools(4).run(kv_fns.kv_transition, model, layout, 64, A.TPConfig.contiguous(4, t0), t1, seqs,
                               1 << 16, device="cuda", transport="samehost")
        for r in results:
            assert r["transport"] == "samehost" and r["bad_kv"] == [] and r["bad_w"] == [] and r["in_place"]
            assert r["kv_received"] == r["kv_planned"]
