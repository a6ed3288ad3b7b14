"""Rank functions and data generators for the KV tests (module level so they pickle)."""
import contextlib

import torch

import amoeba_core as A
from amoeba_core.kv import KVCache, KVLayout
from amoeba_core.verify import kv_check, kv_fill, random_sequences, same_bytes

import rank_fns
from rank_fns import RssSampler


make_sequences = random_sequences


from amoeba_core.planning.kv_program import build_kv_program  # noqa: E402
from amoeba_core.planning.weight_program import build_weight_program  # noqa: E402


def kv_transition(rank, world, model, layout: KVLayout, num_blocks, old: A.TPConfig, new_degree, sequences,
                  scratch_bytes, destinations=None, device="cpu", new_block_tables=None, sample_rss=False,
                  specs=None, transport=None):
    """Fill weights and the KV pool with verifiable bytes, retp, and check every live block and weight (specs:
    default llama_param_specs(model))."""
    specs = specs if specs is not None else A.llama_param_specs(model)
    weights = rank_fns.local_shards(specs, old, rank, device=device)
    inst, tp = old.slots[rank]
    layers = layout.allocate(num_blocks, old.degree, device=device)
    mine = sequences[inst]
    kv_fill(layout, layers, inst, sorted({b for t in mine.values() for b in t}), layout.head_range(tp, old.degree),
            seed=rank)
    chosen = None if new_block_tables is None else {s: t for s, t in new_block_tables.items() if s in mine}
    kv = KVCache(layout, layers, mine, destinations=destinations, new_block_tables=chosen)
    storage = [b.data_ptr() for b in layout.buffers(layers[0])]
    sampler = RssSampler() if sample_rss else None
    with sampler or contextlib.nullcontext():
        res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, kv=kv, scratch_bytes=scratch_bytes,
                     transport=transport)
    origins = {s: [(i, b) for b in t] for i in sequences for s, t in sequences[i].items()}
    bad = kv_check(layout, res.kv.layers, res.kv.block_tables, origins, layout.head_range(res.slot.tp_rank, new_degree))
    from amoeba_core.verify import full_weights
    full = full_weights(specs)
    bad_w = [s.name for s in specs
             if not same_bytes(res.weights[s.name], A.shard(full[s.name], s, res.slot.tp_rank, new_degree))]
    return {"bad_kv": bad, "bad_w": bad_w, "kv_received": res.stats.kv_bytes_received,
            "kv_planned": int(res.plan.kv.received[rank]),
            "kv_tracked": res.stats.kv_peak_extra_bytes, "kv_measured": res.stats.measured_kv_peak_extra_bytes,
            "measured": res.stats.measured_peak_extra_bytes, "tracked": res.stats.peak_extra_bytes,
            "rss_sampled": sampler.peak_extra if sampler else None, "tables": res.kv.block_tables, "destinations": res.kv.destinations,
            "slots": res.config.slots, "in_place": [b.data_ptr() for b in layout.buffers(res.kv.layers[0])] == storage,
            "num_blocks": res.kv.num_blocks, "parked": int((res.plan.kv.move_park >= 0).sum()),
            "rounds": len(res.plan.kv.rounds), "moves": res.plan.kv.num_moves,
            "method": res.stats.memory_measurement, "transport": res.stats.transport,
            "scratch_allocated": res.stats.scratch_allocated_bytes,
            "kv_scratch": build_kv_program(res.plan, rank, pull=res.stats.transport == "samehost").scratch_bytes,
            "weight_scratch": build_weight_program(res.plan, rank,
                                                   pull=res.stats.transport == "samehost").scratch_bytes}


def kv_overflow(rank, world, model, layout, num_blocks, old, new_degree, sequences):
    """retp must raise CapacityError before touching anything: compare every byte of the pool and the weights."""
    specs = A.llama_param_specs(model)
    weights = rank_fns.local_shards(specs, old, rank)
    inst, tp = old.slots[rank]
    layers = layout.allocate(num_blocks, old.degree)
    kv_fill(layout, layers, inst, sorted({b for t in sequences[inst].values() for b in t}),
            layout.head_range(tp, old.degree), seed=rank)
    before = [[b.clone() for b in layout.buffers(layer)] for layer in layers]
    w_before = {k: v.clone() for k, v in weights.items()}
    try:
        A.retp(None, new_degree, config=old, specs=specs, weights=weights,
               kv=KVCache(layout, layers, sequences[inst]))
    except A.CapacityError as e:
        unchanged = all(torch.equal(a, b) for la, lb in zip(before, layers) for a, b in zip(la, layout.buffers(lb)))
        unchanged = unchanged and all(same_bytes(w_before[k], weights[k]) for k in weights)
        return str(e), unchanged
    return None, None
