"""Rank functions for retp with an elastic KV pool (module level so they pickle)."""
import gc

import torch

import amoeba_core as A
from amoeba_core.elastic import ElasticKVPool, elastic_memory_stats
from amoeba_core.kv import KVCache, KVLayout
from amoeba_core.verify import full_weights, kv_check, kv_fill, same_bytes


def elastic_schedule(rank, world, model, kv_args, start_blocks, max_buffer_bytes, schedule, sequences,
                     scratch_bytes, pool_bytes=None, hold_view=False):
    """Start at contiguous(world, schedule[0]) with a pool mapping `start_blocks` blocks per rank; run retp for each
    later degree. Per step: bit-exactness of weights and KV, capacity, pool size, measured memory."""
    specs = A.llama_param_specs(model)
    full = full_weights(specs)
    config = A.TPConfig.contiguous(world, schedule[0])
    inst, tp = config.slots[rank]
    weights = {s.name: A.shard(full[s.name], s, tp, config.degree) for s in specs}
    del full
    layout = KVLayout(**kv_args)
    pool = ElasticKVPool(layout, max_buffer_bytes)
    pool.resize(pool.bytes_for_blocks(start_blocks, config.degree))
    layers = pool.layers(start_blocks, config.degree)
    mine = sequences[inst]
    kv_fill(layout, layers, inst, sorted({b for t in mine.values() for b in t}), layout.head_range(tp, config.degree),
            seed=rank)
    del layers
    origins = {s: [(i, b) for b in t] for i in sequences for s, t in sequences[i].items()}
    tables, records = dict(mine), []
    held = pool.layers(start_blocks, config.degree) if hold_view else None
    for degree in schedule[1:]:
        mapped_before = pool.mapped_bytes
        gc.collect()
        try:
            res = A.retp(None, degree, config=config, specs=specs, weights=weights,
                         kv=KVCache(layout, pool=pool, sequences=tables), scratch_bytes=scratch_bytes,
                         kv_pool_bytes=pool_bytes)
        except A.AmoebaError as e:
            records.append({"error": type(e).__name__, "message": str(e), "mapped_after": pool.mapped_bytes,
                            "mapped_before": mapped_before})
            break
        slot = res.slot
        ref = full_weights(specs)
        bad_w = [s.name for s in specs if not same_bytes(res.weights[s.name],
                                                         A.shard(ref[s.name], s, slot.tp_rank, degree))]
        del ref
        bad_kv = kv_check(layout, res.kv.layers, res.kv.block_tables, origins,
                          layout.head_range(slot.tp_rank, degree))
        st = res.stats
        records.append({"from": config.degree, "to": degree, "bad_w": bad_w, "bad_kv": bad_kv,
                        "capacity": dict(res.kv.capacity), "mapped_before": mapped_before,
                        "mapped_after": pool.mapped_bytes, "measured": dict(st.measured_memory_bytes),
                        "measured_extra": st.measured_peak_extra_bytes, "scratch": scratch_bytes,
                        "weight_bytes": sum(t.numel() * t.element_size() for t in res.weights.values()),
                        "storage_bytes": sum(t.untyped_storage().nbytes() for t in res.weights.values()),
                        "elastic_stats": elastic_memory_stats("cpu")})
        config, weights, tables = res.config, res.weights, res.kv.block_tables
        del res  # its views lease the pool: a later split must be free to unmap the tail
    del held
    return records


def fixed_buffer_round_trip(rank, world, model, kv_args, num_blocks, schedule, sequences):
    """Plain (non-elastic) buffers passed back as KVResult.buffers: the block count at each degree is what the bytes
    hold, so a round trip loses nothing. Returns the block count after each step."""
    specs = A.llama_param_specs(model)
    full = full_weights(specs)
    config = A.TPConfig.contiguous(world, schedule[0])
    inst, tp = config.slots[rank]
    weights = {s.name: A.shard(full[s.name], s, tp, config.degree) for s in specs}
    layout = KVLayout(**kv_args)
    layers = layout.allocate(num_blocks, config.degree)
    mine = sequences[inst]
    kv_fill(layout, layers, inst, sorted({b for t in mine.values() for b in t}), layout.head_range(tp, config.degree),
            seed=rank)
    origins = {s: [(i, b) for b in t] for i in sequences for s, t in sequences[i].items()}
    kv = KVCache(layout, layers, dict(mine))
    blocks, bad = [kv.current_blocks(config.degree)], []
    for degree in schedule[1:]:
        res = A.retp(None, degree, config=config, specs=specs, weights=weights, kv=kv, scratch_bytes=1 << 16)
        bad += kv_check(layout, res.kv.layers, res.kv.block_tables, origins, layout.head_range(res.slot.tp_rank, degree))
        blocks.append(res.kv.num_blocks)
        config, weights = res.config, res.weights
        kv = KVCache(layout, buffers=res.kv.buffers, num_blocks=res.kv.num_blocks, sequences=res.kv.block_tables)
    return blocks, bad


def split_with_resident_pool(rank, world, model, kv_args, start_blocks, sequences, scratch):
    """Elastic split 1x2 -> 2x1 with every page of the pool resident (touched before the call), so that resident
    memory sees what is mapped. Returns the measured footprint and the weights' predicted overshoot."""
    import ctypes
    import gc
    from amoeba_core.elastic import ElasticKVPool
    from amoeba_core.kv import KVCache, KVLayout
    from amoeba_core.planning.weight_program import build_weight_program, storage_overshoot_bytes
    specs = A.llama_param_specs(model)
    full = full_weights(specs)
    config = A.TPConfig.contiguous(world, 2)
    inst, tp = config.slots[rank]
    weights = {s.name: A.shard(full[s.name], s, tp, 2) for s in specs}
    del full
    layout = KVLayout(**kv_args)
    pool = ElasticKVPool(layout, 64 << 20)
    pool.resize(pool.bytes_for_blocks(start_blocks, 2))
    for layer in pool.buffers():
        for b in layer:
            b.fill_(1)
        del b
    del layer
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    res = A.retp(None, 1, config=config, specs=specs, weights=weights,
                 kv=KVCache(layout, pool=pool, sequences=dict(sequences[inst])), scratch_bytes=scratch)
    overshoot = storage_overshoot_bytes(res.plan, build_weight_program(res.plan, rank), release_storage=True)
    return {"memory": dict(res.stats.measured_memory_bytes), "overshoot": overshoot,
            "phases": {"weights": res.stats.measured_weight_peak_extra_bytes,
                       "kv": res.stats.measured_kv_peak_extra_bytes}, "seconds": res.stats.seconds}
