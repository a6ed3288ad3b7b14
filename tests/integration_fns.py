"""Rank functions for the engine-integration tests (module level so they pickle)."""
import torch
import torch.distributed as dist
from torch import nn

import amoeba_core as A
from amoeba_core.integration import instance_groups
from amoeba_core.kv import KVCache, KVLayout
from amoeba_core.transport import control
from amoeba_core.verify import full_weights, kv_check, kv_fill, same_bytes

import rank_fns


def _provides(mode: str, slot, rank: int) -> bool:
    if mode == "all":
        return True
    if mode == "tp0":
        return slot.tp_rank == 0
    if mode == "last":
        return slot.tp_rank == slot.degree - 1
    if mode == "none_for_instance_1":
        return slot.instance != 1 and slot.tp_rank == 0
    if mode == "two_disagree":
        return slot.tp_rank in (0, slot.degree - 1)
    if mode == "destinations_without_tables":
        return slot.tp_rank == 0
    raise ValueError(mode)


def tables_and_cache(rank, world, model, kv_args, old: A.TPConfig, new_degree, tables, cached, num_blocks, mode,
                     destinations=None):
    """Fill weights and the KV pool (live and cached blocks) with verifiable bytes; pass the instance's tables,
    destinations and cached blocks on the ranks `mode` says (None on the others); retp; check every live and
    every cached block of the new instance. Returns what the test compares, or the error."""
    specs = A.llama_param_specs(model)
    weights = rank_fns.local_shards(specs, old, rank)
    layout = KVLayout(**kv_args)
    slot = old.slot(rank)
    layers = layout.allocate(num_blocks, old.degree)
    mine, my_cache = tables[slot.instance], cached.get(slot.instance, {})
    live = sorted({b for t in mine.values() for b in t} | set(my_cache.values()))
    kv_fill(layout, layers, slot.instance, live, layout.head_range(slot.tp_rank, old.degree), seed=rank)
    provides = _provides(mode, slot, rank)
    sequences = dict(mine) if provides else None
    if mode == "two_disagree" and provides and slot.tp_rank != 0 and slot.degree > 1:
        sequences = {s: list(t)[:-1] or list(t) for s, t in mine.items()}
    dests = {s: d for s, d in (destinations or {}).items() if s in mine}
    kv = KVCache(layout, layers, sequences, destinations=dests if provides else None,
                 cached_blocks=dict(my_cache) if provides else None)
    if mode == "destinations_without_tables" and not provides:
        kv.destinations = dests or {"anything": 0}
    try:
        res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, kv=kv, scratch_bytes=1 << 14,
                     timeout_s=20)
    except A.AmoebaError as e:
        return {"error": type(e).__name__, "message": str(e)}
    heads = layout.head_range(res.slot.tp_rank, new_degree)
    origins = {s: [(i, b) for b in t] for i in tables for s, t in tables[i].items()}
    bad = kv_check(layout, res.kv.layers, res.kv.block_tables, origins, heads)
    # Cached blocks: their new id (the new instance's index) must hold the bytes of the block they came from.
    came_from = {j: (i, b) for i, m in res.kv.block_map.items() for b, j in m.items()}
    cached_tables = {("cached", k): [j] for k, j in res.kv.cached_blocks.items()}
    cached_origins = {("cached", k): [came_from[j]] for k, j in res.kv.cached_blocks.items()}
    bad_cached = kv_check(layout, res.kv.layers, cached_tables, cached_origins, heads)
    full = full_weights(specs)
    bad_w = [s.name for s in specs
             if not same_bytes(res.weights[s.name], A.shard(full[s.name], s, res.slot.tp_rank, new_degree))]
    # The extra tables exchange leaves no key behind in the group's store.
    store = dist.distributed_c10d._get_default_store()
    name = getattr(dist.group.WORLD, "group_name", "") or "default"
    call = control._CALLS[dist.group.WORLD]
    leftover = store.check([f"amoeba/{name}/{call}/tables/{rank}"])
    return {"error": None, "bad_kv": bad, "bad_cached": bad_cached, "bad_w": bad_w,
            "tables": res.kv.block_tables, "cached": res.kv.cached_blocks, "block_map": res.kv.block_map,
            "destinations": res.kv.destinations, "slots": res.config.slots, "kv_received": res.stats.kv_bytes_received,
            "plan_cached": res.plan.kv.cached, "leftover_tables_key": leftover,
            "cached_origin": {k: came_from[j] for k, j in res.kv.cached_blocks.items()}}


# ---- modules ----------------------------------------------------------------------------------------------------
def _module(specs, weights, tie: bool):
    from amoeba_core.reference.model import build_module
    module = build_module(weights, head_dim=8, rope_theta=10000.0)
    if tie:  # lm_head shares the embedding's Parameter, as HF / vLLM tie it
        module.lm_head = nn.Module()
        module.lm_head.weight = module.model.embed_tokens.weight
    for name, p in module.named_parameters():
        p.requires_grad_(name.endswith("norm.weight"))  # a mix, to see it preserved
    return module


def module_retp(rank, world, model, old: A.TPConfig, new_degree, case="ok"):
    """retp(weights=<nn.Module>): every spec'd parameter rebound as an nn.Parameter holding the new shard,
    requires_grad kept, the tied alias rebound too, the non-spec buffer untouched."""
    specs = A.llama_param_specs(model)
    weights = rank_fns.local_shards(specs, old, rank)
    tie = bool(model.get("tie_word_embeddings"))
    module = _module(specs, weights, tie)
    del weights
    if case == "unknown_parameter" and rank == 2:
        module.model.adapter = nn.Linear(2, 2)
    inv_freq = module.model.rotary_emb.inv_freq
    before_grad = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        res = A.retp(None, new_degree, config=old, specs=specs, weights=module, timeout_s=20)
    except A.AmoebaError as e:
        return {"error": type(e).__name__, "message": str(e), "failed_rank": e.failed_rank,
                "intact": all(isinstance(p, nn.Parameter) for p in module.parameters())}
    full = full_weights(specs)
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {"error": None, "bad": [], "not_parameter": [], "grad_changed": [], "not_result": []}
    for s in specs:
        p = params[s.name]
        if not same_bytes(p.detach(), A.shard(full[s.name], s, res.slot.tp_rank, new_degree)):
            out["bad"].append(s.name)
        if not isinstance(p, nn.Parameter):
            out["not_parameter"].append(s.name)
        if p.requires_grad != before_grad[s.name]:
            out["grad_changed"].append(s.name)
        if res.weights[s.name] is not p:
            out["not_result"].append(s.name)
    out["tied"] = (module.lm_head.weight is module.model.embed_tokens.weight) if tie else None
    out["buffer_untouched"] = module.model.rotary_emb.inv_freq is inv_freq
    out["shapes"] = {s.name: tuple(params[s.name].shape) for s in specs}
    return out


# ---- process groups -------------------------------------------------------------------------------------------
def gather_in_tp_order(rank, world, instances):
    """Build the instance groups of TPConfig.from_instances(instances); all_gather each rank's id over its
    instance and put the result in TP-rank order."""
    config = A.TPConfig.from_instances(instances)
    mine = instance_groups(config)
    again = instance_groups(config)  # cached: the same group object
    if mine.group is None:
        return {"ranks": mine.ranks, "gathered": [rank], "same_group": again.group is None}
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(config.degree)]
    dist.all_gather(parts, torch.tensor([rank]), group=mine.group)
    return {"ranks": mine.ranks, "raw": [int(p) for p in parts],
            "gathered": [int(p) for p in mine.to_tp_order(parts)], "tp_rank": mine.tp_rank,
            "same_group": again.group is mine.group}


def subgroup_instances(rank, world, global_ranks, degree):
    """A service group on some of the ranks (given as global ranks in group order): members get their instance
    group in TP order, the other ranks take part in creating it and get None."""
    config = A.TPConfig.contiguous(len(global_ranks), degree)
    mine = instance_groups(config, global_ranks)
    if mine is None:
        return None
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(degree)]
    dist.all_gather(parts, torch.tensor([rank]), group=mine.group)
    return {"global_ranks": mine.global_ranks, "gathered": [int(p) for p in mine.to_tp_order(parts)]}
