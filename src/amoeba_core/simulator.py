"""A discrete-event simulation of TP instances serving a request trace, statically or under a TPPolicy.

Used by bench/simulate.py (traces, sweeps, plots) and by the step-level consistency check with an engine
(policy_decisions below). Everything is a parameter; the defaults are public H100 figures (Hardware).

Serving model, per instance of degree d (one step = one forward pass over the instance's batch):
  compute  2 * matmul params * tokens + 2 * vocab * hidden per sampled sequence + attention 4 * layers * q_heads *
           head_dim per (query token, attended token), divided over d GPUs at peak_flops * compute_efficiency
  memory   the weight bytes of one GPU at d, plus the KV bytes each GPU reads (attended tokens * KV bytes per token
           per GPU at d), at hbm_bytes_per_s * memory_efficiency
  step     step_overhead_s + max(compute, memory) + 2 all-reduces per layer for d > 1, each
           allreduce_latency_s + 2 (d-1)/d * tokens * hidden * activation bytes / link_bytes_per_s
Scheduling (per instance, vLLM-like continuous batching): every step decodes one token of each running request and
prefills waiting prompts in FIFO order with the rest of a max_batched_tokens budget (chunked prefill; None: whole
prompts). A prompt's last chunk yields its first token. Admission reserves a request's whole lifetime of KV blocks,
ceil((prompt + output - 1) / block_size) (the output length is known from the trace; the reference engine does the
same with max_new_tokens), so nothing is ever preempted. Requests wait in one global FIFO queue; at each of its step
boundaries an instance admits every queued request that fits its unreserved blocks (later ones may pass one that
does not fit), at most max_num_seqs running; with reserve=True the first queued request it could hold but cannot
yet, and that no other instance has room for now, reserves it (it admits nothing else until that one fits)
so long requests are not starved. With dispatch="size" (size-aware routing) an instance first takes the queued
requests that no smaller serving instance could hold, and leaves a request to a smaller instance that has room for
it now (that one takes it at its step boundary), so instances merged for long requests are not filled with short
ones that smaller instances would serve. A request no instance of any reachable degree can hold is unserved.
Transformations: the instances named by an action finish their current step, then serve nothing for the cost
model's seconds (computed from the live tokens at that moment); the resulting instances then resume with every
request of the old ones (a split places them as the policy's destinations say). While it runs, the policy sees the
resulting instances with transforming=True.
Policy calls: at every multiple of policy_interval, and at once when a request arrives that no instance can hold.
Events at one time run in the order: arrivals, step ends, the policy, transformation ends, step starts (so at a
step boundary the policy sees the state after the previous step, as an engine's scheduler would).
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .capacity import H100_80GB_MEMORY_BYTES, kv_bytes_per_token_per_gpu, weight_bytes_per_gpu
from .errors import ConfigError
from .layout import llama_param_specs, model_dims
from .policy import ClusterState, InstanceState, Merge, PolicyParams, Split, TPPolicy, ZeroCost


# ---- the serving model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Defaults: NVIDIA H100 SXM5 80GB datasheet (989.4 dense bf16 TFLOP/s, 3.35 TB/s HBM3,
    NVLink 900 GB/s both ways); link_bytes_per_s the low end of measured NCCL send/recv over NVLink (180-370 GB/s,
    ../shared/reference/conventions.md). Assumptions, not measurements: the two efficiencies (fractions of peak
    that serving kernels reach), allreduce_latency_s (a small NCCL all-reduce inside one NVLink node) and
    step_overhead_s (scheduling and launch per step)."""

    name: str = "H100-SXM5-80GB"
    peak_flops: float = 989.4e12
    hbm_bytes_per_s: float = 3.35e12
    memory_bytes: int = H100_80GB_MEMORY_BYTES
    link_bytes_per_s: float = 180e9
    allreduce_latency_s: float = 15e-6
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.8
    step_overhead_s: float = 2e-3


@dataclass(frozen=True)
class ModelShape:
    """What the serving model needs of a model: dims, matmul parameters, and per-degree bytes per GPU."""

    num_layers: int
    hidden: int
    num_heads: int
    head_dim: int
    vocab: int
    matmul_params: int                     # every per-layer weight matrix (not embeddings / LM head / norms)
    activation_bytes: int                  # bytes of one activation element (the all-reduce payload)
    weight_bytes: Mapping[int, int]        # degree -> weight bytes per GPU
    kv_bytes_per_token: Mapping[int, int]  # degree -> KV bytes per token per GPU

    @classmethod
    def from_config(cls, hf_config: Mapping, layout, degrees: Sequence[int], dtype: Optional[str] = None):
        """From an HF-style config (llama_param_specs) and the KV layout, for the given degrees."""
        specs = llama_param_specs(hf_config, dtype=dtype)
        dims = model_dims(hf_config)
        matmul = 0
        for s in specs:
            if ".layers." in s.name and s.name.endswith(".weight") and len(s.shape) == 2:
                matmul += s.shape[0] * s.shape[1]
        act = 2 if specs[0].itemsize < 2 else specs[0].itemsize
        return cls(dims["layers"], dims["hidden"], dims["heads"], dims["head_dim"], dims["vocab"], matmul, act,
                   {d: weight_bytes_per_gpu(specs, d) for d in degrees},
                   {d: kv_bytes_per_token_per_gpu(layout, d) for d in degrees})


class RooflineTime:
    """Seconds per step of an instance (see the module docstring). All sizes are per step of one instance."""

    def __init__(self, shape: ModelShape, hardware: Hardware = Hardware()):
        self.shape, self.hw = shape, hardware
        self._flops_per_s = hardware.peak_flops * hardware.compute_efficiency
        self._bytes_per_s = hardware.hbm_bytes_per_s * hardware.memory_efficiency
        self._attn = 4 * shape.num_layers * shape.num_heads * shape.head_dim   # FLOPs per (query, key) pair

    def allreduce_seconds(self, degree: int, tokens: int) -> float:
        if degree == 1 or tokens == 0:
            return 0.0
        payload = tokens * self.shape.hidden * self.shape.activation_bytes
        one = self.hw.allreduce_latency_s + 2 * (degree - 1) / degree * payload / self.hw.link_bytes_per_s
        return 2 * self.shape.num_layers * one

    def step_seconds(self, degree: int, chunks: Sequence[Tuple[int, int]], num_decode: int, decode_ctx: int,
                     sampled: Optional[int] = None) -> float:
        """One step: prefill chunks [(offset, tokens)] and num_decode decodes attending decode_ctx tokens in all
        (each decode attends its cached tokens and itself). sampled: sequences sampled (default: the decodes and
        the chunks)."""
        s = self.shape
        tokens = num_decode + sum(c for _, c in chunks)
        pairs = decode_ctx + sum(c * o + c * (c + 1) // 2 for o, c in chunks)
        read = decode_ctx + sum(o + c for o, c in chunks)
        sampled = num_decode + len(chunks) if sampled is None else sampled
        flops = 2 * s.matmul_params * tokens + 2 * s.vocab * s.hidden * sampled + self._attn * pairs
        compute = flops / degree / self._flops_per_s
        memory = (s.weight_bytes[degree] + s.kv_bytes_per_token[degree] * read) / self._bytes_per_s
        return self.hw.step_overhead_s + max(compute, memory) + self.allreduce_seconds(degree, tokens)

    def _decode_lines(self, degree: int, batch: int):
        """Step time of a decode-only step as max(a1 + b1 * ctx, a2 + b2 * ctx) + c."""
        s = self.shape
        a1 = (2 * s.matmul_params * batch + 2 * s.vocab * s.hidden * batch) / degree / self._flops_per_s
        b1 = self._attn / degree / self._flops_per_s
        a2 = s.weight_bytes[degree] / self._bytes_per_s
        b2 = s.kv_bytes_per_token[degree] / self._bytes_per_s
        c = self.hw.step_overhead_s + self.allreduce_seconds(degree, batch)
        return a1, b1, a2, b2, c

    def decode_seconds(self, degree: int, batch: int, ctx0: int, steps: int) -> float:
        """k = steps decode-only steps of `batch` sequences attending ctx0 tokens at the first step (ctx grows by
        batch per step): closed form of the sum of the per-step roofline."""
        if steps <= 0:
            return 0.0
        a1, b1, a2, b2, c = self._decode_lines(degree, batch)

        def linear_sum(a, b, j0, j1):  # sum_{j=j0}^{j1-1} a + b * (ctx0 + j * batch)
            n = j1 - j0
            return n * (a + b * ctx0) + b * batch * (j1 * (j1 - 1) - j0 * (j0 - 1)) / 2

        # Two lines, compute (a1, b1) and memory (a2, b2); the step takes the higher one. They cross at ctx*:
        # steps j < j* (ctx0 + j * batch < ctx*) take the line that is higher at small ctx, the rest the other.
        if b1 == b2 or batch == 0:
            high = (a1, b1) if a1 + b1 * ctx0 >= a2 + b2 * ctx0 else (a2, b2)
            first, second, split = high, high, steps
        else:
            ctx_star = (a2 - a1) / (b1 - b2)
            split = min(max(math.ceil((ctx_star - ctx0) / batch), 0), steps)
            first, second = ((a2, b2), (a1, b1)) if b1 > b2 else ((a1, b1), (a2, b2))
        return steps * c + linear_sum(*first, 0, split) + linear_sum(*second, split, steps)

    def decode_steps_until(self, degree: int, batch: int, ctx0: int, elapsed: float, max_steps: int) -> int:
        """The smallest j <= max_steps with decode_seconds(j) >= elapsed (the step boundary at or after
        `elapsed` into a decode segment)."""
        lo, hi = 0, max_steps
        while lo < hi:
            mid = (lo + hi) // 2
            if self.decode_seconds(degree, batch, ctx0, mid) >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        return lo


class UnitTime:
    """Every step takes one time unit, whatever its batch (the step-level model of an engine loop)."""

    def step_seconds(self, degree, chunks, num_decode, decode_ctx, sampled=None) -> float:
        return 1.0

    def decode_seconds(self, degree, batch, ctx0, steps) -> float:
        return float(max(steps, 0))

    def decode_steps_until(self, degree, batch, ctx0, elapsed, max_steps) -> int:
        return min(max(math.ceil(elapsed - 1e-9), 0), max_steps)


# ---- requests and instances ----------------------------------------------------------------------------------------
class SimRequest:
    """A request of the trace and its progress. Exposes the RequestView attributes the policy reads."""

    __slots__ = ("request_id", "arrival", "prompt_tokens", "output_tokens", "need", "prefilled", "generated",
                 "decode_start", "finish_step", "first_token_time", "finish_time", "instance", "reserved_by",
                 "unserved")

    def __init__(self, request_id, arrival: float, prompt_tokens: int, output_tokens: int, block_size: int):
        if prompt_tokens < 1 or output_tokens < 1:
            raise ConfigError(f"request {request_id}: prompt {prompt_tokens} and output {output_tokens} must be >= 1")
        self.request_id, self.arrival = request_id, arrival
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self.need = -(-(prompt_tokens + output_tokens - 1) // block_size)
        self.prefilled = self.generated = 0
        self.decode_start = self.finish_step = 0
        self.first_token_time = self.finish_time = None
        self.instance = self.reserved_by = None
        self.unserved = False

    @property
    def max_output_tokens(self) -> int:
        return self.output_tokens

    @property
    def waiting_since(self) -> float:
        return self.arrival

    @property
    def generated_tokens(self) -> int:
        inst = self.instance
        if inst is not None and self.request_id in inst.decoding:
            return self.generated + inst.counter - self.decode_start
        return self.generated

    def cached_tokens(self) -> int:
        return self.prefilled + max(self.generated_tokens - 1, 0)


class SimInstance:
    __slots__ = ("iid", "ranks", "blocks_total", "formed_at", "prefilling", "decoding", "finish_heap", "counter",
                 "ctx", "reserved", "state", "seg", "version", "pending", "reserved_for", "start_queued")

    def __init__(self, iid: int, ranks: Tuple[int, ...], blocks_total: int, formed_at: float):
        self.iid, self.ranks, self.blocks_total, self.formed_at = iid, tuple(ranks), blocks_total, formed_at
        self.prefilling: List[SimRequest] = []
        self.decoding: Dict = {}
        self.finish_heap: List = []
        self.counter = 0          # decode steps done (the clock of the decoding requests' progress)
        self.ctx = 0              # tokens the decodes attend at the next step
        self.reserved = 0         # blocks reserved by running requests (their lifetime needs)
        self.state = "idle"       # idle | step | decode | paused | forming | retired
        self.seg = None           # (start, steps, batch, ctx0, chunks, end) of the step(s) under way
        self.version = 0
        self.pending = None       # the transformation this instance is draining for
        self.reserved_for = None  # a queued request this instance holds its room for
        self.start_queued = False

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def running(self) -> List[SimRequest]:
        return self.prefilling + list(self.decoding.values())

    def blocks_used(self, block_size: int) -> int:
        return sum(-(-r.cached_tokens() // block_size) for r in self.running())


# ---- configuration and results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    """block_size: KV tokens per block; max_batched_tokens: tokens per step (decodes + prefill chunks; None:
    unlimited, whole prompts); max_num_seqs: running requests per instance; policy_interval: time between policy
    calls; policy_on_arrival: also call the policy when a request arrives that no instance can hold; reserve: see
    the module docstring; timeline_interval: sample degrees and KV use this often (None: not); stall_timeout: stop
    when only policy calls have happened for this long without a decision (requests still queued then count as
    unserved); dispatch: "fifo" (every instance takes queued requests in arrival order) or "size" (size-aware
    routing, see the module docstring)."""

    block_size: int = 16
    max_batched_tokens: Optional[int] = 2048
    max_num_seqs: int = 256
    policy_interval: float = 1.0
    policy_on_arrival: bool = True
    reserve: bool = True
    timeline_interval: Optional[float] = None
    stall_timeout: float = 3600.0
    dispatch: str = "fifo"

    def __post_init__(self):
        if self.dispatch not in ("fifo", "size"):
            raise ConfigError(f"dispatch must be 'fifo' or 'size', got {self.dispatch!r}")
        if self.max_batched_tokens is not None and self.max_batched_tokens <= self.max_num_seqs:
            raise ConfigError(f"max_batched_tokens {self.max_batched_tokens} must exceed max_num_seqs "
                              f"{self.max_num_seqs} so every step has room for a prefill chunk")


@dataclass
class Transformation:
    kind: str                 # "merge" | "split"
    decided_at: float
    started_at: Optional[float]
    done_at: Optional[float]
    old_degree: int
    new_degree: int
    ranks: Tuple[int, ...]
    live_tokens: int = 0
    action: object = None
    olds: list = field(default_factory=list, repr=False)
    news: list = field(default_factory=list, repr=False)


@dataclass
class SimResult:
    requests: List[SimRequest]
    transformations: List[Transformation]
    timeline: List[Tuple[float, List[Tuple[int, int, int]]]] = field(default_factory=list)  # (t, [(deg, used, total)])
    end_time: float = 0.0
    decisions: List[Tuple[float, object]] = field(default_factory=list)


# ---- the simulator ---------------------------------------------------------------------------------------------
_ARRIVAL, _STEP_END, _POLICY, _TRANSFORM_DONE, _START = range(5)


class Simulator:
    """Simulate `start` (a list of instance degrees over consecutive ranks, e.g. [1, 1, 2]) serving requests.

    capacity_blocks: degree -> usable KV blocks of one instance (capacity.py, with or without the handoff; a static
    instance at degree d holds capacity_blocks[d]); time_model: RooflineTime or UnitTime; policy: a TPPolicy (None:
    the configuration never changes); cost_model: predicted seconds of transformations (default: the policy's).
    """

    def __init__(self, start: Sequence[int], capacity_blocks: Mapping[int, int], time_model, *,
                 policy: Optional[TPPolicy] = None, cost_model=None, config: SimConfig = SimConfig()):
        missing = sorted({d for d in start if d not in capacity_blocks})
        if missing:
            raise ConfigError(f"no KV capacity given for degrees {missing}")
        self.capacity_blocks = dict(capacity_blocks)
        self.time, self.policy, self.cfg = time_model, policy, config
        self.cost_model = cost_model if cost_model is not None else (policy.cost_model if policy else ZeroCost())
        self.instances: List[SimInstance] = []
        self._next_iid = 0
        rank = 0
        for d in start:
            self.instances.append(self._new_instance(tuple(range(rank, rank + d)), -math.inf))
            rank += d
        self.world_size = rank
        reachable = policy.params.degrees if policy is not None else sorted(set(start))
        self.max_blocks = max(capacity_blocks[d] for d in reachable if d <= self.world_size)
        self.queue: "OrderedDict[object, SimRequest]" = OrderedDict()
        self.long_queue: "OrderedDict[object, SimRequest]" = OrderedDict()   # queued and above the lowest degree
        self._long = (policy.params.capacity_blocks[policy.params.degrees[0]] if policy is not None
                      else math.inf)
        self.events: List = []
        self._seq = 0
        self.transformations: List[Transformation] = []
        self.decisions: List[Tuple[float, object]] = []
        self.timeline: List = []
        self.now = 0.0
        self._arrived: List[SimRequest] = []        # since the last policy call (its load window)

    def _new_instance(self, ranks, formed_at) -> SimInstance:
        inst = SimInstance(self._next_iid, ranks, self.capacity_blocks[len(ranks)], formed_at)
        self._next_iid += 1
        return inst

    # ---- events ----------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj=None, version: int = 0, order: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, order, self._seq, obj, version))

    def _queue_start(self, inst: SimInstance, t: float) -> None:
        if not inst.start_queued:
            inst.start_queued = True
            self._push(t, _START, inst, order=inst.ranks[0])

    def run(self, requests: Sequence[Tuple[float, int, int]]) -> SimResult:
        """requests: (arrival time, prompt tokens, output tokens), any order; request ids are their indices."""
        reqs = [SimRequest(i, float(a), int(p), int(o), self.cfg.block_size) for i, (a, p, o) in enumerate(requests)]
        for r in reqs:
            self._push(r.arrival, _ARRIVAL, r)
        self._outstanding = len(reqs)
        if self.policy is not None:
            self._push(0.0, _POLICY, "tick")
        if self.cfg.timeline_interval:
            self._push(0.0, _POLICY, "sample")
        last_progress = 0.0
        while self.events:
            t, kind, _, _, obj, version = heapq.heappop(self.events)
            self.now = t
            if kind != _POLICY:
                last_progress = t
            if kind == _ARRIVAL:
                self._arrive(obj)
            elif kind == _STEP_END:
                if version == obj.version:
                    self._end_step(obj)
            elif kind == _POLICY:
                if obj == "sample":
                    self._sample()
                elif self._decide():
                    last_progress = t
                if obj in ("tick", "sample") and self._outstanding:
                    stalled = (t - last_progress > self.cfg.stall_timeout
                               and all(e[1] == _POLICY for e in self.events))
                    if not stalled:
                        interval = self.cfg.policy_interval if obj == "tick" else self.cfg.timeline_interval
                        self._push(t + interval, _POLICY, obj)
            elif kind == _TRANSFORM_DONE:
                self._finish_transformation(obj)
            elif kind == _START:
                obj.start_queued = False
                self._start(obj)
        for r in reqs:
            if r.finish_time is None and not r.unserved:
                r.unserved = True        # left waiting when the events ran out (no instance ever took it)
        return SimResult(reqs, self.transformations, self.timeline, self.now, self.decisions)

    # ---- arrivals and admission --------------------------------------------------------------------------------
    def _active(self) -> List[SimInstance]:
        return [i for i in self.instances if i.state not in ("retired",)]

    def _arrive(self, r: SimRequest) -> None:
        if r.need > self.max_blocks:
            r.unserved = True
            self._outstanding -= 1
            return
        self.queue[r.request_id] = r
        if self.policy is not None:
            self._arrived.append(r)
        if r.need > self._long:
            self.long_queue[r.request_id] = r
        serving = [i for i in self._active() if i.state in ("idle", "step", "decode")]
        if (self.policy is not None and self.cfg.policy_on_arrival
                and r.need > max((i.blocks_total for i in self._active()), default=0)):
            self._push(self.now, _POLICY, "arrival")
        idle = [i for i in serving if i.state == "idle" and i.pending is None]
        for inst in idle:
            self._queue_start(inst, self.now)
        if idle:
            return
        fits = [i for i in serving if i.state == "decode" and i.pending is None and i.reserved_for is None
                and r.need <= i.blocks_total - i.reserved and self._num_running(i) < self.cfg.max_num_seqs]
        for inst in fits:                 # each stops at its next step boundary; the first one there takes it
            self._cut(inst, self.now)

    def _num_running(self, inst: SimInstance) -> int:
        return len(inst.prefilling) + len(inst.decoding)

    def _admit(self, inst: SimInstance) -> None:
        room = inst.blocks_total - inst.reserved
        if inst.reserved_for is not None:
            r = inst.reserved_for
            if r.need > room or self._num_running(inst) >= self.cfg.max_num_seqs:
                return
            inst.reserved_for = r.reserved_by = None
            self._take(inst, r)
            room -= r.need
        queued = list(self.queue.values())
        smaller = []
        if self.cfg.dispatch == "size":
            smaller = [o for o in self._serving() if o.blocks_total < inst.blocks_total]
            if smaller:               # requests only this size of instance holds go first
                fits_small = max(o.blocks_total for o in smaller)
                queued = [r for r in queued if r.need > fits_small] + [r for r in queued if r.need <= fits_small]
        for r in queued:
            if self._num_running(inst) >= self.cfg.max_num_seqs:
                break
            if r.reserved_by is not None:
                continue
            if r.need <= room:
                if smaller and any(self._has_room(o, r) for o in smaller):
                    continue          # a smaller instance takes it at its step boundary
                self._take(inst, r)
                room -= r.need
            elif self.cfg.reserve and r.need <= inst.blocks_total and not self._room_elsewhere(inst, r):
                inst.reserved_for, r.reserved_by = r, inst
                break

    def _room_elsewhere(self, inst: SimInstance, r: SimRequest) -> bool:
        """Another serving instance has the unreserved blocks for r now (it will take r at its boundary)."""
        return any(o is not inst and self._has_room(o, r) for o in self.instances)

    def _has_room(self, o: SimInstance, r: SimRequest) -> bool:
        return (o.pending is None and o.reserved_for is None and o.state in ("idle", "step", "decode")
                and r.need <= o.blocks_total - o.reserved and self._num_running(o) < self.cfg.max_num_seqs)

    def _serving(self) -> List[SimInstance]:
        return [o for o in self.instances if o.pending is None and o.state in ("idle", "step", "decode")]

    def _take(self, inst: SimInstance, r: SimRequest) -> None:
        del self.queue[r.request_id]
        self.long_queue.pop(r.request_id, None)
        r.instance = inst
        inst.reserved += r.need
        inst.prefilling.append(r)

    # ---- steps ---------------------------------------------------------------------------------------------------
    def _start(self, inst: SimInstance) -> None:
        if inst.state != "idle":
            return                        # busy, transforming or gone
        if inst.pending is not None:
            self._pause(inst)
            return
        self._admit(inst)
        t = self.now
        if inst.prefilling:
            budget = (math.inf if self.cfg.max_batched_tokens is None
                      else self.cfg.max_batched_tokens - len(inst.decoding))
            chunks = []
            for r in inst.prefilling:
                if budget <= 0:
                    break
                c = int(min(r.prompt_tokens - r.prefilled, budget))
                chunks.append((r, r.prefilled, c))
                budget -= c
            sampled = len(inst.decoding) + sum(1 for r, o, c in chunks if o + c == r.prompt_tokens)
            dt = self.time.step_seconds(inst.degree, [(o, c) for _, o, c in chunks], len(inst.decoding), inst.ctx,
                                        sampled)
            inst.state, inst.seg = "step", (t, 1, len(inst.decoding), inst.ctx, chunks, t + dt)
        elif inst.decoding:
            steps = inst.finish_heap[0][0] - inst.counter
            dt = self.time.decode_seconds(inst.degree, len(inst.decoding), inst.ctx, steps)
            inst.state, inst.seg = "decode", (t, steps, len(inst.decoding), inst.ctx, None, t + dt)
        else:
            inst.state, inst.seg = "idle", None
            return
        inst.version += 1
        self._push(t + dt, _STEP_END, inst, inst.version)

    def _cut(self, inst: SimInstance, t: float) -> float:
        """End the instance's work at its first step boundary at or after t; returns that time."""
        if inst.state == "step":
            return inst.seg[5]
        if inst.state != "decode":
            return t
        start, steps, batch, ctx0, _, end = inst.seg
        j = self.time.decode_steps_until(inst.degree, batch, ctx0, t - start, steps)
        if j < steps:
            end = start + self.time.decode_seconds(inst.degree, batch, ctx0, j)
            inst.seg = (start, j, batch, ctx0, None, end)
            inst.version += 1
            self._push(end, _STEP_END, inst, inst.version)
        return end

    def _end_step(self, inst: SimInstance) -> None:
        t = self.now
        start, steps, batch, ctx0, chunks, _ = inst.seg
        inst.counter += steps
        inst.ctx += steps * batch
        if chunks is not None:
            for r, o, c in chunks:
                r.prefilled = o + c
                if r.prefilled == r.prompt_tokens:
                    inst.prefilling.remove(r)
                    r.first_token_time = t
                    r.generated = 1
                    if r.output_tokens == 1:
                        self._finish(inst, r)
                    else:
                        r.decode_start = inst.counter
                        r.finish_step = inst.counter + r.output_tokens - 1
                        inst.decoding[r.request_id] = r
                        heapq.heappush(inst.finish_heap, (r.finish_step, r.request_id))
                        inst.ctx += r.prompt_tokens + 1
        while inst.finish_heap and inst.finish_heap[0][0] <= inst.counter:
            _, rid = heapq.heappop(inst.finish_heap)
            r = inst.decoding.pop(rid)
            r.generated = r.output_tokens
            inst.ctx -= r.prompt_tokens + r.output_tokens
            self._finish(inst, r)
        inst.state, inst.seg = "idle", None
        if inst.pending is not None:
            self._pause(inst)
        else:
            self._queue_start(inst, t)

    def _finish(self, inst: SimInstance, r: SimRequest) -> None:
        r.finish_time = self.now
        inst.reserved -= r.need
        self._outstanding -= 1

    # ---- the policy and transformations --------------------------------------------------------------------------
    def snapshot(self) -> ClusterState:
        bs = self.cfg.block_size
        views = []
        for inst in sorted(self._active(), key=lambda i: i.ranks[0]):
            if inst.pending is not None:
                continue                  # being replaced: the forming instances stand for it
            forming = inst.state == "forming"
            views.append(InstanceState(inst.iid, inst.ranks, inst.blocks_total,
                                       0 if forming else inst.blocks_used(bs),
                                       running=() if forming else tuple(inst.running()),
                                       formed_at=inst.formed_at, transforming=forming))
        # Only the oldest queued request and those an instance of the lowest degree cannot hold affect a decision.
        waiting = list(self.long_queue.values())
        if self.queue:
            oldest = next(iter(self.queue.values()))
            if oldest.request_id not in self.long_queue:
                waiting.insert(0, oldest)
        arrivals, self._arrived = tuple(self._arrived), []
        return ClusterState(self.now, tuple(views), tuple(waiting), arrivals)

    def _sample(self) -> None:
        bs = self.cfg.block_size
        self.timeline.append((self.now, [(i.degree, i.blocks_used(bs), i.blocks_total)
                                         for i in sorted(self._active(), key=lambda i: i.ranks[0])
                                         if i.pending is None]))   # a transformation counts as its result

    def _decide(self) -> bool:
        actions = self.policy.decide(self.snapshot())
        for action in actions:
            self.decisions.append((self.now, action))
            self._apply(action)
        return bool(actions)

    def _apply(self, action) -> None:
        by_id = {i.iid: i for i in self._active()}
        if isinstance(action, Merge):
            olds = [by_id[i] for i in action.instances]
            news = [(tuple(action.ranks), action.new_degree)]
            kind = "merge"
        elif isinstance(action, Split):
            olds = [by_id[action.instance]]
            g = action.new_degree
            news = [(tuple(action.ranks[j:j + g]), g) for j in range(0, len(action.ranks), g)]
            kind = "split"
        else:
            raise ConfigError(f"unknown action {action!r}")
        for inst in olds:
            if inst.state in ("forming", "paused") or inst.pending is not None:
                raise ConfigError(f"the policy acted on instance {inst.iid}, which is already transforming")
        record = Transformation(kind, self.now, None, None, olds[0].degree, news[0][1], tuple(action.ranks),
                                action=action)
        record.olds = olds
        record.news = [self._new_instance(ranks, self.now) for ranks, _ in news]
        for inst in record.news:
            inst.state = "forming"
        self.instances.extend(record.news)
        self.transformations.append(record)
        for inst in olds:
            inst.pending = record
            if inst.reserved_for is not None:
                inst.reserved_for.reserved_by = None
                inst.reserved_for = None
            if inst.state in ("step", "decode"):
                self._cut(inst, self.now)
            else:
                self._pause(inst)

    def _pause(self, inst: SimInstance) -> None:
        inst.state = "paused"
        record = inst.pending
        if all(i.state == "paused" for i in record.olds):
            self._begin_transformation(record)

    def _begin_transformation(self, record: Transformation) -> None:
        record.started_at = self.now
        olds = record.olds
        for inst in olds:                      # materialise the decoding requests' progress
            for r in inst.decoding.values():
                r.generated += inst.counter - r.decode_start
                r.decode_start = inst.counter
        moving = [r for inst in olds for r in inst.running()]
        record.live_tokens = sum(r.cached_tokens() for r in moving)
        if record.kind == "merge":
            seconds = self.cost_model.merge_seconds(olds[0].degree, [sum(r.cached_tokens() for r in i.running())
                                                                     for i in olds])
            assignment = {r.request_id: 0 for r in moving}
        else:
            assignment = self._split_assignment(record, moving)
            tokens = [0] * len(record.news)
            for r in moving:
                tokens[assignment[r.request_id]] += r.cached_tokens()
            seconds = self.cost_model.split_seconds(record.old_degree, record.new_degree, tokens)
        for inst in olds:
            inst.state = "retired"
        for r in sorted(moving, key=lambda r: (r.arrival, r.request_id)):
            new = record.news[assignment[r.request_id]]
            r.instance = new
            new.reserved += r.need
            if r.first_token_time is None:
                new.prefilling.append(r)
            else:
                r.decode_start = new.counter
                r.finish_step = new.counter + r.output_tokens - r.generated
                new.decoding[r.request_id] = r
                heapq.heappush(new.finish_heap, (r.finish_step, r.request_id))
                new.ctx += r.prompt_tokens + r.generated
        self._push(self.now + seconds, _TRANSFORM_DONE, record)

    def _split_assignment(self, record: Transformation, moving: List[SimRequest]) -> dict:
        hint = dict(getattr(record.action, "destinations", {}) or {})
        out, load = {}, [0] * len(record.news)
        for r in sorted(moving, key=lambda r: -r.need):
            j = hint.get(r.request_id)
            if j is None or not 0 <= j < len(record.news):
                j = min(range(len(load)), key=lambda k: (load[k], k))
            out[r.request_id] = j
            load[j] += r.need
        for j, inst in enumerate(record.news):
            if load[j] > inst.blocks_total:
                raise ConfigError(f"split at t={self.now}: new instance {j} would need {load[j]} blocks of "
                                  f"{inst.blocks_total}")
        return out

    def _finish_transformation(self, record: Transformation) -> None:
        record.done_at = self.now
        for inst in record.news:
            inst.state = "idle"
            inst.formed_at = self.now
            self._queue_start(inst, self.now)


# ---- a predictor for the policy's base degree -----------------------------------------------------------------------
class ReplayPredictor:
    """TPPolicy's predictor (rule 0) by replay: the share of the load window's requests that would have met their
    SLO had num_gpus GPUs served them, from empty, as instances of one degree, found by running the window through
    a static Simulator of that configuration (this module's serving model, capacities and scheduler). A what-if
    simulation of recent load, as configuration searches over a simulator do; here the predictor's model is the
    simulator's own, so in this bench it errs only where the future differs from the window.

    slo(prompt tokens, output tokens) -> (TTFT seconds, TPOT seconds) of a request."""

    def __init__(self, capacity_blocks: Mapping[int, int], time_model, slo, config: SimConfig = SimConfig()):
        self.capacity_blocks, self.time, self.slo = dict(capacity_blocks), time_model, slo
        self.cfg = SimConfig(block_size=config.block_size, max_batched_tokens=config.max_batched_tokens,
                             max_num_seqs=config.max_num_seqs, reserve=config.reserve, dispatch=config.dispatch)

    def attainment(self, degree: int, num_gpus: int, window) -> float:
        """window: WindowRequest objects (arrival, prompt, output, need, ttft_slo_s, tpot_slo_s), arrival order;
        those no instance of the degree holds are left out (merges serve them)."""
        cap = self.capacity_blocks[degree]
        reqs = [w for w in window if w.need <= cap]
        if num_gpus // degree < 1 or not reqs:
            return 0.0
        t0 = reqs[0].arrival
        sim = Simulator([degree] * (num_gpus // degree), self.capacity_blocks, self.time, config=self.cfg)
        res = sim.run([(w.arrival - t0, w.prompt, w.output) for w in reqs])
        met = 0
        for w, r in zip(reqs, res.requests):
            if r.finish_time is None:
                continue
            tpot = (r.finish_time - r.first_token_time) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            met += r.first_token_time - r.arrival <= w.ttft_slo_s and tpot <= w.tpot_slo_s
        return met / len(reqs)


# ---- the step-level entry point for engine consistency tests --------------------------------------------------------
def policy_decisions(start: Sequence[int], capacity_blocks: Mapping[int, int],
                     requests: Sequence[Tuple[int, int, int]], *, block_size: int, params: Optional[PolicyParams] = None,
                     degrees: Optional[Sequence[int]] = None, reserve: bool = True,
                     max_num_seqs: int = 256) -> List[Tuple[int, object]]:
    """The policy's decisions, as (step, action), for a tiny configuration served one decode step per time unit.

    start:           instance degrees over consecutive ranks, e.g. [1, 1, 1, 1]
    capacity_blocks: degree -> usable KV blocks of one instance at that degree
    requests:        (arrival step, prompt tokens, output tokens); request ids are their indices
    params:          the policy's parameters, times in steps (default: degrees = powers of two up to the world size
                     that capacity_blocks lists, no dwell, no split delay, every request's output known)

    Semantics (what an engine loop must do to make the same decisions): at step t, requests with arrival step <= t
    are queued (FIFO); the policy is called once with the state after step t-1, and its actions take effect at
    once (they cost no steps); then every instance runs step t: admission as in the Simulator (global queue,
    lifetime reservation, reserve rule), a whole-prompt prefill that yields the first token, and one decode token
    for every running request; a request finishes at the step that produces its last token.
    """
    world = sum(start)
    if params is None:
        allowed = tuple(d for d in sorted(capacity_blocks) if d <= world) if degrees is None else tuple(degrees)
        params = PolicyParams(allowed, dict(capacity_blocks), block_size, min_dwell_s=0.0, dwell_cost_factor=0.0,
                              split_delay_s=0.0)
    policy = TPPolicy(params, ZeroCost())
    cfg = SimConfig(block_size=block_size, max_batched_tokens=None, max_num_seqs=max_num_seqs, policy_interval=1.0,
                    policy_on_arrival=False, reserve=reserve, stall_timeout=1000.0)
    sim = Simulator(start, capacity_blocks, UnitTime(), policy=policy, cost_model=ZeroCost(), config=cfg)
    result = sim.run(requests)
    return [(int(round(t)), a) for t, a in result.decisions]
