"""Rank functions for the failure-contract tests: retp with a fault injected on one rank, and checks of what every
rank holds afterwards against expectations built from the checkpoint (module level so they pickle)."""
import time

import torch

import amoeba_core as A
from amoeba_core import failpoints
from amoeba_core.kv import KVCache, KVLayout
from amoeba_core.verify import full_weights, kv_block_values, kv_block_view, kv_fill, same_bytes


def _pool_bytes(layout, layers):
    return [[b.clone() for b in layout.buffers(layer)] for layer in layers]


def _check_damage(rank, damage, plan, layout, layers, weights, full, specs, sequences, old: A.TPConfig,
                  cached=None):
    """Compare what this rank holds with what the damage report claims (weights, sequences, cached blocks).
    Returns a list of contradictions."""
    bad = []
    new_slot = plan.new.slot(rank)
    old_slot = old.slot(rank)
    for spec in specs:
        state = damage.weight_state(rank, spec.name)
        t = weights[spec.name]
        if state in ("old", "both") and not same_bytes(t, A.shard(full[spec.name], spec, old_slot.tp_rank,
                                                                    old_slot.degree)):
            bad.append(("weight not at old", spec.name, state))
        if state in ("new", "both") and not same_bytes(t, A.shard(full[spec.name], spec, new_slot.tp_rank,
                                                                    new_slot.degree)):
            bad.append(("weight not at new", spec.name, state))
        if state == "unknown":
            bad.append(("own weight unknown", spec.name))
    if plan.kv is None:
        return bad
    kvp = plan.kv
    old_heads = layout.head_range(old_slot.tp_rank, old_slot.degree)
    new_heads = layout.head_range(new_slot.tp_rank, new_slot.degree)
    new_layers = [layout.views(layout.buffers(layer), kvp.new_num_blocks, kvp.new_degree) for layer in layers]
    origin = {s: (i, t) for i in sequences for s, t in sequences[i].items()}
    for sid, d in damage.sequences.items():
        inst, table = origin[sid]
        if d.intact_at_old and inst == old_slot.instance:
            for li, layer in enumerate(layers):
                for b in table:
                    if not same_bytes(kv_block_view(layout, layer, b), kv_block_values(layout, li, inst, b, old_heads)):
                        bad.append(("kv not intact at old", sid, li, b))
        if d.complete_at_new and d.new_instance == new_slot.instance:
            for li, layer in enumerate(new_layers):
                for b, j in zip(table, d.new_block_table):
                    if not same_bytes(kv_block_view(layout, layer, j), kv_block_values(layout, li, inst, b, new_heads)):
                        bad.append(("kv not complete at new", sid, li, b, j))
    # Cached blocks: an old id claimed intact holds its old bytes; a new id claimed complete holds the bytes of
    # the old block it came from.
    for (inst, key), b in damage.cached_old.items():
        if b is not None and inst == old_slot.instance:
            if b != (cached or {}).get(inst, {}).get(key):
                bad.append(("cached block id changed", inst, key, b))
            for li, layer in enumerate(layers):
                if not same_bytes(kv_block_view(layout, layer, b), kv_block_values(layout, li, inst, b, old_heads)):
                    bad.append(("cached not intact at old", inst, key, li))
    came_from = {(d, key): (i, b) for i, key, b, d in kvp.cached}
    for (d, key), j in damage.cached_new.items():
        if j is not None and d == new_slot.instance:
            i, b = came_from[(d, key)]
            for li, layer in enumerate(new_layers):
                if not same_bytes(kv_block_view(layout, layer, j), kv_block_values(layout, li, i, b, new_heads)):
                    bad.append(("cached not complete at new", d, key, li))
    return bad


def retp_with_fault(rank, world, model, kv_args, old: A.TPConfig, new_degree, sequences, num_blocks, fault=None,
                    timeout_s=10.0, scratch_bytes=1 << 11, bad_input=None, cached=None):
    """Shard weights and fill a KV pool at `old`, arm `fault` = (rank, point, after, action) on that rank, call retp.

    Returns {"status": "ok" | exception class name, "message", "phase", "failed_rank", "unresponsive",
    "seconds" (until retp returned or raised), "unchanged" (every weight and KV byte equal to before),
    "damage_summary", "damage" (weights and sequences, comparable across ranks), "contradictions"}.
    """
    specs = A.llama_param_specs(model)
    full = full_weights(specs)
    slot = old.slot(rank)
    weights = {s.name: A.shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}
    layout = KVLayout(**kv_args)
    layers = layout.allocate(num_blocks, old.degree)
    mine = sequences[slot.instance]
    my_cache = (cached or {}).get(slot.instance, {})
    kv_fill(layout, layers, slot.instance, sorted({b for t in mine.values() for b in t} | set(my_cache.values())),
            layout.head_range(slot.tp_rank, slot.degree), seed=rank)
    kv = KVCache(layout, layers, dict(mine), cached_blocks=dict(my_cache) if cached is not None else None)
    if bad_input is not None and rank in bad_input:
        kv = _corrupt(kv, bad_input[rank])
    w_before = {k: v.clone() for k, v in weights.items()}
    kv_before = _pool_bytes(layout, layers)
    if fault is not None and fault[0] == rank:
        failpoints.arm(fault[1], after=fault[2], action=fault[3])
    out = {"status": "ok", "message": "", "phase": None, "failed_rank": None, "unresponsive": (),
           "damage_summary": None, "damage": None, "contradictions": []}
    t0 = time.monotonic()
    try:
        A.retp(None, new_degree, config=old, specs=specs, weights=weights, kv=kv, scratch_bytes=scratch_bytes,
               timeout_s=timeout_s)
    except A.AmoebaError as e:
        out.update(status=type(e).__name__, message=str(e), phase=e.phase, failed_rank=e.failed_rank,
                   unresponsive=tuple(getattr(e, "unresponsive_ranks", ())))
        damage = getattr(e, "damage", None)
        if damage is not None:
            out["damage_summary"] = damage.summary()
            out["damage"] = (damage.weights, {s: (d.intact_at_old, d.complete_at_new)
                                              for s, d in damage.sequences.items()},
                             damage.cached_old, damage.cached_new)
            out["contradictions"] = _check_damage(rank, damage, e.plan, layout, layers, weights, full, specs,
                                                  sequences, old, cached)
            out["cached_intact_at_old"] = sum(b is not None for b in damage.cached_old.values())
            out["cached_lost_at_old"] = sum(b is None for b in damage.cached_old.values())
            out["intact_at_old"] = sum(d.intact_at_old for d in damage.sequences.values())
            out["complete_at_new"] = sum(d.complete_at_new for d in damage.sequences.values())
    finally:
        out["seconds"] = time.monotonic() - t0
        out["fault_fired"] = fault is not None and fault[0] == rank and fault[1] not in failpoints.armed()
        failpoints.disarm()
    out["unchanged"] = (w_before.keys() == weights.keys()
                        and all(same_bytes(w_before[k], weights[k]) for k in w_before)
                        and all(torch.equal(a, b) for la, lb in zip(kv_before, _pool_bytes(layout, layers))
                                for a, b in zip(la, lb)))
    return out


def _corrupt(kv: KVCache, how: str) -> KVCache:
    if how == "no_layers":
        return KVCache(kv.layout, [], kv.sequences)
    if how == "duplicate_block":
        seq, table = next(iter(kv.sequences.items()))
        return KVCache(kv.layout, kv.layers, {**kv.sequences, seq: list(table) + [table[0]]})
    if how == "foreign_block_id":
        seq, table = next(iter(kv.sequences.items()))
        return KVCache(kv.layout, kv.layers, {**kv.sequences, seq: ["x"] + list(table)})
    raise ValueError(how)


def retp_input_case(rank, world, model, kv_args, old: A.TPConfig, new_degree, sequences, num_blocks, case):
    """retp with one kind of bad (or unusual but valid) input; returns (exception class name or "ok", message,
    every byte unchanged?, seconds)."""
    import numpy as np
    from amoeba_core.transport import control
    specs = A.llama_param_specs(model)
    full = full_weights(specs)
    slot = old.slot(rank)
    weights = {s.name: A.shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}
    layout = KVLayout(**kv_args)
    layers = layout.allocate(num_blocks, old.degree)
    mine = dict(sequences[slot.instance])
    kwargs = dict(config=old, specs=specs, weights=weights, timeout_s=10.0)
    real_identity = control.build_identity
    degree = new_degree
    destinations = None
    if case == "numpy_degree":
        degree = np.int64(new_degree)
    elif case == "zero_scratch":
        kwargs["scratch_bytes"] = 0
    elif case == "negative_scratch" and rank == 1:
        kwargs["scratch_bytes"] = -5
    elif case == "other_build" and rank == 3:
        control.build_identity = lambda: "0.0.0+another-build"
    elif case == "kv_on_other_device" and rank == 0:
        layers = [layer.to("meta") for layer in layers]
    elif case == "non_contiguous_kv" and rank == 2:
        layers = [layer.transpose(-1, -2).contiguous().transpose(-1, -2) for layer in layers]
    elif case == "conflicting_destinations":
        # Every instance names a destination for the first sequence of instance 0; they disagree.
        first = next(iter(sequences[0]))
        destinations = {first: slot.instance % (world // new_degree)}
    before = {k: v.clone() for k, v in weights.items()}
    kv = KVCache(layout, layers, mine, destinations=destinations)
    t0 = time.monotonic()
    try:
        A.retp(None, degree, kv=kv, **kwargs)
        status, message = "ok", ""
    except A.AmoebaError as e:
        status, message = type(e).__name__, str(e)
    finally:
        control.build_identity = real_identity
    unchanged = all(same_bytes(before[k], weights[k]) for k in before)
    return status, message, unchanged, time.monotonic() - t0


def watchdog_case(rank, world, scenario):
    """A thread blocked for good (standing in for a host wait on a hung NCCL kernel) is released by the watchdog's
    abort. Returns (fired reason or None, seconds until released)."""
    import threading
    import torch.distributed as dist
    from amoeba_core.transport.control import ControlChannel, Watchdog
    control = ControlChannel(dist.group.WORLD, timeout_s=1.0)
    released = threading.Event()
    dog = Watchdog(control, 1.0, abort=released.set, poll_s=0.02).start()
    t0 = time.monotonic()
    if scenario == "kicked":
        while time.monotonic() - t0 < 2.5:  # progress every 0.2 s: never fires
            dog.kick()
            time.sleep(0.2)
        dog.stop()
        return dog.fired, time.monotonic() - t0
    if scenario == "peer_failed":
        control.report_failure("move", RuntimeError("a peer's failure"))
    released.wait(10)
    seconds = time.monotonic() - t0
    dog.stop()
    return dog.fired, seconds


def nccl_stuck_receive(rank, world, timeout_s):
    """NCCL, world 1: a receive nobody sends to would wait forever. The transport gives up after timeout_s and
    aborts the communicator. Returns (what was raised, seconds, aborted?)."""
    import torch.distributed as dist
    from amoeba_core.transport.control import ControlChannel
    from amoeba_core.transport.torch_dist import TorchDistTransport
    control = ControlChannel(dist.group.WORLD, timeout_s=timeout_s)
    transport = TorchDistTransport(None, control=control)
    buf = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    t0 = time.monotonic()
    try:
        transport.exchange([], [(0, buf)])
        raised = None
    except Exception as e:  # noqa: BLE001 - the test reports whatever came
        raised = type(e).__name__
    return raised, time.monotonic() - t0, transport.aborted


# ---- races and leaks found in review -------------------------------------------------------------------------
SMALL = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
             num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-5, rope_theta=10000.0)


def _small_weights(config, rank):
    specs = A.llama_param_specs(SMALL)
    full = full_weights(specs)
    slot = config.slot(rank)
    return specs, {s.name: A.shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}


def late_confirmation(rank, world, slow_rank, delay_s, timeout_s):
    """Rank slow_rank finishes moving, then pauses delay_s (> timeout_s) before confirming, while the others time
    out waiting for it. Returns the outcome class on this rank."""
    if rank == slow_rank:
        real = failpoints.hit

        def hit(name):
            if name == "confirm":
                time.sleep(delay_s)
            return real(name)
        failpoints.hit = hit
    config = A.TPConfig.contiguous(world, 1)
    specs, weights = _small_weights(config, rank)
    try:
        A.retp(None, world, config=config, specs=specs, weights=weights, timeout_s=timeout_s)
        return "success"
    except A.AmoebaError as e:
        return type(e).__name__
    finally:
        if rank == slow_rank:
            failpoints.hit = real


def failure_right_after_prepare(rank, world):
    """Rank 1 is descheduled between the store check and the failure poll of the "prepare" agreement, rank 3 is
    late into it, rank 2 fails at its first weight round: rank 1 must meet the failure as a move-phase failure
    like everyone else (not claim that nothing moved)."""
    from amoeba_core.transport import control
    real_poll, real_hit = control.ControlChannel.poll, failpoints.hit
    if rank == 1:
        def poll(self):
            if not getattr(self, "_slept", False) and any(k.startswith("prepare") for k in self._written):
                self._slept = True
                time.sleep(1.5)
            return real_poll(self)
        control.ControlChannel.poll = poll
    if rank == 3:
        def hit(name):
            if name == "prepare":
                time.sleep(0.5)
            return real_hit(name)
        failpoints.hit = hit
    if rank == 2:
        failpoints.arm("move.weights", after=0)
    config = A.TPConfig.contiguous(world, world)
    specs, weights = _small_weights(config, rank)
    try:
        A.retp(None, 1, config=config, specs=specs, weights=weights, timeout_s=5.0, scratch_bytes=1 << 12)
        return "success"
    except A.AmoebaError as e:
        return type(e).__name__
    finally:
        control.ControlChannel.poll, failpoints.hit = real_poll, real_hit
        failpoints.disarm()


def repeated_calls_keep_nothing(rank, world, calls):
    """`calls` merges and splits over the torch transport: the transport's helper threads and the rounds' buffers
    (scratch, old shards) must not accumulate."""
    import gc
    import threading
    import weakref
    config = A.TPConfig.contiguous(world, 1)
    specs, weights = _small_weights(config, rank)
    old_refs = []
    for k in range(calls):
        old_refs += [weakref.ref(t) for t in weights.values()]
        res = A.retp(None, world if config.degree == 1 else 1, config=config, specs=specs, weights=weights,
                     transport="torch", scratch_bytes=1 << 12)
        config = res.config
        del res
    gc.collect()
    alive = sum(r() is not None and not any(r() is t for t in weights.values()) for r in old_refs)
    waiters = sum(t.name == "amoeba-p2p-wait" for t in threading.enumerate())
    return {"waiters": waiters, "old_tensors_alive": alive}


def engine_recovers_a_failed_elastic_merge(rank, world):
    """The reference engine on an elastic pool merges 2x1 -> 1x2 and move.kv raises on rank 0: change_degree with a
    checkpoint must recover both ranks to 2x1 (the failed call's frames must not pin views of the grown pool)."""
    from amoeba_core.elastic import ElasticKVPool
    from amoeba_core.layout import model_param_specs
    from amoeba_core.reference.families import kv_layout_for
    from amoeba_core.reference.model import SeqState, TPEngine
    from amoeba_core.reference.run import load_model, pool_buffer_bytes
    hf, full = load_model(None, dict(SMALL, model_type="llama"), 0, "float32")
    specs = model_param_specs(hf)
    layout = kv_layout_for(hf, "vllm_flash_attn", "NHD", 4)
    page = ElasticKVPool(layout, 1).granularity
    sizes = {d: pool_buffer_bytes(specs, layout, d, 2 << 20, page) for d in (1, 2)}
    pool = ElasticKVPool(layout, max(sizes.values()))
    pool.resize(sizes[1])
    tp = A.TPConfig.contiguous(world, 1)
    slot = tp.slot(rank)
    weights = {s.name: A.shard(full[s.name], s, slot.tp_rank, slot.degree) for s in specs}
    seqs = [SeqState(i, [1 + i, 2, 3, 4, 5, 6, 7], 6) for i in range(4) if i % 2 == slot.instance]
    engine = TPEngine(rank, hf, specs, weights, tp, layout, pool.layers(layout.num_blocks_for(
        pool.mapped_buffer_bytes, 1), 1), seqs, pool=pool)
    for _ in range(3):
        engine.step()
    if rank == 0:
        failpoints.arm("move.kv", after=1)
    try:
        res = engine.change_degree(2, 1 << 16, checkpoint=full)
        return type(res).__name__, engine.describe()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"raised {type(e).__name__}: {str(e)[:200]}", engine.describe()
    finally:
        failpoints.disarm()
