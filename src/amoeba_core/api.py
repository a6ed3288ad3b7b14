"""retp(): the one call an engine makes, on every rank of its process group, to change the TP degree.

A call runs six phases on every rank (README "When things go wrong" has the contract as a table):

  validate  local checks of every input; the ranks exchange their findings, inputs and KV tables
  plan      the pure plan (planning.plan_retp), identical on every rank
  agree     each rank computes its plan's digest (library builds were compared in validate)
  prepare   scratch, staging buffers and executor tables are allocated; one exchange gives every rank the others'
            plan digests and tells it that every rank is ready (the plans are compared before anything moves)
  move      weights, then the KV cache, change hands (the only phase that changes any byte)
  confirm   every rank reports that it finished moving; nobody returns before everybody has

Up to and including prepare, any failure on any rank makes every rank raise with nothing changed: the caller's
input errors as their own typed class (SpecMismatchError, ...), anything else as RetpAborted. From move on, every
rank raises TransformationFailed carrying a DamageReport. Every wait for peers is bounded by timeout_s.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import _C
from . import errors as error_types
from . import failpoints
from .config import RankSlot, TPConfig
from .errors import (AmoebaError, ConfigError, InvalidDegreeError, RankDisagreementError, RetpAborted,
                     ScratchBudgetError, SpecMismatchError, TransformationFailed)
from .capacity import handoff_buffer_bytes
from .execution.memory import MemoryMeter, return_freed_memory
from .execution.progress import Progress, assemble_damage
from .execution.executor import Executor
from .planning.kv_program import build_kv_program
from .planning.weight_program import build_weight_program, storage_overshoot_bytes
from .kv.request import KVRequest, KVResult
from .planning.plan import DEFAULT_SCRATCH_BYTES, RetpPlan, plan_retp
from .transport import control as control_path
from .transport.control import ControlChannel, PeerFailure, Watchdog
from .transport.samehost import HostIdentity, PeerGone, SameHostTransport, publish
from .transport.torch_dist import ExchangeTimeout, TorchDistTransport

DEFAULT_TIMEOUT_S = 30.0
TRANSPORTS = ("auto", "torch", "samehost")
DAMAGE_GRACE_S = 5.0  # after a failure in the move phase: how long to wait for the other ranks' damage reports


@dataclass
class RetpStats:
    """What one rank counted and measured. Bytes are counted at the transport; seconds are wall time on this rank.

    Memory, in bytes above max(what the rank held before, what it holds after) (see execution.memory):
      peak_extra_bytes          the library's bookkeeping: scratch, new shards alive beside their old ones, host
                                staging, executor tables (weight_/kv_peak_extra_bytes: per phase)
      measured_peak_extra_bytes measured where the tensors live: the process's resident-memory high-water mark for
                                CPU tensors, the CUDA caching allocator for CUDA tensors (measured_weight_/kv_:
                                per phase); None when measurement was off or unavailable
      measured_host_peak_extra_bytes  resident-memory high-water mark (pinned staging of CUDA tensors shows here)
      measured_driver_peak_extra_bytes  drop of the CUDA driver's free memory (allocations outside torch included)
      memory_measurement        how measured_peak_extra_bytes was obtained: "rss_hwm", "cuda_allocator_peak"
                                (exact), "cuda_allocator_sampled" (sampled after each library allocation), "none"
      memory_bound_bytes        what the library promises on the tensors' device: the largest new weight shard it
                                allocates + the scratch it allocates + pinned host staging (host-side planning
                                tables come on top on CPU, where they share the memory)
      measured_memory_bytes     {"before", "peak", "after"}: the measured footprint itself (resident memory on CPU;
                                device memory in use per the driver on CUDA), empty when not measured
    """

    weight_bytes_sent: int = 0
    weight_bytes_received: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    peak_extra_bytes: int = 0
    weight_peak_extra_bytes: int = 0
    kv_peak_extra_bytes: int = 0
    measured_peak_extra_bytes: Optional[int] = None
    measured_weight_peak_extra_bytes: Optional[int] = None
    measured_kv_peak_extra_bytes: Optional[int] = None
    measured_host_peak_extra_bytes: Optional[int] = None
    measured_driver_peak_extra_bytes: Optional[int] = None
    memory_measurement: str = "none"
    memory_bound_bytes: int = 0
    measured_memory_bytes: Dict[str, int] = field(default_factory=dict)
    scratch_bytes: int = 0           # the budget
    scratch_allocated_bytes: int = 0  # what this rank's programs laid out and allocated (0: nothing staged)
    transport: str = ""              # "torch" or "samehost": the data path this call took
    bytes_received_from: List[int] = field(default_factory=list)  # per peer (group rank), weights and KV
    seconds: Dict[str, float] = field(default_factory=dict)  # plan, agree, prepare, weights, kv, resize, confirm, total

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


def check_local_weights(specs, weights: Dict[str, torch.Tensor], slot: RankSlot) -> Optional[torch.device]:
    """Raise SpecMismatchError unless `weights` holds exactly the specs' shards for `slot`, contiguous and on one
    device; returns that device (None without weights)."""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in weights]
    extra = sorted(set(weights) - names)
    if missing or extra:
        raise SpecMismatchError(f"weights do not match the specs: missing {missing[:5]}"
                                f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    device = None
    for spec in specs:
        t = weights[spec.name]
        if not isinstance(t, torch.Tensor):
            raise SpecMismatchError(f"{spec.name}: expected a torch.Tensor, got {type(t).__name__}")
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
    return device


def _process_alive(pid: int) -> bool:
    """False when process `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _as_int(value, what: str, error=ConfigError) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise error(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def retp(group: Optional[dist.ProcessGroup], new_degree: int, *, config: TPConfig, specs: Sequence,
         weights: Dict[str, torch.Tensor], kv=None, placement: Optional[TPConfig] = None,
         scratch_bytes: int = DEFAULT_SCRATCH_BYTES, stage_via_host: Optional[bool] = None,
         release_storage: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, measure_memory: bool = True,
         store: Optional[dist.Store] = None, kv_pool_bytes: Optional[int] = None,
         transport: Optional[str] = None) -> RetpResult:
    """Change the TP degree of every instance in `group` to `new_degree`. Call on every rank of the group.

    group:         torch.distributed group (None: the default group); group rank g is slot config.slots[g]
    new_degree:    any integer-like value (numpy integers included)
    config:        the current TPConfig (same on every rank)
    specs:         ParamSpec list, same on every rank (llama_param_specs(...))
    weights:       name -> this rank's current shard; updated in place with the new shards (old tensors are
                   released as soon as they are no longer needed, so do not keep other references to them); or
                   the engine's nn.Module whose parameters carry the specs' names (integration.retp_module: the
                   new shards are rebound in place as nn.Parameters, other parameters and buffers untouched)
    kv:            optional amoeba_core.kv.KVCache of this rank, moved in place together with the weights; on the
                   same device as the weights. Its block tables, destinations and cached blocks may come from one
                   rank per instance (KVCache(..., sequences=None) on the others)
    placement:     pin the new configuration instead of the byte-maximising one
    scratch_bytes: staging budget per rank (> 0); peak extra memory <= largest new weight shard + scratch_bytes
                   (+ pinned host staging of whole messages when stage_via_host)
    stage_via_host: stage CUDA buffers through pinned host memory (default: True for a gloo group holding CUDA
                   tensors, False otherwise; NCCL groups move CUDA tensors only)
    release_storage: shards that shrink are returned as views of (or compacted inside) their old storage, which
                   stays allocated; True copies each into a right-sized tensor, one at a time, so a merge gives the
                   freed bytes back (e.g. to grow the KV pool), at the cost of one copy of those shards
    timeout_s:     the longest any rank waits for its peers at one step (an agreement, one exchange, the final
                   confirmation); independent of the process group's own timeout
    measure_memory: measure the call's extra memory (RetpStats.measured_*); on CPU this resets the process's
                   resident-memory high-water mark (/proc/self/clear_refs)
    store:         the c10d store for the control path (default: the group's own store)
    kv_pool_bytes: with an elastic pool (KVCache(..., pool=...)): the bytes the whole pool of this rank should map
                   after the call, instead of the default handoff (the pool grows by the weight bytes a merge frees
                   and gives back what a split's weights need); release_storage is implied with a pool
    transport:     the data path. "samehost": each rank reads what it receives straight from its peers' memory
                   (transport.samehost: process_vm_readv for CPU tensors, CUDA IPC for CUDA tensors), every rank
                   must be on one host; "torch": point-to-point messages over `group`; "auto" (default): samehost
                   when every rank is on one host (host name, boot id, PID namespace and user agree) and the
                   tensors are on the CPU, torch otherwise (CUDA tensors take samehost only when asked for: the CUDA
                   IPC path has not run on a GPU yet); None: $AMOEBA_TRANSPORT if set, else "auto"

    Raises, on every rank: the caller's input errors (InvalidDegreeError, ConfigError, SpecMismatchError,
    RankDisagreementError, CapacityError, ScratchBudgetError) and RetpAborted before anything moves (nothing
    changed); TransformationFailed (with a DamageReport) after moving began. README "When things go wrong".

    The new placement maximises retained bytes, so an instance may sit on non-consecutive group ranks (e.g.
    result.config.instances() == [[0, 2, 1, 3]]): build instance process groups from result.config, and note that
    torch.distributed.new_group orders its members by global rank, not by TP rank.
    """
    if isinstance(weights, torch.nn.Module):  # an engine's model: rebound in place (integration.retp_module)
        from .integration import retp_module
        return retp_module(group, new_degree, weights, config=config, specs=specs, kv=kv, placement=placement,
                           scratch_bytes=scratch_bytes, stage_via_host=stage_via_host,
                           release_storage=release_storage, timeout_s=timeout_s, measure_memory=measure_memory,
                           store=store, kv_pool_bytes=kv_pool_bytes, transport=transport)
    group = group if group is not None else dist.group.WORLD
    if transport is None:
        transport = os.environ.get("AMOEBA_TRANSPORT", "auto")
    bad_timeout = not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0)
    control = ControlChannel(group, DEFAULT_TIMEOUT_S if bad_timeout else timeout_s, store)
    call = _Call(group, control, new_degree, config, specs, weights, kv, placement, scratch_bytes, stage_via_host,
                 release_storage, measure_memory, kv_pool_bytes, transport)
    if bad_timeout:
        call.fail_before_move("validate", ConfigError(f"timeout_s must be a positive number of seconds, got "
                                                      f"{timeout_s!r}"))
    return call.run(timeout_s)


class _Call:
    """One retp call on one rank: the phases in order, and what a failure in each of them means."""

    def __init__(self, group, control: ControlChannel, new_degree, config, specs, weights, kv, placement,
                 scratch_bytes, stage_via_host, release_storage, measure_memory, kv_pool_bytes=None,
                 transport="auto"):
        self.group, self.control = group, control
        self.rank, self.world = control.rank, control.world
        self.new_degree, self.config, self.specs, self.weights, self.kv = new_degree, config, specs, weights, kv
        self.placement, self.scratch_bytes = placement, scratch_bytes
        self.kv_pool_bytes, self.pool, self.seconds = kv_pool_bytes, None, {}
        self.kv_tables, self.tables_key = None, False  # this rank's KV tables; the extra exchange was used
        self.stage_via_host, self.release_storage = stage_via_host, release_storage
        self.transport_choice, self.transport_kind, self.peer_buffers = transport, "torch", None
        self.counter = np.zeros(1, dtype=np.int64)  # the same-host transport's progress counter (read by peers)
        self.allowed_pulls = False
        self.t = {"start": time.perf_counter()}
        self.memory = MemoryMeter(measure_memory)
        self.memory.begin_phase("plan")  # validation and planning hold host tables too

    # ---- failures ----------------------------------------------------------------------------------------------
    def fail_before_move(self, phase: str, error: BaseException):
        """This rank failed before moving: tell the others, raise a typed error (nothing changed anywhere)."""
        if isinstance(error, PeerFailure):
            self.peer_failed_before_move(phase, error)
        self.control.report_failure(phase, error)
        if isinstance(error, AmoebaError):
            error.phase, error.failed_rank = phase, self.rank
            error.cause = f"{type(error).__name__}: {error}"
            raise error
        raise RetpAborted(f"rank {self.rank} failed in phase {phase}: {type(error).__name__}: {error}; nothing "
                          f"was moved, weights and KV are unchanged on every rank", phase=phase,
                          failed_rank=self.rank, cause=f"{type(error).__name__}: {error}") from error

    def peer_failed_before_move(self, phase: str, failure: PeerFailure):
        """Another rank failed (or stopped answering) before moving: raise its error class where it is one of the
        caller's input errors, RetpAborted otherwise."""
        if failure.failures:
            first = failure.failures[0]
            cause = f"{first['type']}: {first['message']}"
            message = (f"rank {first['rank']} rejected the transformation in phase {first['phase']}: "
                       f"{first['message']}")
            cls = getattr(error_types, first["type"], None)
            if first["amoeba"] and isinstance(cls, type) and issubclass(cls, AmoebaError) and \
                    not issubclass(cls, error_types.RetpFailure):
                error = cls(message)
                error.phase, error.failed_rank, error.cause = first["phase"], first["rank"], cause
                raise error
            raise RetpAborted(f"rank {first['rank']} failed in phase {first['phase']}: {cause}; nothing was moved, "
                              f"weights and KV are unchanged on every rank", phase=first["phase"],
                              failed_rank=first["rank"], cause=cause, unresponsive_ranks=failure.unresponsive)
        raise RetpAborted(f"phase {phase}: {failure}; nothing was moved, weights and KV are unchanged on every rank",
                          phase=phase, unresponsive_ranks=failure.unresponsive)

    def agree(self, phase: str, payload) -> list:
        try:
            return self.control.exchange(phase, payload)
        except PeerFailure as e:
            self.peer_failed_before_move(phase, e)

    def local(self, phase: str, fn, *args):
        """Run one local step of a phase before the move; any exception is reported to every rank."""
        try:
            failpoints.hit(phase)
            return fn(*args)
        except BaseException as e:  # noqa: BLE001 - every error must reach the other ranks
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                self.control.report_failure(phase, e)
                raise
            self.fail_before_move(phase, e)

    # ---- phases ------------------------------------------------------------------------------------------------
    def run(self, timeout_s) -> RetpResult:
        try:
            return self._run(timeout_s)
        finally:
            if self.allowed_pulls:
                _C.allow_pulls_from_any(False)

    def _run(self, timeout_s) -> RetpResult:
        inputs, summary = self.local("validate", self.validate, timeout_s)
        gathered = self.agree("validate", {"inputs": inputs, "kv": summary, "host": HostIdentity.here(),
                                           "samehost": self.peer_buffers})
        self.control.forget_previous_call()
        for key in inputs:
            values = {r: g["inputs"][key] for r, g in enumerate(gathered)}
            if len({repr(v) for v in values.values()}) > 1:
                raise RankDisagreementError(f"ranks disagree on {key}: " + "; ".join(
                    f"rank {r}: {v}" for r, v in values.items()))
        self.gathered = gathered
        self.transport_kind = self.choose_transport(gathered)
        summaries = [g["kv"] for g in gathered]
        if self.kv is not None:
            summaries = self.fetch_tables(summaries)
        plan = self.local("plan", self.make_plan, summaries)
        self.t["plan"] = time.perf_counter()
        digest = self.local("agree", plan.digest)
        self.t["agree"] = time.perf_counter()
        # Preparing writes nothing the caller sees, so it runs before the plans are compared: one exchange then
        # carries every rank's digest and says that every rank is ready (one store round trip, not two). A rank
        # whose plan differs has only allocated buffers when it raises.
        self.plan = plan
        self.local("prepare", self.prepare)
        digests = self.agree("prepare", digest)
        self.forget_tables()
        if len(set(digests)) > 1:
            raise RankDisagreementError("ranks computed different plans (specs or placement differ): " +
                                        ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests)))
        self.t["prepare"] = time.perf_counter()
        return self.move_and_confirm()

    def choose_transport(self, gathered) -> str:
        """"torch" or "samehost", from what every rank published (the same answer on every rank)."""
        if self.transport_choice == "torch":
            return "torch"
        hosts = [g["host"] for g in gathered]
        apart = [r for r, h in enumerate(hosts) if not h.shared_with(hosts[0])]
        unexportable = [(r, g["samehost"]) for r, g in enumerate(gathered) if not isinstance(g["samehost"], dict)]
        if self.transport_choice == "auto":
            return "torch" if apart or unexportable else "samehost"
        if apart:
            raise ConfigError(f"transport='samehost' needs every rank on one host (boot id, PID namespace and user): "
                              f"ranks {apart} differ from rank 0 ({hosts[0]} vs {hosts[apart[0]]})")
        if unexportable:
            raise ConfigError(f"transport='samehost' cannot read rank {unexportable[0][0]}'s buffers: "
                              f"{unexportable[0][1]}")
        return "samehost"

    def validate(self, timeout_s):
        new_degree = _as_int(self.new_degree, "new_degree", InvalidDegreeError)
        if new_degree < 1 or self.world % new_degree:
            raise InvalidDegreeError(f"new TP degree {new_degree} does not divide world size {self.world}")
        self.new_degree = new_degree
        self.scratch_bytes = _as_int(self.scratch_bytes, "scratch_bytes", ScratchBudgetError)
        if self.scratch_bytes <= 0:
            raise ScratchBudgetError(f"scratch_bytes must be positive, got {self.scratch_bytes}")
        config = self.config
        if not isinstance(config, TPConfig):
            raise ConfigError(f"config must be a TPConfig, got {type(config).__name__}")
        if config.world_size != self.world:
            raise ConfigError(f"config covers {config.world_size} ranks but the group has {self.world}")
        slot = config.slot(self.rank)
        device = check_local_weights(self.specs, self.weights, slot)
        summary = None
        if self.kv is not None:
            self.kv.check(config.degree)
            if device is not None and self.kv.device != device:
                raise SpecMismatchError(f"the KV cache is on {self.kv.device} but the weights are on {device}: "
                                        f"retp moves both through one device's scratch")
            device = self.kv.device
            summary = self.kv.local_summary(config.degree)
            self.kv_tables = summary["tables"]
            if slot.tp_rank != 0:
                summary["tables"] = None  # TP rank 0 sends them (else fetch_tables); the digest proves agreement
            self.pool = self.kv.pool
            if self.pool is not None:
                self.release_storage = True  # a merge hands its freed weight bytes to the pool: free them
        if self.kv_pool_bytes is not None:
            if self.pool is None:
                raise ConfigError("kv_pool_bytes resizes an elastic KV pool: pass KVCache(..., pool=...)")
            self.kv_pool_bytes = _as_int(self.kv_pool_bytes, "kv_pool_bytes")
        self.device = device if device is not None else torch.device("cpu")
        backend = dist.get_backend(self.group)
        if self.stage_via_host is None:
            self.stage_via_host = self.device.type == "cuda" and backend != "nccl"
        if backend == "nccl" and self.device.type != "cuda":
            raise SpecMismatchError(f"an NCCL group moves CUDA tensors only; the tensors are on {self.device}")
        if self.transport_choice not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport_choice!r}")
        samehost_cuda = self.transport_choice == "samehost"  # auto: CUDA tensors take torch.distributed
        if backend != "nccl" and self.device.type == "cuda" and not self.stage_via_host and not samehost_cuda:
            raise ConfigError(f"a {backend} group cannot send CUDA tensors directly: pass stage_via_host=True (or "
                              f"None) or use an NCCL group")
        elastic = None if self.pool is None else (self.pool.granularity, self.pool.max_buffer_bytes,
                                                  self.pool.mapped_buffer_bytes, self.pool.handoff_slack_bytes)
        inputs = {"new_degree": new_degree, "config": config.slots, "scratch_bytes": self.scratch_bytes,
                  "has_kv": self.kv is not None, "timeout_s": float(timeout_s),
                  "elastic_pool": elastic, "kv_pool_bytes": self.kv_pool_bytes,
                  "library": control_path.build_identity(), "transport": self.transport_choice}
        if self.transport_choice != "torch":
            self.peer_buffers = self.publish_buffers()
        return inputs, summary

    def publish_buffers(self):
        """What peers need to read this rank's buffers (transport.samehost.publish), or why they cannot."""
        if self.device.type == "cuda" and self.transport_choice == "auto":
            return "auto takes torch.distributed for CUDA tensors"
        if self.device.type == "cuda" and self.pool is not None:
            return "the elastic KV pool's CUDA memory (VMM) cannot be exported through CUDA IPC"
        if self.device.type not in ("cpu", "cuda"):
            return f"tensors on {self.device} cannot be read by peers"
        self.allowed_pulls = _C.allow_pulls_from_any(True)  # only where Yama restricts ptrace; undone after the call
        return publish(self.weights, self.kv.physical_buffers() if self.kv is not None else [], self.counter)

    def fetch_tables(self, summaries: list) -> list:
        """Instances whose TP rank 0 passes no tables (sequences=None there): their first rank that does pass them
        sends them in one more exchange. Every rank decides the same from the gathered digests."""
        instance_of = [self.config.slots[g][0] for g in range(self.world)]
        sources = KVRequest.table_sources(summaries, instance_of)
        senders = {ranks[0] for ranks in sources.values()
                   if ranks and all(summaries[r]["tables"] is None for r in ranks)}
        if not senders:
            return summaries
        sent = self.agree("tables", self.kv_tables if self.rank in senders else None)
        self.tables_key = True
        return [dict(s, tables=sent[r]) if r in senders else s for r, s in enumerate(summaries)]

    def forget_tables(self) -> None:
        """Delete this rank's key of the extra tables exchange (every rank has planned from it by now)."""
        if self.tables_key:
            try:
                self.control.store.delete_key(f"tables/{self.rank}")
            except Exception:  # noqa: BLE001 - housekeeping only
                pass

    def make_plan(self, summaries) -> RetpPlan:
        kv_request = None
        if self.kv is not None:
            kv_request = KVRequest.from_summaries(summaries, [self.config.slots[g][0] for g in range(self.world)])
            if self.pool is not None:
                new_bytes, self.new_slack = handoff_buffer_bytes(
                    self.specs, kv_request.layout, self.config.degree, self.new_degree,
                    self.pool.mapped_buffer_bytes, granularity=self.pool.granularity,
                    max_buffer_bytes=self.pool.max_buffer_bytes, pool_bytes=self.kv_pool_bytes,
                    slack_bytes=self.pool.handoff_slack_bytes)
                kv_request = dataclasses.replace(kv_request, new_buffer_bytes=new_bytes)
        return plan_retp(self.config, self.new_degree, self.specs, kv=kv_request, placement=self.placement,
                         scratch_bytes=self.scratch_bytes)

    def prepare(self) -> None:
        """Allocate everything the move needs; nothing is written to the weights or the KV cache."""
        plan, rank = self.plan, self.rank
        self.memory.attach_device(self.device)
        self.memory.begin_phase("prepare")
        pull = self.transport_kind == "samehost"
        if pull:
            self.transport = SameHostTransport(rank, self.world, [g["samehost"] for g in self.gathered],
                                               self.counter, self.control, self.control.timeout_s)
            try:
                self.transport.probe([r for r in range(self.world) if r != rank])  # access problems surface now
            except PeerGone as e:
                # Plans are compared after preparing: a peer may have exited (having reported why, or not) before
                # this rank could read it. That is the peer's failure, not this rank's.
                gone = [p for p in e.peers if not _process_alive(self.gathered[p]["samehost"]["pid"])]
                if gone:
                    raise PeerFailure(self.control.failures(), unresponsive=gone) from None
                raise
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # peers read these buffers once all agree: finish writing them
        else:
            self.transport = TorchDistTransport(self.group, control=self.control,
                                                stage_via_host=self.stage_via_host)
        self.progress = Progress(plan, rank)
        # This rank's programs: every copy, message, pull and scratch offset of the move, decided by the plan.
        self.weight_program = build_weight_program(plan, rank, pull=pull)
        self.kv_program = build_kv_program(plan, rank, pull=pull) if plan.kv is not None else None
        rounds = [wr.round for wr in self.weight_program.rounds] + (self.kv_program.rounds if self.kv_program else [])
        kv_scratch = self.kv_program.scratch_bytes if self.kv_program else 0
        self.scratch_need = max(self.weight_program.scratch_bytes, kv_scratch)
        if self.device.type == "cuda" and any(op.kind == "compact" for op in self.weight_program.release):
            self.scratch_need = max(self.scratch_need, min(plan.scratch_bytes, 1 << 20))  # CUDA compaction stages
        if self.scratch_need > plan.scratch_bytes:
            raise ScratchBudgetError(f"rank {rank}: the plan's rounds lay out {self.scratch_need} bytes of scratch, "
                                     f"above the budget of {plan.scratch_bytes}")
        # The KV step's scratch may live in the dead tail of a weight storage that the weights step leaves behind
        # (a shard that shrinks to a view of its old storage): memory the rank holds and has touched already, so
        # no page is faulted in (first touches cost a few ms per 10 MiB on a host) and nothing is added.
        kv_borrowed = self.dead_weight_tail(kv_scratch) if kv_scratch > self.weight_program.scratch_bytes else None
        if kv_borrowed is not None:
            self.scratch_need = max(self.weight_program.scratch_bytes,
                                    self.scratch_need if self.device.type == "cuda" else 0)
        self.scratch = torch.empty(self.scratch_need, dtype=torch.uint8, device=self.device)
        self.memory.add(self.scratch_need)
        if self.kv_program is not None:
            self.memory.add(self.kv_program.host_bytes)
        self.executor = Executor(self.transport, self.scratch, self.progress, self.memory,
                                 return_freed=self.pool is not None, kv_scratch=kv_borrowed)
        sends = max((r.send_bytes for r in rounds), default=0)
        recvs = max((r.recv_bytes for r in rounds), default=0)
        staging = self.transport.reserve_staging(sends, recvs)
        self.memory.add(staging)
        self.memory_bound = plan.largest_new_shard_bytes(rank) + self.scratch_need + staging
        self.steps = ["weights", "kv"] if plan.kv is not None else ["weights"]
        if self.pool is not None:
            old_bytes, new_bytes = plan.kv.buffer_bytes, plan.kv.new_buffer_bytes
            if new_bytes > old_bytes:    # a merge: free the weight bytes, map them into the pool, then move KV
                self.steps = ["weights", "grow", "kv"]
            elif new_bytes < old_bytes:  # a split: pack the KV cache into what stays, unmap the tail, then weights
                self.steps = ["kv", "shrink", "weights"]
                self.shrink_to = self.split_headroom(new_bytes)
                if self.shrink_to < new_bytes:  # free tail room held back while the larger shards are built
                    self.steps.append("regrow")
                reaching = [r.views_beyond(new_bytes) for layer in self.pool.regions for r in layer]
                if any(reaching):
                    raise ConfigError(f"{sum(reaching)} views of the elastic KV pool reach beyond the {new_bytes} "
                                      f"bytes per buffer it keeps at degree {self.new_degree}: drop every view of the "
                                      f"pool (and KVCache objects holding them) before a split")

    def dead_weight_tail(self, nbytes: int) -> Optional[torch.Tensor]:
        """A uint8 view of `nbytes` bytes that no tensor of the call uses once the weights step is done: the
        storage beyond a shard that becomes a view of (or is compacted inside) its old storage. Only on CPU, when
        the shards keep their storage (not release_storage, no elastic pool), and only in a storage that no other
        weight or KV buffer shares. None when there is none large enough."""
        if nbytes <= 0 or self.device.type != "cpu" or self.release_storage or self.pool is not None:
            return None
        owners: Dict[int, int] = {}
        for t in self.weights.values():
            key = t.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
        kv_ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                     for layer in (self.kv.physical_buffers() if self.kv is not None else []) for b in layer]
        align = 64
        for op in self.weight_program.release:  # view and compact ops: the new shard sits at the storage's start
            old = self.weights[op.name]
            storage = old.untyped_storage()
            base = storage.data_ptr()
            if owners.get(base, 0) != 1:
                continue
            used_end = (old.storage_offset() + op.view_offset) * old.element_size() + op.new_nbytes
            start = -(-(base + used_end) // align) * align - base
            if start + nbytes > storage.nbytes():
                continue
            if any(lo < base + start + nbytes and base + start < hi for lo, hi in kv_ranges):
                continue
            flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
            return flat[start:start + nbytes]
        return None

    def split_headroom(self, new_bytes: int) -> int:
        """Buffer bytes to keep mapped during a split's weights step. The weights peak above their final size (each
        larger shard is allocated while its old one is alive: storage_overshoot_bytes); where the new pool's live
        blocks leave room at its tail, that much more is unmapped until the weights are done, so weights + mapped
        KV never exceed max(before, after). Returns new_bytes when there is nothing to hold back."""
        overshoot = storage_overshoot_bytes(self.plan, self.weight_program, release_storage=True)
        kvp, layout = self.plan.kv, self.plan.kv.layout
        if overshoot <= 0:
            return new_bytes
        per_buffer = -(-overshoot // (layout.num_layers * layout.num_buffers))
        granularity = self.pool.granularity
        mine = kvp.move_new_block[kvp.move_dest == self.plan.new.slots[self.rank][0]]
        used = max(int(mine.max()) + 1 if mine.size else 0, layout.reserved_blocks)
        # The last byte a live block occupies (vLLM FlashAttention keeps V after all K regions of the buffer).
        last = max(int(layout.region_index(c, used - 1, kvp.new_num_blocks)) for c in range(layout.num_components)) \
            if used else -1
        floor = -(-((last + 1) * layout.region_bytes(kvp.new_degree)) // granularity) * granularity
        floor = max([floor] + [r.view_extent for layer in self.pool.regions for r in layer])  # the caller's views
        target = -(-(new_bytes - per_buffer) // granularity) * granularity if per_buffer < new_bytes else 0
        return min(new_bytes, max(floor, target))

    def move_and_confirm(self) -> RetpResult:
        plan, transport = self.plan, self.transport
        watchdog = None
        if transport.backend == "nccl":
            watchdog = Watchdog(self.control, self.control.timeout_s, transport.abort).start()
            transport.on_progress = watchdog.kick
        phase = "move"
        stats = RetpStats(scratch_bytes=self.scratch_bytes, transport=self.transport_kind,
                          scratch_allocated_bytes=self.scratch_need)
        try:
            transport.connect(self.device)
            for step in self.steps:
                self.run_step(step, stats)
            self.memory.end_phase()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.t["moved"] = time.perf_counter()
            kv_result = self.kv_result() if plan.kv is not None else None
            if self.pool is not None:
                self.pool.handoff_slack_bytes = self.new_slack
            if watchdog is not None:
                watchdog.stop()
            phase = "confirm"
            failpoints.hit("confirm")
            self.control.exchange("confirm", True)
            if self.control.decide("commit") != "commit":
                raise PeerFailure(self.control.failures())  # a rank gave up before everyone had confirmed
        except BaseException as e:  # noqa: BLE001 - every failure here becomes a damage report
            if watchdog is not None:
                watchdog.stop()
            # The frames of the failed step hold views of the buffers (an elastic pool could not shrink back).
            traceback.clear_frames(e.__traceback__)
            if not self.committed_anyway(phase):
                self.fail_after_move_began(phase, e, aborted=transport.aborted or bool(watchdog and watchdog.fired))
        self.t["confirm"] = time.perf_counter()
        stats.bytes_received_from = list(transport.bytes_from)
        del self.scratch
        self.executor.kv_scratch = None
        self.memory.sub(self.scratch_need)
        kv_growth = 0
        if self.pool is not None:
            kv_growth = (plan.kv.new_buffer_bytes - plan.kv.buffer_bytes) * len(self.pool.regions) * \
                plan.kv.layout.num_buffers
        memory = self.memory.report(steady_growth_bytes=plan.weight_growth_bytes(self.rank) + kv_growth,
                                    trim=self.pool is not None)
        stats.peak_extra_bytes = memory["tracked"]
        stats.weight_peak_extra_bytes = memory["tracked_phases"].get("weights", 0)
        stats.kv_peak_extra_bytes = memory["tracked_phases"].get("kv", 0)
        stats.measured_peak_extra_bytes = memory["measured"]
        stats.measured_weight_peak_extra_bytes = memory["measured_phases"].get("weights")
        stats.measured_kv_peak_extra_bytes = memory["measured_phases"].get("kv")
        stats.measured_host_peak_extra_bytes = memory["host"]
        stats.measured_driver_peak_extra_bytes = memory["driver"]
        stats.memory_measurement = memory["method"]
        stats.memory_bound_bytes = self.memory_bound
        stats.measured_memory_bytes = memory["absolute"]
        t = self.t
        stats.seconds = {"plan": t["plan"] - t["start"], "agree": t["agree"] - t["plan"],
                         "prepare": t["prepare"] - t["agree"], "weights": self.seconds.get("weights", 0.0),
                         "kv": self.seconds.get("kv", 0.0), "resize": self.seconds.get("resize", 0.0),
                         "confirm": t["confirm"] - t["moved"], "total": t["confirm"] - t["start"]}
        return RetpResult(plan.new, plan.new.slot(self.rank), self.weights, kv_result, plan, stats)

    def committed_anyway(self, phase: str) -> bool:
        """Record this rank's "abort" as the call's decision unless one was made already. A rank that failed
        while confirming had finished moving: if every rank had confirmed and the call was committed before it gave
        up, it returns success like the others (one decision for the whole call)."""
        try:
            return self.control.decide("abort") == "commit" and phase == "confirm"
        except PeerFailure:
            return False

    def run_step(self, step: str, stats: RetpStats) -> None:
        """One step of the move phase: "weights", "kv", or resizing the elastic KV pool ("grow", "shrink")."""
        t0 = time.perf_counter()
        transport = self.transport
        if step == "weights":
            sent, received = transport.bytes_sent, transport.bytes_received
            self.memory.begin_phase("weights")
            self.executor.run_weights(self.weight_program, self.weights, self.release_storage)
            stats.weight_bytes_sent = transport.bytes_sent - sent
            stats.weight_bytes_received = transport.bytes_received - received
        elif step == "kv":
            sent, received = transport.bytes_sent, transport.bytes_received
            self.memory.begin_phase("kv")
            self.executor.run_kv(self.kv_program, self.kv.physical_buffers())
            self.memory.sub(self.kv_program.host_bytes)
            stats.kv_bytes_sent = transport.bytes_sent - sent
            stats.kv_bytes_received = transport.bytes_received - received
        else:
            if step == "grow":
                return_freed_memory(self.device)  # the shards the weights step released, back to the OS / driver
            self.memory.begin_phase("kv")
            target = self.plan.kv.new_buffer_bytes
            if step == "shrink":
                self.progress.kv_tail_unmapped = True  # set first: a failing unmap may have released some of it
                target = self.shrink_to
            if step == "regrow":
                return_freed_memory(self.device)  # the old shards the weights step released
            self.pool.resize(target)
            self.memory.sample()
            step = "resize"
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0

    def kv_result(self) -> KVResult:
        """This rank's KV cache at the new degree: views of the (resized) pool or of the same buffers."""
        kvp, layout = self.plan.kv, self.plan.kv.layout
        n_new, degree = kvp.new_num_blocks, kvp.new_degree
        if self.pool is not None:
            layers, buffers = self.pool.layers(n_new, degree), []
        else:
            buffers = self.kv.physical_buffers()
            layers = [layout.views(bufs, n_new, degree) for bufs in buffers]
        per_rank_buffers = layout.num_layers * layout.num_buffers

        def tokens(blocks):
            return max(0, blocks - layout.reserved_blocks) * layout.block_size

        no_handoff = layout.num_blocks_for(kvp.buffer_bytes, degree)
        capacity = {"old_blocks": kvp.old_num_blocks, "new_blocks": n_new, "no_handoff_blocks": no_handoff,
                    "old_tokens": tokens(kvp.old_num_blocks), "new_tokens": tokens(n_new),
                    "no_handoff_tokens": tokens(no_handoff), "old_buffer_bytes": kvp.buffer_bytes,
                    "new_buffer_bytes": kvp.new_buffer_bytes,
                    "mapped_bytes": max(0, kvp.new_buffer_bytes - kvp.buffer_bytes) * per_rank_buffers,
                    "unmapped_bytes": max(0, kvp.buffer_bytes - kvp.new_buffer_bytes) * per_rank_buffers}
        instance = self.plan.new.slots[self.rank][0]
        return KVResult(layers, n_new, kvp.block_tables(instance), dict(kvp.destinations), buffers, capacity,
                        cached_blocks=kvp.cached_blocks(instance), moves=(kvp, instance))

    def fail_after_move_began(self, phase: str, error: BaseException, aborted: bool):
        """Moving had begun: tell every rank, gather what each holds now, raise TransformationFailed on all."""
        control = self.control
        unresponsive = []
        if isinstance(error, PeerFailure):
            unresponsive = list(error.unresponsive)
            if unresponsive or error.store_error:
                control.report_failure(phase, error)
        else:
            if isinstance(error, (ExchangeTimeout, PeerGone)):
                unresponsive = [p for p in error.peers]
            control.report_failure(phase, error)
        try:
            failures = control.failures()
        except PeerFailure:
            failures = []
        first = failures[0] if failures else None
        failed_rank = first["rank"] if first else None
        cause = f"{first['type']}: {first['message']}" if first else f"{type(error).__name__}: {error}"
        fail_phase = first["phase"] if first else phase
        wait_for = [r for r in range(self.world) if r != self.rank]
        reports = control.collect("damage", self.progress.local_report(), wait_for,
                                  min(control.timeout_s, DAMAGE_GRACE_S))
        reports[self.rank] = self.progress.local_report()
        damage = assemble_damage(self.plan, reports, phase=fail_phase, failed_rank=failed_rank, cause=cause)
        silent = sorted((set(damage.unresponsive_ranks) | set(unresponsive)) - set(damage.reported_ranks))
        message = (f"retp {self.plan.old.describe()} -> {self.plan.new.describe()} failed after moving began: "
                   + (f"rank {failed_rank} failed in phase {fail_phase}: {cause}" if first else str(error))
                   + (f"; ranks {silent} did not report" if silent else "")
                   + ("; the process group was aborted and cannot be used again" if aborted else "")
                   + f". {damage.summary()}")
        raise TransformationFailed(message, damage=damage, plan=self.plan, phase=fail_phase,
                                   failed_rank=failed_rank, cause=cause, unresponsive_ranks=silent,
                                   group_aborted=aborted) from error
