"""run_generation: a TP service generating tokens while its degree changes under it, with every move verified."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import failpoints
from ..config import TPConfig
from ..errors import CapacityError, ConfigError, RetpFailure
from ..layout import model_param_specs, shard
from ..verify import same_bytes
from .checkpoint import _dtype, convert_full, dtype_name, fuse_hf_tensors, load_hf_checkpoint, random_hf_tensors
from .families import kv_layout_for
from .model import SeqState, TPEngine, kv_pools


def load_model(model_dir: Optional[str], config: Optional[Mapping], seed: int, dtype) -> Tuple[dict, dict]:
    """(hf config with torch_dtype = dtype, full fused tensors in dtype) from a checkpoint directory, or from
    random_hf_tensors(config, seed) (the same tensors write_random_checkpoint(dir, config, seed) would store)."""
    if model_dir is not None:
        return load_hf_checkpoint(model_dir, dtype)
    if config is None:
        raise ConfigError("give model_dir or config")
    config = dict(config)
    full = fuse_hf_tensors(config, random_hf_tensors(config, seed))
    dt = _dtype(dtype) or next(iter(full.values())).dtype
    return dict(config, torch_dtype=dtype_name(dt)), convert_full(full, dt)


def transition_steps(num_transitions: int, max_new_tokens: int) -> List[int]:
    """Step indices (>= 1: after the prefill) before which transition k = 0, 1, ... runs, spread evenly."""
    return [max(1, math.floor((k + 1) * max_new_tokens / (num_transitions + 1) + 0.5))
            for k in range(num_transitions)]


def _kv_snapshot(engine: TPEngine) -> Dict[tuple, torch.Tensor]:
    """(seq, block position, layer, global KV head) -> (components, valid tokens, d) bytes of this rank's live
    blocks (components: K and V, or MLA's latent); ("cached", instance, content hash, layer, head) -> the same for
    every block of its instance's prefix cache (full blocks)."""
    L, out = engine.layout, {}
    h0, h1 = L.head_range(engine.slot.tp_rank, engine.slot.degree)
    for key, b in engine.blocks.index.items():
        for li, layer in enumerate(engine.layers):
            pools = kv_pools(L, layer)
            for h in range(h0, h1):
                out[("cached", engine.slot.instance, key, li, h)] = torch.stack([P[b, :, h - h0] for P in pools]).clone()
    for s, table in engine.tables.items():
        n = engine.seqs[s].kv_len
        for pos, b in enumerate(table):
            valid = min(L.block_size, n - pos * L.block_size)
            for li, layer in enumerate(engine.layers):
                pools = kv_pools(L, layer)  # K and V, or MLA's latent
                for h in range(h0, h1):
                    out[(s, pos, li, h)] = torch.stack([P[b, :valid, h - h0] for P in pools]).clone()
    return out


def _check_kv(engine: TPEngine, expected: Dict[tuple, torch.Tensor], origin: Dict[int, Tuple[int, int]]) -> List[tuple]:
    """Keys (seq, position, layer, head) whose bytes in this rank's new cache differ from `expected`, and cached
    blocks ("cached", old instance, hash, layer, head) that differ from the block they came from (origin: new
    block id -> (old instance, old block id))."""
    got = {}
    for key, t in _kv_snapshot(engine).items():
        if key[0] == "cached":
            key = ("cached", origin[engine.blocks.index[key[2]]][0]) + key[2:]
        got[key] = t
    bad = [key for key, t in got.items() if key not in expected or not same_bytes(t, expected[key])]
    mine = {(s, pos) for s, table in engine.tables.items() for pos in range(len(table))}
    if len({key[:2] for key in got if key[0] != "cached"}) != len(mine):
        bad.append(("missing blocks",))
    return bad


def _check_weights(engine: TPEngine, full: Mapping[str, torch.Tensor]) -> List[str]:
    tp, degree = engine.slot.tp_rank, engine.slot.degree
    return [s.name for s in engine.specs if not same_bytes(engine.weights[s.name], shard(full[s.name], s, tp, degree))]


def run_generation(rank: int, world_size: int, *, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   schedule: Sequence[Tuple[int, int]], model_dir: Optional[str] = None,
                   config: Optional[Mapping] = None, seed: int = 0, dtype="float32", scratch_bytes: int = 1 << 20,
                   block_size: int = 4, num_blocks: int = 64, kv_engine: str = "vllm_flash_attn",
                   kv_order: str = "NHD", record_logits: bool = False, verify: bool = True,
                   faults: Sequence[Tuple[int, int, str, int]] = (), prefix_caching: bool = False,
                   scheduler_tp_rank: int = 0, arrivals: Optional[Sequence[int]] = None) -> dict:
    """Serve `prompts` with greedy decoding on `world_size` ranks while the TP degree follows `schedule`.

    Run on every rank: RankPool(world_size).run(run_generation, prompts=..., ...) (the default process group is
    the service's group). The model comes from model_dir (an HF checkpoint, see load_hf_checkpoint) or from
    config + seed (random_hf_tensors: the weights write_random_checkpoint would write), converted to `dtype`.
    schedule: [(num_instances, degree), ...]; the first entry is the starting configuration (contiguous
    instances); each later entry is one retp, run between decode steps, spread evenly over the max_new_tokens
    steps. Prompt i is sequence id i, assigned round-robin to the starting instances. num_blocks: KV blocks per
    rank at the starting degree (the pool keeps its bytes; retp re-cuts it at each degree).
    verify: after each retp, compare every weight shard bit for bit with shard() of the full tensor, and every
    live KV token slot with its bytes before the move (gathered from the old holders).
    faults: for failure tests, (transition index, rank, fault point, after): arm amoeba_core.failpoints on that
    rank for that transition. A transition that fails leaves the engine at its old configuration: damaged shards
    are reloaded from the checkpoint and sequences whose KV cache was lost are recomputed (TPEngine.recover).
    prefix_caching: full prompt blocks stay in a per-instance prefix cache (reference.blocks) that retp carries
    across merges and splits (verify also checks every cached block's bytes); scheduler_tp_rank: the TP rank of
    each instance that hands its block tables and cache index to retp (the others pass none); arrivals: the step
    at which each prompt arrives (default: all at once).

    Returns a plain picklable dict (the same on every rank except "rank" and the per-rank transition fields):
      rank, world_size
      tokens:       [[int] * max_new_tokens] per prompt, in prompt order (complete on every rank)
      logits:       per prompt a float32 tensor (max_new_tokens, vocab_size): the logits each token was chosen
                    from; None unless record_logits
      steps:        engine steps run
      preemptions:  sequences this rank's instances preempted (recomputed later) for lack of KV blocks
      final_config: e.g. "4x1 [[0], [1], [2], [3]]"
      prefix_hit_tokens: prompt tokens this rank's instances served from the prefix cache
      transitions:  per retp, this rank's record: {"step", "from" ("4x1"), "to" ("2x2"), "config" (describe()),
                    "slot" ((instance, tp_rank, degree) after), "live_blocks" (this rank's instance, before),
                    "kv_moves" (group-wide block moves), "running" (sequences of the new instance),
                    "cached_blocks" (the new instance's prefix-cache entries, each checked by verify),
                    "prefix_hit_tokens" (this rank's prefix_hit_tokens so far, before the retp),
                    "stats" {weight_bytes_received, weight_bytes_sent, kv_bytes_received, kv_bytes_sent,
                    peak_extra_bytes, kv_peak_extra_bytes (bookkeeping), measured_peak_extra_bytes,
                    measured_kv_peak_extra_bytes, memory_bound_bytes (see RetpStats), seconds {plan, agree,
                    prepare, weights, kv, confirm, total}},
                    "verified" (bool, None when verify=False), "bad_weights" [names],
                    "bad_kv" [(seq, block position, layer, head)], "old_slots" (the group's slots before),
                    "new_degree", "sequences" {seq: (old instance, block table)} of the whole group before,
                    "destinations" {seq: new instance}, "failed" (None, or the RetpFailure's class name; a
                    failed record has "error", "restored" [tensor names], "recomputed" [seq ids] and
                    "cached_dropped" (prefix-cache entries whose bytes may be damaged) instead of "stats",
                    "kv_moves" and "destinations")}
    """
    n0, d0 = schedule[0]
    for n, d in schedule:
        if n * d != world_size:
            raise ConfigError(f"schedule entry {n}x{d} does not cover {world_size} ranks")
    hf_config, full = load_model(model_dir, config, seed, dtype)
    specs = model_param_specs(hf_config)
    tp = TPConfig.contiguous(world_size, d0)
    slot = tp.slot(rank)
    weights = {s.name: shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}
    # The full tensors stay: they check shards after each retp and restore damaged ones after a failed retp (a
    # production engine would re-read them from its checkpoint).
    layout = kv_layout_for(hf_config, kv_engine, kv_order, block_size)
    arrivals = list(arrivals) if arrivals is not None else [0] * len(prompts)
    seqs = [SeqState(i, [int(t) for t in p], max_new_tokens, arrival=int(arrivals[i]))
            for i, p in enumerate(prompts) if i % n0 == slot.instance]
    engine = TPEngine(rank, hf_config, specs, weights, tp, layout, layout.allocate(num_blocks, d0), seqs,
                      record_logits=record_logits, prefix_caching=prefix_caching,
                      scheduler_tp_rank=scheduler_tp_rank)

    when = transition_steps(len(schedule) - 1, max_new_tokens)
    records, step, k, error = [], 0, 0, None
    while True:
        # Every rank learns whether work is left and whether any rank failed (so all stop together, no hang).
        flags = torch.tensor([engine.unfinished() if engine.slot.tp_rank == 0 else 0, error is not None])
        dist.all_reduce(flags)
        unfinished, failed = int(flags[0]), int(flags[1])
        if failed:
            messages = [None] * world_size
            dist.all_gather_object(messages, None if error is None else str(error))
            raise error or CapacityError(next(m for m in messages if m is not None))
        while k < len(when) and (when[k] <= step or unfinished == 0):
            fault = next(((r, point, after) for t, r, point, after in faults if t == k), None)
            records.append(_transition(engine, schedule[k + 1][1], scratch_bytes, full, verify, step, fault))
            k += 1
        if unfinished == 0:
            break
        try:
            engine.step(now=step)
        except CapacityError as e:
            error = e
        step += 1

    engine.sync_metadata()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, engine.logits)
    logits = None
    if record_logits:
        merged: Dict[int, Dict[int, torch.Tensor]] = {}
        for part in gathered:
            for s, rows in part.items():
                merged.setdefault(s, {}).update(rows)
        logits = [torch.stack([merged[i][j] for j in sorted(merged[i])]) for i in range(len(prompts))]
    tokens = [list(engine.seqs[i].generated) for i in range(len(prompts))]
    return {"rank": rank, "world_size": world_size, "tokens": tokens,
            "logits": logits, "steps": step, "preemptions": engine.preemptions,
            "prefix_hit_tokens": engine.blocks.hits_tokens, "final_config": engine.tp.describe(),
            "transitions": records}


def _transition(engine: TPEngine, new_degree: int, scratch_bytes: int, full, verify: bool, step: int,
                fault=None) -> dict:
    before = engine.describe()
    hits_before, cached_before = engine.blocks.hits_tokens, len(engine.blocks.index)
    live = len({b for t in engine.tables.values() for b in t})
    old_slots = engine.tp.slots
    # The whole group's block tables, for the report's independent minimum of KV bytes.
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, (engine.slot.instance, {s: list(t) for s, t in engine.tables.items()}))
    sequences = {s: (inst, t) for inst, part in tables for s, t in part.items()}
    expected = None
    if verify:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, _kv_snapshot(engine))
        expected = {}
        for part in gathered:
            expected.update(part)
    if fault is not None and fault[0] == engine.rank:
        failpoints.arm(fault[1], after=fault[2])
    try:
        res = engine.change_degree(new_degree, scratch_bytes, checkpoint=full)
    finally:
        failpoints.disarm()
    if isinstance(res, RetpFailure):  # the engine is back at its old configuration: cached blocks kept their ids
        origin = {b: (engine.slot.instance, b) for b in engine.blocks.index.values()}
    else:
        origin = {j: (i, b) for i, blocks in res.kv.block_map.items() for b, j in blocks.items()}
    bad_w = _check_weights(engine, full) if verify else []
    bad_kv = _check_kv(engine, expected, origin) if verify else []
    record = {"step": step, "from": before, "to": engine.describe(), "config": engine.tp.describe(),
              "slot": (engine.slot.instance, engine.slot.tp_rank, engine.slot.degree), "live_blocks": live,
              "running": engine.running(), "verified": (not bad_w and not bad_kv) if verify else None,
              "bad_weights": bad_w, "bad_kv": bad_kv, "old_slots": old_slots, "new_degree": new_degree,
              "sequences": sequences, "cached_blocks": len(engine.blocks.index), "prefix_hit_tokens": hits_before}
    if isinstance(res, RetpFailure):
        damage = getattr(res, "damage", None)
        record.update(failed=type(res).__name__, error=str(res),
                      restored=damage.weights_to_restore(engine.rank) if damage is not None else [],
                      recomputed=damage.sequences_lost() if damage is not None else [],
                      cached_dropped=cached_before - len(engine.blocks.index))
        return record
    st = res.stats
    record.update(
        failed=None, kv_moves=res.plan.kv.num_moves if res.plan.kv is not None else 0,
        capacity=dict(res.kv.capacity) if res.kv is not None else {},
        measured_memory_bytes=dict(res.stats.measured_memory_bytes),
        stats={"weight_bytes_received": st.weight_bytes_received, "weight_bytes_sent": st.weight_bytes_sent,
               "kv_bytes_received": st.kv_bytes_received, "kv_bytes_sent": st.kv_bytes_sent,
               "peak_extra_bytes": st.peak_extra_bytes, "kv_peak_extra_bytes": st.kv_peak_extra_bytes,
               "measured_peak_extra_bytes": st.measured_peak_extra_bytes,
               "measured_kv_peak_extra_bytes": st.measured_kv_peak_extra_bytes,
               "memory_bound_bytes": st.memory_bound_bytes, "seconds": dict(st.seconds)},
        destinations=dict(res.kv.destinations) if res.kv is not None else {})
    # A cached block that survives in a new instance is one more move (a one-block "sequence" for kv_min_bytes).
    for i, key, b, d in res.plan.kv.cached if res.plan.kv is not None else ():
        record["sequences"][("cached", i, key, d)] = (i, [b])
        record["destinations"][("cached", i, key, d)] = d
    return record


def pool_buffer_bytes(specs, layout, degree: int, memory_limit_bytes: int, page: int) -> int:
    """Bytes of each KV buffer when a rank's weights at `degree` and its KV pool share memory_limit_bytes."""
    from ..capacity import weight_bytes_per_gpu
    per_buffer = (memory_limit_bytes - weight_bytes_per_gpu(specs, degree)) // (layout.num_layers *
                                                                                 layout.num_buffers)
    return max(0, per_buffer // page * page)


def serve_with_policy(rank: int, world_size: int, *, prompts: Sequence[Sequence[int]], arrivals: Sequence[int],
                      max_new_tokens, memory_limit_bytes: int, model_dir: Optional[str] = None,
                      config: Optional[Mapping] = None, seed: int = 0, dtype="float32", block_size: int = 4,
                      scratch_bytes: int = 1 << 20, kv_engine: str = "vllm_flash_attn", kv_order: str = "NHD",
                      degrees: Optional[Sequence[int]] = None, handoff: bool = True, verify: bool = True,
                      max_steps: int = 10_000) -> dict:
    """Serve `prompts` (prompt i arrives at step arrivals[i] and generates max_new_tokens tokens, an int or one per
    prompt) on ranks whose weights and KV cache share
    memory_limit_bytes each, with the TP degree chosen by amoeba_core.policy.TPPolicy: instances start at the
    lowest of `degrees` (default (1, world_size)), the group merges when a request fits no instance and splits back
    once it is done. The KV cache lives in an amoeba_core.elastic.ElasticKVPool per rank, so a merge turns the
    weight memory it frees into KV blocks (handoff=False keeps the pool's bytes: a merge only re-cuts them).

    The reference engine transforms its whole group (every instance has one degree), so each action must cover
    every rank: give `degrees` as (lowest, world_size). Returns run_generation's fields plus "capacity_blocks"
    (degree -> usable blocks per instance the policy planned with), "pool_buffer_bytes" (degree -> bytes per
    buffer) and, per transition record, "capacity" (retp's KVResult.capacity) and "measured_memory_bytes".
    """
    from ..elastic import ElasticKVPool
    from ..policy import ClusterState, Merge, PolicyParams, TPPolicy, ZeroCost
    if len(arrivals) != len(prompts):
        raise ConfigError(f"{len(arrivals)} arrival steps for {len(prompts)} prompts")
    degrees = tuple(degrees) if degrees is not None else (1, world_size)
    if degrees[-1] != world_size:
        raise ConfigError(f"the reference engine transforms its whole group: the highest degree must be the world "
                          f"size {world_size}, got {degrees}")
    hf_config, full = load_model(model_dir, config, seed, dtype)
    specs = model_param_specs(hf_config)
    layout = kv_layout_for(hf_config, kv_engine, kv_order, block_size)
    page = ElasticKVPool(layout, 1).granularity
    d0 = degrees[0]
    buffer_bytes = {d: pool_buffer_bytes(specs, layout, d, memory_limit_bytes, page) for d in degrees}
    if not handoff:
        buffer_bytes = {d: buffer_bytes[d0] for d in degrees}
    capacity_blocks = {d: max(0, layout.num_blocks_for(buffer_bytes[d], d) - layout.reserved_blocks)
                       for d in degrees}
    if capacity_blocks[d0] < 1:
        raise ConfigError(f"memory_limit_bytes {memory_limit_bytes} leaves no KV block beside the weights at TP{d0}")
    pool = ElasticKVPool(layout, max(buffer_bytes.values()))
    pool.resize(buffer_bytes[d0])
    tp = TPConfig.contiguous(world_size, d0)
    slot = tp.slot(rank)
    weights = {s.name: shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}
    n0 = layout.num_blocks_for(pool.mapped_buffer_bytes, d0)
    n_inst = tp.num_instances
    outputs = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seqs = [SeqState(i, [int(t) for t in p], int(n), arrival=int(a))
            for i, (p, a, n) in enumerate(zip(prompts, arrivals, outputs)) if i % n_inst == slot.instance]
    engine = TPEngine(rank, hf_config, specs, weights, tp, layout, pool.layers(n0, d0), seqs, pool=pool)
    engine.strict_capacity = False  # a request that fits no instance waits for the policy to merge
    policy = TPPolicy(PolicyParams(degrees, capacity_blocks, block_size, min_dwell_s=0.0, dwell_cost_factor=0.0,
                                   split_delay_s=0.0), ZeroCost())
    records, decisions, step = [], [], 0
    while True:
        # Every rank sees every instance (one rank per instance reports) and so takes the same decisions.
        views = [None] * world_size
        dist.all_gather_object(views, (engine.instance_view(step) if engine.slot.tp_rank == 0 else None,
                                       engine.unfinished() if engine.slot.tp_rank == 0 else 0))
        instances = tuple(sorted((v for v, _ in views if v is not None), key=lambda i: i.ranks[0]))
        if step >= max_steps:
            raise CapacityError(f"not finished after {max_steps} steps: {[i.waiting for i in instances]} still wait")
        # The policy sees the state after the previous step (including the step after the last request finished,
        # when it splits an idle group back to the lowest degree).
        for action in policy.decide(ClusterState(float(step), instances)):
            if sorted(action.ranks) != list(range(world_size)):
                raise ConfigError(f"the policy chose {action.describe()}; the reference engine transforms its whole "
                                  f"group only (degrees {degrees})")
            decisions.append((step, "merge" if isinstance(action, Merge) else "split", action.new_degree))
            record = _transition(engine, action.new_degree, scratch_bytes, full, verify, step)
            records.append(record)
            engine.formed_at = float(step)
        if sum(n for _, n in views) == 0:
            break
        engine.step(now=step)
        step += 1
    engine.sync_metadata()
    tokens = [list(engine.seqs[i].generated) for i in range(len(prompts))]
    return {"rank": rank, "world_size": world_size, "tokens": tokens, "steps": step,
            "preemptions": engine.preemptions, "final_config": engine.tp.describe(), "transitions": records,
            "decisions": decisions, "capacity_blocks": capacity_blocks, "pool_buffer_bytes": buffer_bytes}
