"""retp(): the one call an engine makes, on every rank of its process group, to change the TP degree."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from .config import RankSlot, TPConfig
from . import errors as error_types
from .errors import AmoebaError, ConfigError, RankDisagreementError, SpecMismatchError
from .execution.memory import ExtraMemoryTracker
from .execution.weights import WeightExecutor
from .kv.executor import run_kv
from .kv.request import KVRequest
from .planning.plan import DEFAULT_SCRATCH_BYTES, RetpPlan, plan_retp
from .transport.torch_dist import TorchDistTransport


@dataclass
class RetpStats:
    """What one rank measured. Bytes are counted at the transport; seconds are wall time on this rank."""

    weight_bytes_sent: int = 0
    weight_bytes_received: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    peak_extra_bytes: int = 0        # library-tracked: scratch + new shards alive beside their old ones
    weight_peak_extra_bytes: int = 0
    kv_peak_extra_bytes: int = 0
    device_peak_extra_bytes: Optional[int] = None  # CUDA caching allocator's view (None on CPU)
    scratch_bytes: int = 0           # the budget
    seconds: Dict[str, float] = field(default_factory=dict)  # plan, agree, weights, kv, total

    @property
    def bytes_sent(self) -> int:
        return self.weight_bytes_sent + self.kv_bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.weight_bytes_received + self.kv_bytes_received


@dataclass
class RetpResult:
    """config: the new TPConfig of the whole group; slot: this rank's (instance, tp_rank, degree);
    weights: name -> new shard (the dict passed in, updated in place); kv: KVResult or None; plan; stats."""

    config: TPConfig
    slot: RankSlot
    weights: Dict[str, torch.Tensor]
    kv: Optional[object]
    plan: RetpPlan
    stats: RetpStats


def check_local_weights(specs, weights: Dict[str, torch.Tensor], slot: RankSlot) -> None:
    """Raise SpecMismatchError unless `weights` holds exactly the specs' shards for `slot`."""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in weights]
    extra = sorted(set(weights) - names)
    if missing or extra:
        raise SpecMismatchError(f"weights do not match the specs: missing {missing[:5]}"
                                f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    device = None
    for spec in specs:
        t = weights[spec.name]
        want = spec.shard_shape(slot.tp_rank, slot.degree)
        if tuple(t.shape) != want or t.dtype != spec.torch_dtype:
            raise SpecMismatchError(f"{spec.name}: tensor has shape {tuple(t.shape)} and dtype {t.dtype}; TP rank "
                                    f"{slot.tp_rank} of {slot.degree} must hold shape {want} and {spec.torch_dtype}")
        if not t.is_contiguous():
            raise SpecMismatchError(f"{spec.name}: tensor must be contiguous (strides {t.stride()})")
        if device is None:
            device = t.device
        elif t.device != device:
            raise SpecMismatchError(f"{spec.name}: tensor is on {t.device}, other weights are on {device}")


def _gather_and_check(group, payload: dict, error: Optional[Exception], inputs: dict) -> list:
    """All ranks exchange `payload`, their inputs and their error (if any); every rank raises if any rank failed
    or the inputs differ. Returns the gathered payloads, indexed by group rank."""
    mine = {"payload": payload, "inputs": inputs,
            "error": None if error is None else (type(error).__name__, str(error))}
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    errors = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"] is not None]
    if errors:
        if error is not None:
            raise error
        r, (kind, msg) = errors[0]
        cls = getattr(error_types, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, AmoebaError)):
            cls = RankDisagreementError
        raise cls(f"rank {r} rejected the transformation: {msg}")
    for key in inputs:
        values = {r: g["inputs"][key] for r, g in enumerate(gathered)}
        if len({repr(v) for v in values.values()}) > 1:
            raise RankDisagreementError(f"ranks disagree on {key}: " + "; ".join(f"rank {r}: {v}"
                                                                              for r, v in values.items()))
    return [g["payload"] for g in gathered]


def retp(group: Optional[dist.ProcessGroup], new_degree: int, *, config: TPConfig, specs: Sequence,
         weights: Dict[str, torch.Tensor], kv=None, placement: Optional[TPConfig] = None,
         scratch_bytes: int = DEFAULT_SCRATCH_BYTES, stage_via_host: Optional[bool] = None,
         release_storage: bool = False) -> RetpResult:
    """Change the TP degree of every instance in `group` to `new_degree`. Call on every rank of the group.

    group:         torch.distributed group (None: the default group); group rank g is slot config.slots[g]
    config:        the current TPConfig (same on every rank)
    specs:         ParamSpec list, same on every rank (llama_param_specs(...))
    weights:       name -> this rank's current shard; updated in place with the new shards (old tensors are
                   released as soon as they are no longer needed, so do not keep other references to them)
    kv:            optional amoeba_core.kv.KVCache of this rank, moved in place together with the weights
    placement:     pin the new configuration instead of the byte-maximising one
    scratch_bytes: staging budget per rank; peak extra memory <= largest new weight shard + scratch_bytes
    stage_via_host: stage CUDA buffers through pinned host memory (default: True for a gloo group holding CUDA
                   tensors, False otherwise)
    release_storage: shards that shrink are returned as views of (or compacted inside) their old storage, which
                   stays allocated; True copies each into a right-sized tensor, one at a time, so a merge gives the
                   freed bytes back (e.g. to grow the KV pool), at the cost of one copy of those shards
    Every check runs on every rank before any byte moves; on failure every rank raises (a typed AmoebaError) and
    nothing has changed.

    The new placement maximises retained bytes, so an instance may sit on non-consecutive group ranks (e.g.
    result.config.instances() == [[0, 2, 1, 3]]): build instance process groups from result.config, and note that
    torch.distributed.new_group orders its members by global rank, not by TP rank.
    """
    t_start = time.perf_counter()
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # 1. Local checks; every rank shares its findings and its KV block tables.
    error, kv_summary = None, None
    inputs = {"new_degree": new_degree, "config": getattr(config, "slots", None), "scratch_bytes": scratch_bytes,
              "has_kv": kv is not None}
    try:
        if not isinstance(config, TPConfig):
            raise ConfigError(f"config must be a TPConfig, got {type(config).__name__}")
        if config.world_size != world:
            raise ConfigError(f"config covers {config.world_size} ranks but the group has {world}")
        check_local_weights(specs, weights, config.slot(rank))
        if kv is not None:
            kv.check(config.degree)
            kv_summary = kv.local_summary(config.degree)
    except AmoebaError as e:
        error = e
    summaries = _gather_and_check(group, kv_summary, error, inputs)
    # 2. Plan (pure; identical inputs give identical plans) and compare digests.
    plan, error = None, None
    try:
        kv_request = None
        if kv is not None:
            kv_request = KVRequest.from_summaries(summaries, [config.slots[g][0] for g in range(world)])
        plan = plan_retp(config, new_degree, specs, kv=kv_request, placement=placement, scratch_bytes=scratch_bytes)
    except AmoebaError as e:
        error = e
    t_plan = time.perf_counter()
    digests = _gather_and_check(group, plan.digest() if plan is not None else None, error, {})
    if len(set(digests)) > 1:
        raise RankDisagreementError("ranks computed different plans (specs or placement differ): " +
                                    ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests)))
    t_agree = time.perf_counter()

    # 3. Execute.
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    if stage_via_host is None:
        stage_via_host = device.type == "cuda" and dist.get_backend(group) == "gloo"
    transport = TorchDistTransport(group, stage_via_host=stage_via_host)
    memory = ExtraMemoryTracker(device)
    memory.start()
    scratch_need = _scratch_need(plan, rank, device)
    scratch = torch.empty(scratch_need, dtype=torch.uint8, device=device)
    memory.add(scratch_need)
    WeightExecutor(plan, rank, weights, transport, scratch, memory, release_storage).run()
    weight_peak = memory.peak
    stats = RetpStats(weight_bytes_sent=transport.bytes_sent, weight_bytes_received=transport.bytes_received,
                      weight_peak_extra_bytes=weight_peak, scratch_bytes=scratch_bytes)
    t_weights = time.perf_counter()
    kv_result = None
    if plan.kv is not None:
        sent0, recv0 = transport.bytes_sent, transport.bytes_received
        kv_result = run_kv(plan, rank, kv, transport, scratch)
        stats.kv_bytes_sent = transport.bytes_sent - sent0
        stats.kv_bytes_received = transport.bytes_received - recv0
        stats.kv_peak_extra_bytes = scratch_need  # the KV phase holds the scratch buffer and nothing else
    del scratch
    memory.sub(scratch_need)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    t_end = time.perf_counter()
    stats.peak_extra_bytes = max(weight_peak, stats.kv_peak_extra_bytes)
    stats.device_peak_extra_bytes = memory.device_peak()
    stats.seconds = {"plan": t_plan - t_start, "agree": t_agree - t_plan, "weights": t_weights - t_agree,
                     "kv": t_end - t_weights, "total": t_end - t_start}
    return RetpResult(plan.new, plan.new.slot(rank), weights, kv_result, plan, stats)


def _scratch_need(plan: RetpPlan, rank: int, device: torch.device) -> int:
    """Bytes of scratch this rank needs: the largest round's send + receive bytes, capped by the budget."""
    need = 0
    for a, b in plan.rounds:
        need = max(need, sum(t.nbytes for t in plan.transfers[a:b] if rank in (t.src, t.dst) and not t.direct))
    if plan.kv is not None:
        need = max(need, plan.kv.scratch_need(rank))
    if device.type == "cuda" and any(t.mode[rank] == "compact" for t in plan.tensors):
        need = max(need, min(plan.scratch_bytes, 1 << 20))  # CUDA in-place relayout stages through scratch
    return min(need, plan.scratch_bytes)
