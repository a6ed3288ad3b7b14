"""The fuzz case run on every rank: a random model, KV layout, pool and schedule, checked against tests/independent.py
(module level so it pickles)."""
import random

import torch

import amoeba_core as A
from amoeba_core.kv import KVCache, KVLayout

import independent as I

LAYOUTS = [("vllm_flash_attn", "NHD"), ("vllm_flash_attn", "HND"), ("vllm_flashinfer", "NHD"),
           ("vllm_flashinfer", "HND"), ("sglang", "NHD")]


def fuzz_setup(seed: int, world: int):
    """Everything a case needs, derived from the seed alone (identical on every rank)."""
    rng = random.Random(seed)
    degrees = [d for d in (1, 2, 4, 8) if world % d == 0 and d <= 4]
    cfg = I.random_model(rng, degrees)
    schedule = [rng.choice(degrees) for _ in range(rng.randint(2, 4))]
    engine, order = rng.choice(LAYOUTS)
    kv = dict(engine=engine, order=order, block_size=rng.choice([1, 2, 4]),
              dtype=rng.choice(["float32", "bfloat16", "float8_e4m3fn"]), reserved=rng.randint(0, 1),
              num_blocks=rng.randint(16, 40), fill=rng.uniform(0.1, 0.45), scratch=rng.choice([1 << 13, 1 << 15]))
    tables = I.random_tables(rng, world // schedule[0], kv["num_blocks"], kv["fill"], kv["reserved"])
    return cfg, schedule, kv, tables


def fuzz_case(rank, world, seed):
    """Run the seed's schedule with retp; after every step compare every weight and every live KV head-block with
    the independent expectation. Returns a list of mismatches (empty: all bit-exact)."""
    cfg, schedule, kv, tables = fuzz_setup(seed, world)
    hf = I.hf_weights(cfg, seed)
    specs = A.llama_param_specs(cfg)
    config = A.TPConfig.contiguous(world, schedule[0])
    inst, tp = config.slots[rank]
    weights = {s.name: I.expected_shard(cfg, hf, s.name, tp, config.degree) for s in specs}
    layout = KVLayout(kv["engine"], kv["order"], cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                      cfg["head_dim"], kv["block_size"], kv["dtype"], kv["reserved"])
    dt = getattr(torch, kv["dtype"])
    layers = layout.allocate(kv["num_blocks"], config.degree)
    mine = tables[inst]
    I.fill_kv(kv["engine"], layers, sorted({b for t in mine.values() for b in t}), inst,
              I.kv_heads_of(tp, config.degree, cfg["num_key_value_heads"]), kv["block_size"], cfg["head_dim"], dt,
              noise_seed=seed * 31 + rank)
    origin = {s: [(i, b) for b in t] for i in tables for s, t in tables[i].items()}
    bad = []

    def check(step, slot, weights, layers, tables):
        for s in specs:
            if not I.same_bits(weights[s.name], I.expected_shard(cfg, hf, s.name, slot.tp_rank, slot.degree)):
                bad.append((step, "weight", s.name))
        heads = I.kv_heads_of(slot.tp_rank, slot.degree, cfg["num_key_value_heads"])
        for sid, table in tables.items():
            for pos, j in enumerate(table):
                i, b = origin[sid][pos]
                for li, layer in enumerate(layers):
                    for lh, h in enumerate(range(*heads)):
                        got = torch.stack(I.block_head(kv["engine"], layer, j, lh, kv["block_size"]))
                        want = I.kv_values(li, i, b, h, kv["block_size"], cfg["head_dim"], dt)
                        if not I.same_bits(got, want):
                            bad.append((step, "kv", sid, pos, li, h))

    for step, degree in enumerate(schedule[1:]):
        try:
            res = A.retp(None, degree, config=config, specs=specs, weights=weights,
                         kv=KVCache(layout, layers, dict(mine)), scratch_bytes=kv["scratch"], timeout_s=60)
        except A.CapacityError:
            # The sequences do not fit the new degree's pool (e.g. a merge that replicates KV heads): every rank
            # raises before anything moves. Check that nothing changed and stop here.
            check((step, "after CapacityError"), config.slot(rank), weights, layers, mine)
            return bad
        check(step, res.slot, res.weights, res.kv.layers, res.kv.block_tables)
        config, weights, layers, mine = res.config, res.weights, res.kv.layers, res.kv.block_tables
    return bad
