"""Rank functions for the same-host transport tests (module level so they pickle)."""
import hashlib

import torch

import amoeba_core as A
from amoeba_core.kv import KVCache
from amoeba_core.verify import kv_fill

import rank_fns


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def transition(rank, world, specs, layout, num_blocks, old, new_degree, sequences, transport, scratch_bytes=1 << 14,
               with_kv=True):
    """One retp over `transport`; returns digests of every new weight and KV buffer, and the counters."""
    weights = rank_fns.local_shards(specs, old, rank)
    kv = None
    if with_kv:
        inst, tp = old.slots[rank]
        layers = layout.allocate(num_blocks, old.degree)
        mine = sequences[inst]
        kv_fill(layout, layers, inst, sorted({b for t in mine.values() for b in t}), layout.head_range(tp, old.degree),
                seed=rank)
        kv = KVCache(layout, layers, mine)
    res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, kv=kv, scratch_bytes=scratch_bytes,
                 transport=transport)
    out = {"transport": res.stats.transport, "weights": {k: digest(v) for k, v in res.weights.items()},
           "received_from": res.stats.bytes_received_from, "received": res.stats.bytes_received,
           "planned_from": res.plan.pair_bytes()[:, rank].tolist(),
           "scratch_allocated": res.stats.scratch_allocated_bytes, "memory_bound": res.stats.memory_bound_bytes,
           "largest_new_shard": res.plan.largest_new_shard_bytes(rank),
           "measured_weights": res.stats.measured_weight_peak_extra_bytes}
    if with_kv:
        out["kv"] = [[digest(b) for b in layout.buffers(layer)] for layer in res.kv.layers]
        out["tables"] = res.kv.block_tables
    return out


def host_identity_differs(rank, world, transport):
    """Pretend rank 1 runs on another host (its boot id differs): auto must fall back to torch.distributed,
    samehost must be refused on every rank before anything moves."""
    from amoeba_core.transport import samehost
    real = samehost.HostIdentity.here
    if rank == 1:
        samehost.HostIdentity.here = staticmethod(lambda: samehost.HostIdentity("elsewhere", "another-boot", 1, 0))
    try:
        config = A.TPConfig.contiguous(world, 1)
        specs = A.llama_param_specs(rank_fns_model())
        weights = rank_fns.local_shards(specs, config, rank)
        res = A.retp(None, world, config=config, specs=specs, weights=weights, transport=transport)
        return "ok", res.stats.transport
    except A.AmoebaError as e:
        return type(e).__name__, str(e)
    finally:
        samehost.HostIdentity.here = real


def rank_fns_model():
    from models import GQA
    return GQA


def slow_reader_transition(rank, world, specs, layout, num_blocks, old, new_degree, sequences, slow_rank, delay_s):
    """Like transition() over the same-host transport, with `slow_rank` sleeping before every pull: its lenders
    must wait for it before overwriting what it still has to read."""
    import time
    from amoeba_core.transport.samehost import SameHostTransport
    real = SameHostTransport.pull
    if rank == slow_rank:
        def pull(self, pulls, buffers, remote_name):
            if pulls:
                time.sleep(delay_s)
            return real(self, pulls, buffers, remote_name)
        SameHostTransport.pull = pull
    try:
        return transition(rank, world, specs, layout, num_blocks, old, new_degree, sequences, "samehost",
                          scratch_bytes=1 << 11)
    finally:
        SameHostTransport.pull = real
