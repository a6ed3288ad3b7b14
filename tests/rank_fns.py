"""Functions run on every rank of a RankPool: fn(rank, world_size, ...). Module level so they pickle."""
import threading

import torch
import torch.distributed as dist

import amoeba_core as A
from amoeba_core.verify import full_weights, same_bytes


def local_shards(specs, config: A.TPConfig, rank: int, seed: int = 0, device: str = "cpu"):
    full = full_weights(specs, seed)
    slot = config.slot(rank)
    return {s.name: A.shard(full[s.name], s, slot.tp_rank, slot.degree).to(device) for s in specs}


def retp_weights_and_check(rank, world, specs, old: A.TPConfig, new_degree, scratch_bytes, placement=None,
                           device="cpu", transport=None):
    """Shard deterministic weights at `old`, retp to new_degree, compare every tensor with shard() of the full."""
    weights = local_shards(specs, old, rank, device=device)
    res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, scratch_bytes=scratch_bytes,
                 placement=placement, transport=transport)
    full = full_weights(specs)
    bad = [s.name for s in specs
           if not same_bytes(res.weights[s.name], A.shard(full[s.name], s, res.slot.tp_rank, new_degree))]
    return {"bad": bad, "received": res.stats.weight_bytes_received, "sent": res.stats.weight_bytes_sent,
            "planned_received": int(res.plan.weight_bytes_received()[rank]),
            "planned_sent": int(res.plan.weight_bytes_sent()[rank]), "slots": res.config.slots,
            "peak": res.stats.peak_extra_bytes, "largest": res.plan.largest_new_shard_bytes(rank),
            "contiguous": all(t.is_contiguous() for t in res.weights.values()),
            "measured": res.stats.measured_peak_extra_bytes, "method": res.stats.memory_measurement,
            "on_device": all(t.device.type == torch.device(device).type for t in res.weights.values()),
            "transport": res.stats.transport}


def retp_expect_error(rank, world, specs_by_rank, old_by_rank, new_degree_by_rank, corrupt=None):
    """Call retp with per-rank inputs; return (exception type name, message, weights unchanged?)."""
    specs = specs_by_rank[rank]
    old = old_by_rank[rank]
    weights = local_shards(specs, old, rank)
    if corrupt and rank in corrupt:
        name, how = corrupt[rank]
        if how == "dtype":
            weights[name] = weights[name].to(torch.float64)
        else:
            weights[name] = weights[name][..., :-1].contiguous()
    before = {k: v.clone() for k, v in weights.items()}
    try:
        A.retp(None, new_degree_by_rank[rank], config=old, specs=specs, weights=weights)
    except A.AmoebaError as e:
        unchanged = before.keys() == weights.keys() and all(same_bytes(before[k], weights[k]) for k in before)
        dist.barrier()  # every rank got here: nobody is stuck in a collective
        return type(e).__name__, str(e), unchanged
    return None, None, None


def retp_staged(rank, world, specs, old: A.TPConfig, new_degree):
    weights = local_shards(specs, old, rank)
    res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, scratch_bytes=1 << 12,
                 stage_via_host=True)
    full = full_weights(specs)
    return [s.name for s in specs
            if not same_bytes(res.weights[s.name], A.shard(full[s.name], s, res.slot.tp_rank, new_degree))]


def retp_release_storage(rank, world, specs, old: A.TPConfig, new_degree):
    """Return (every storage right-sized?, bit-exact?) after retp with release_storage=True."""
    weights = local_shards(specs, old, rank)
    res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, release_storage=True)
    full = full_weights(specs)
    exact = all(same_bytes(res.weights[s.name], A.shard(full[s.name], s, res.slot.tp_rank, new_degree))
                for s in specs)
    sized = all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in res.weights.values())
    largest = max(t.numel() * t.element_size() for t in res.weights.values())
    return sized, exact, res.stats.peak_extra_bytes <= largest + res.plan.scratch_bytes


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples this process's resident memory every `interval_s` in a thread: a measurement independent of the
    library's own (which reads the kernel's high-water mark). `peak_extra` = highest sample - first sample (a lower
    bound of the true peak)."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s, self.peak_extra = interval_s, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_extra = max(self.peak_extra, rss_bytes() - self.base)

    def __enter__(self):
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(self.peak_extra, rss_bytes() - self.base)


def retp_measured_memory(rank, world, model, old: A.TPConfig, new_degree, scratch_bytes):
    """retp on weights large enough that the allocator maps them from the OS (> 32 MiB) so that resident memory
    shows every allocation; returns the stats' memory figures."""
    specs = A.llama_param_specs(model)
    weights = local_shards(specs, old, rank)
    res = A.retp(None, new_degree, config=old, specs=specs, weights=weights, scratch_bytes=scratch_bytes)
    st = res.stats
    return {"measured": st.measured_peak_extra_bytes, "tracked": st.peak_extra_bytes, "bound": st.memory_bound_bytes,
            "method": st.memory_measurement, "largest": res.plan.largest_new_shard_bytes(rank)}


def store_exchanges_of_one_call(rank, world, specs, old: A.TPConfig, new_degree, transport=None):
    """The control-channel exchanges one successful retp call makes, in order (phase names), and whether the
    result is bit-exact."""
    from amoeba_core.transport import control
    real = control.ControlChannel.exchange
    phases = []

    def exchange(self, phase, payload):
        phases.append(phase)
        return real(self, phase, payload)

    control.ControlChannel.exchange = exchange
    try:
        out = retp_weights_and_check(rank, world, specs, old, new_degree, 1 << 16, transport=transport)
    finally:
        control.ControlChannel.exchange = real
    return {"phases": phases, "bad": out["bad"]}
