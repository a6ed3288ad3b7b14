"""retp with an elastic KV pool: a merge turns the weight memory it frees into KV blocks, a split takes it back,
every byte stays exact, and the measured footprint never exceeds max(before, after) + the scratch budget."""
import pytest

import amoeba_core as A
from amoeba_core.capacity import weight_bytes_per_gpu
from amoeba_core.demo import MEASUREMENT_ALLOWANCE
from amoeba_core.kv import KVLayout
from amoeba_core.verify import random_sequences

import elastic_fns
from models import GQA

WORLD = 4
MODEL = dict(GQA, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048,
             num_hidden_layers=2, vocab_size=1000)     # about 12 MiB of fp32 weights per rank at TP1
KV = dict(engine="vllm_flash_attn", order="NHD", num_layers=2, num_kv_heads=4, head_dim=32, block_size=16,
          dtype="float32")                             # 16 KiB per block and buffer at TP1
START_BLOCKS = 64                                      # 1 MiB per buffer, 2 MiB per rank at TP1
MAX_BUFFER = 16 << 20
SCRATCH = 1 << 20
PAGE = 4096  # the elastic pool's granularity on CPU


def run(pools, schedule, sequences, **kw):
    return pools(WORLD).run(elastic_fns.elastic_schedule, MODEL, KV, START_BLOCKS, MAX_BUFFER, schedule, sequences,
                            SCRATCH, **kw)


def check_exact_and_bounded(results):
    for rank, records in enumerate(results):
        for r in records:
            assert "error" not in r, (rank, r)
            assert r["bad_w"] == [] and r["bad_kv"] == [], (rank, r["from"], r["to"], r["bad_w"][:3], r["bad_kv"][:3])
            m = r["measured"]
            assert m["peak"] <= max(m["before"], m["after"]) + r["scratch"] + MEASUREMENT_ALLOWANCE, (rank, r)


def test_merge_hands_freed_weight_memory_to_the_kv_pool_and_split_takes_it_back(pools):
    layout = KVLayout(**KV)
    specs = A.llama_param_specs(MODEL)
    seqs = random_sequences(WORLD, START_BLOCKS, 0.6, seed=3)
    results = run(pools, [1, 4, 1], seqs)
    check_exact_and_bounded(results)
    freed = weight_bytes_per_gpu(specs, 1) - weight_bytes_per_gpu(specs, 4)
    per_buffer = freed // (layout.num_layers * layout.num_buffers)
    for records in results:
        merge, split = records
        # The merge maps the freed weight bytes into the pool (rounded down to a page), and the merged instance
        # holds that many more blocks than the same pool re-cut without the handoff.
        grown = merge["capacity"]["new_buffer_bytes"] - merge["capacity"]["old_buffer_bytes"]
        assert per_buffer - PAGE < grown <= per_buffer, (grown, per_buffer)
        gained = merge["capacity"]["new_blocks"] - merge["capacity"]["no_handoff_blocks"]
        assert gained == (merge["capacity"]["new_buffer_bytes"] // layout.region_bytes(4) // 2
                          - merge["capacity"]["old_buffer_bytes"] // layout.region_bytes(4) // 2)
        assert merge["capacity"]["new_tokens"] > 4 * merge["capacity"]["old_tokens"]
        assert merge["mapped_after"] - merge["mapped_before"] == merge["capacity"]["mapped_bytes"] > 0
        # The merged shards own exactly their bytes (the freed storage really went back).
        assert merge["storage_bytes"] == merge["weight_bytes"]
        # The split gives the bytes back to the weights: the pool is where it started (or below, by page rounding).
        assert split["mapped_after"] <= merge["mapped_before"] and split["capacity"]["unmapped_bytes"] > 0
        assert split["elastic_stats"]["mapped_bytes"] == split["mapped_after"]


def test_merge_split_merge_keeps_every_byte(pools):
    seqs = random_sequences(2, START_BLOCKS, 0.5, seed=5)
    check_exact_and_bounded(run(pools, [2, 4, 2, 4], seqs))


def test_split_that_does_not_fit_raises_before_anything_moves(pools):
    """After a merge fills the larger pool, a split cannot give the weights their bytes back: CapacityError on every
    rank, the pool keeps its size."""
    # The merged instance's sequences need more blocks than any TP1 pool can hold after the handoff.
    seqs = {0: {s: list(range(i * 40, i * 40 + 40)) for i, s in enumerate(range(10))}}
    results = pools(WORLD).run(elastic_fns.elastic_schedule, MODEL, KV, 400, MAX_BUFFER, [4, 1], seqs, SCRATCH)
    for records in results:
        r = records[-1]
        assert r["error"] == "CapacityError" and "needs" in r["message"], r
        assert r["mapped_after"] == r["mapped_before"]


def test_split_refused_while_the_caller_holds_views_of_the_tail(pools):
    seqs = random_sequences(1, 1600, 0.02, seed=7)
    results = pools(WORLD).run(elastic_fns.elastic_schedule, MODEL, KV, 1600, MAX_BUFFER, [4, 1], seqs, SCRATCH,
                               hold_view=True)
    for records in results:
        r = records[-1]
        assert r["error"] == "ConfigError" and "drop every view" in r["message"], r
        assert r["mapped_after"] == r["mapped_before"]


def test_plain_buffers_lose_no_capacity_on_a_round_trip(pools):
    """7 blocks at TP2 are 3 at TP1 (rounded down) and 7 again back at TP2, in every layout: KVResult.buffers carries
    every byte of the pool to the next call."""
    for engine, order in [("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "HND"), ("sglang", "NHD")]:
        kv = dict(KV, engine=engine, order=order)
        seqs = {0: {0: [1, 2]}, 1: {1: [0]}}
        for blocks, bad in pools(WORLD).run(elastic_fns.fixed_buffer_round_trip, MODEL, kv, 7, [2, 1, 2], seqs):
            assert blocks == [7, 3, 7] and bad == [], (engine, order, blocks, bad[:3])


def test_a_split_holds_back_pool_tail_while_its_weights_grow(pools):
    """A split's weights peak above their final size (each larger shard is allocated while its old one is alive:
    here ~10 MiB for a wide MLP). With room at the pool's tail, retp keeps that much more unmapped until the weights
    are done, so the measured footprint (every pool page resident) stays within max(before, after) + scratch."""
    model = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=8192,
                 num_hidden_layers=1, vocab_size=1000)
    kv = dict(engine="vllm_flash_attn", order="NHD", num_layers=1, num_kv_heads=4, head_dim=32, block_size=16,
              dtype="float32")
    scratch = 1 << 20
    seqs = random_sequences(1, 6000, 0.002, seed=3)
    for rank, r in enumerate(pools(2).run(elastic_fns.split_with_resident_pool, model, kv, 6000, seqs, scratch)):
        m = r["memory"]
        assert r["overshoot"] > 4 * (1 << 20), "the case must overshoot more than the allowance to mean anything"
        assert m["peak"] <= max(m["before"], m["after"]) + scratch + (2 << 20), (rank, m, r["overshoot"])
