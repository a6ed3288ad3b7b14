"""When to change TP: a transformation-aware policy an engine's scheduler consults.

The engine hands the policy a plain snapshot of its instances (ClusterState) and gets back actions (Merge, Split)
or nothing. The policy touches no process group and no tensor: it is deterministic given the sequence of
snapshots, and its only memory is when a split first became possible (the hysteresis of rule 3) and, with a
predictor, the recent arrivals and the base degree (rule 0).

Library fact the actions follow: one retp call changes every instance of the process group it is given to one new
degree, and every instance of that group has the same degree before and after. An engine therefore merges a subset
of its instances by calling retp on a subgroup of just their ranks, and splits one instance by calling retp on its
own ranks:

    Merge(instances=(1, 3), ranks=(1, 3), new_degree=2)    retp(subgroup(1, 3), 2, ...): two TP1 -> one TP2
    Split(instance=0, ranks=(0, 1, 2, 3), new_degree=1)    retp(subgroup(0..3), 1, ...): one TP4 -> four TP1

Decision rules (in the spirit of the Amoeba paper, arXiv 2509.19729):
  0. The base degree (only with a predictor; without one it stays degrees[0]): every base_every_s the policy asks
     its predictor which degree, with every GPU in instances of that degree, would have served the requests that
     arrived in the last window_s best (the largest share within their SLO); the base stays while its prediction is
     within base_margin of the best one (hysteresis), else it moves to the lowest degree that is. Instances below
     the base merge up to it. Why: the lowest degree is not always the best one to serve at. With chunked prefill a
     decode step that carries a prefill chunk is several times slower at a low degree, so bursts of prompts break
     the TPOT SLO there, and the lowest degree leaves the least KV memory, so its batches stay small; which effect
     wins depends on the load (the predictor is an object with attainment(degree, num_gpus, window) and
     slo(prompt, output), e.g. simulator.ReplayPredictor, which replays the window through the serving model).
  1. Serve at the base degree: instances start at degrees[0], merge up to the base (rule 0), and are split back to
     it when they can be.
  2. Merge (a) when a waiting request needs more KV blocks than any instance holds (its prompt plus its output
     bound), or (b) when an instance's running requests will outgrow its pool (an engine would preempt): the
     instances merged are the cheapest set of equal-degree instances whose merged capacity (params.capacity_blocks,
     with or without the memory handoff) holds the request. When no equal-degree set is large enough, the two
     least-loaded instances of the smallest degree merge first (a step towards it).
     (c) KV pressure: when the oldest waiting request has waited pressure_wait_s for blocks no instance has free
     (it would fit an empty one), the two least-loaded instances of the lowest degree merge, but only where the
     merged pool holds at least min_kv_gain times their pools together (true with the memory handoff, which turns
     freed weight bytes into KV; without it a merge only re-cuts the same bytes and this rule never fires).
  3. Split an instance back to the lowest degree (not below the base) whose instances can hold every request it
     runs (first-fit decreasing into split_headroom of their capacity) once no waiting request needs it and there
     is no KV pressure, after that has held for split_delay_s (hysteresis against a lull between long requests).
  4. The transformation's own cost: an instance is changed only after it has existed for max(min_dwell_s,
     dwell_cost_factor x the action's predicted seconds), so at most ~1 / dwell_cost_factor of its time goes to
     transformations (and it cannot oscillate faster than min_dwell_s); actions predicted to take longer than
     max_transform_s are not taken. Predicted seconds come from a cost model (ByteCostModel by default: bytes per
     rank from the weight and KV sizes, over documented bandwidths), which any object with the same
     merge_seconds / split_seconds methods replaces (e.g. one that plans with plan_retp).

Units: `now`, `formed_at` and every *_s parameter share one time unit (seconds in an engine and the simulator; one
decode step in the step-level consistency test). Requests' KV need in blocks: ceil((prompt + output - 1) /
block_size) (the last generated token is never cached), output = max_output_tokens when known, else
max(assumed_output_tokens, generated + 1).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError


# ---- the snapshot an engine builds -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestView:
    """One request as the scheduler sees it. prompt_tokens includes nothing generated; generated_tokens counts
    tokens produced so far; max_output_tokens is the output bound when the engine knows one (max_tokens);
    waiting_since: when it was queued (its arrival), for waiting requests."""

    request_id: Hashable
    prompt_tokens: int
    generated_tokens: int = 0
    max_output_tokens: Optional[int] = None
    waiting_since: Optional[float] = None


@dataclass(frozen=True)
class InstanceState:
    """One serving instance.

    instance_id:  the engine's id, unique within one snapshot (actions name instances by it, and by their ranks)
    ranks:        group ranks in TP-rank order; degree == len(ranks)
    blocks_total: KV blocks usable for sequences (reserved blocks excluded); blocks_used: held by running requests
    running:      admitted requests; waiting: requests queued at this instance (engines with per-instance queues)
    formed_at:    when the instance got its current degree and ranks (-inf: since the start)
    transforming: the instance is the result of a transformation still under way (an engine that transforms
                  asynchronously reports the instances it is building, not the old ones); the policy leaves it
                  alone but counts its capacity
    """

    instance_id: int
    ranks: Tuple[int, ...]
    blocks_total: int
    blocks_used: int = 0
    running: Tuple[RequestView, ...] = ()
    waiting: Tuple[RequestView, ...] = ()
    formed_at: float = -math.inf
    transforming: bool = False

    @property
    def degree(self) -> int:
        return len(self.ranks)

    @property
    def blocks_free(self) -> int:
        return self.blocks_total - self.blocks_used


@dataclass(frozen=True)
class ClusterState:
    """Everything the policy sees at one call: the time, the instances, and requests not yet given to any (oldest
    first). Only waiting requests that need more KV blocks than an instance of the lowest degree holds affect the
    decisions, so an engine with a long queue may list just those (here and in InstanceState.waiting).
    arrivals: requests that arrived since the previous call, with waiting_since = their arrival (only a policy
    with a predictor reads them: they are its load window)."""

    now: float
    instances: Tuple[InstanceState, ...]
    waiting: Tuple[RequestView, ...] = ()
    arrivals: Tuple[RequestView, ...] = ()


# ---- actions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Merge:
    """Merge `instances` (all of one degree) into one instance of new_degree = len(ranks): call retp with
    new_degree on the subgroup of `ranks` (the instances' ranks, concatenated in the order of `instances`)."""

    instances: Tuple[int, ...]
    ranks: Tuple[int, ...]
    new_degree: int
    reason: str = field(default="", compare=False)
    predicted_seconds: float = field(default=0.0, compare=False)

    def describe(self) -> str:
        old = self.new_degree // len(self.instances)
        return f"merge {len(self.instances)}xTP{old} -> TP{self.new_degree} ranks {list(self.ranks)} ({self.reason})"


@dataclass(frozen=True)
class Split:
    """Split `instance` into len(ranks) // new_degree instances of new_degree: call retp with new_degree on the
    subgroup of its ranks. destinations (a hint, e.g. for KVCache.destinations): request id -> index of the new
    instance, from the packing that showed the split fits."""

    instance: int
    ranks: Tuple[int, ...]
    new_degree: int
    reason: str = field(default="", compare=False)
    predicted_seconds: float = field(default=0.0, compare=False)
    destinations: Mapping = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        n = len(self.ranks) // self.new_degree
        return f"split TP{len(self.ranks)} -> {n}xTP{self.new_degree} ranks {list(self.ranks)} ({self.reason})"


Action = Union[Merge, Split]


# ---- transformation cost -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformBytes:
    """Bytes of one transformation on its busiest rank: received over links (weights, KV) and copied locally."""

    weight_bytes_in: int
    kv_bytes_in: int
    local_copy_bytes: int


@dataclass(frozen=True)
class Bandwidths:
    """What a transformation's bytes cost. Defaults: H100-class NVLink and HBM (../shared/reference/
    conventions.md: NCCL send/recv 180-370 GB/s one way, on-device copy ~1.25 TB/s of bytes copied); fixed_s
    stands for planning, agreement and launch (plan_retp takes 0.13-0.40 s for 200k live KV blocks on 2 CPU cores,
    bench/RESULTS.md)."""

    link_bytes_per_s: float = 180e9
    local_copy_bytes_per_s: float = 1.25e12
    fixed_s: float = 0.25


def transformation_seconds(moved: TransformBytes, bandwidths: Bandwidths = Bandwidths()) -> float:
    """fixed + (weight + KV bytes received) / link bandwidth + local copy bytes / copy bandwidth (busiest rank)."""
    return (bandwidths.fixed_s + (moved.weight_bytes_in + moved.kv_bytes_in) / bandwidths.link_bytes_per_s
            + moved.local_copy_bytes / bandwidths.local_copy_bytes_per_s)


@dataclass(frozen=True)
class ByteCostModel:
    """Predicted seconds of merges and splits from per-GPU sizes (amoeba_core.capacity):

    weight_bytes[d]:        weight bytes per GPU at degree d
    kv_bytes_per_token[d]:  KV bytes per token per GPU at degree d

    Merge of k instances of degree g into D = k*g, instance i holding T_i live tokens: no weight bytes move (each
    rank's new shard lies inside its old one, the placement retp chooses); the busiest rank receives its new head
    share of the other instances' tokens, (sum T - min T) * kv(D), relays its own, max T * kv(D), and rewrites its
    shards into right-sized tensors, W(D).
    Split of one degree-D instance into k of degree g holding T_j tokens each: every rank receives the rest of its
    larger shard, W(g) - W(D), and the heads it lacks of its new instance's tokens, max T_j * (kv(g) - kv(D));
    it copies its retained shard, W(D), and its own head share of them, max T_j * kv(D).
    """

    weight_bytes: Mapping[int, int]
    kv_bytes_per_token: Mapping[int, int]
    bandwidths: Bandwidths = Bandwidths()

    def merge_bytes(self, old_degree: int, tokens_per_instance: Sequence[int]) -> TransformBytes:
        new = old_degree * len(tokens_per_instance)
        kv = self.kv_bytes_per_token[new]
        total = sum(tokens_per_instance)
        return TransformBytes(0, (total - min(tokens_per_instance)) * kv,
                              max(tokens_per_instance) * kv + self.weight_bytes[new])

    def split_bytes(self, old_degree: int, new_degree: int, tokens_per_new_instance: Sequence[int]) -> TransformBytes:
        t = max(tokens_per_new_instance, default=0)
        kv_old, kv_new = self.kv_bytes_per_token[old_degree], self.kv_bytes_per_token[new_degree]
        return TransformBytes(self.weight_bytes[new_degree] - self.weight_bytes[old_degree], t * (kv_new - kv_old),
                              self.weight_bytes[old_degree] + t * kv_old)

    def merge_seconds(self, old_degree: int, tokens_per_instance: Sequence[int]) -> float:
        return transformation_seconds(self.merge_bytes(old_degree, tokens_per_instance), self.bandwidths)

    def split_seconds(self, old_degree: int, new_degree: int, tokens_per_new_instance: Sequence[int]) -> float:
        return transformation_seconds(self.split_bytes(old_degree, new_degree, tokens_per_new_instance),
                                      self.bandwidths)


class ZeroCost:
    """A cost model for tests and the step-level consistency check: every transformation is free."""

    def merge_seconds(self, old_degree, tokens_per_instance) -> float:
        return 0.0

    def split_seconds(self, old_degree, new_degree, tokens_per_new_instance) -> float:
        return 0.0


# ---- the load window (rule 0) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowRequest:
    """One arrival in the policy's load window: time, lengths, KV need in blocks and its SLO (seconds)."""

    arrival: float
    prompt: int
    output: int
    need: int
    ttft_slo_s: float
    tpot_slo_s: float


# ---- the policy ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyParams:
    """degrees:          allowed instance degrees, ascending; degrees[0] is where instances serve by default
    capacity_blocks:     degree -> usable KV blocks of one instance at that degree (capacity.py, with or without
                         the memory handoff: what the engine's pool will hold after a merge or split)
    block_size:          tokens per KV block
    assumed_output_tokens: output length assumed for requests without max_output_tokens
    min_dwell_s:         an instance is left alone at least this long after it was formed
    dwell_cost_factor:   ... and at least this many times the predicted seconds of the action considered
    split_delay_s:       a split must have been possible this long, continuously, before it is made
    split_headroom:      a split must fit every request it keeps into this fraction of the new instances' blocks
                         (merge at full, split at half: the resize band of a dynamic table, so a split is not
                         followed by a merge under the same load)
    max_transform_s:     actions predicted to take longer are not taken
    pressure_wait_s:     rule 2c fires after the oldest waiting request has waited this long (None: never)
    min_kv_gain:         rule 2c merges only where capacity_blocks[2g] >= min_kv_gain * 2 * capacity_blocks[g]
    window_s:            rule 0 (needs a predictor): the load window is the arrivals of the last window_s
    base_every_s:        rule 0 reconsiders the base degree this often
    base_margin:         ... keeps it while its predicted share of the window's requests within SLO is within this
                         of the best degree's (hysteresis), else moves it to the lowest degree that is
    min_window_requests: ... and only with at least this many requests in the window
    """

    degrees: Tuple[int, ...]
    capacity_blocks: Mapping[int, int]
    block_size: int
    assumed_output_tokens: int = 512
    min_dwell_s: float = 10.0
    dwell_cost_factor: float = 20.0
    split_delay_s: float = 5.0
    split_headroom: float = 0.5
    max_transform_s: float = math.inf
    pressure_wait_s: Optional[float] = 2.0
    min_kv_gain: float = 1.25
    window_s: float = 180.0
    base_every_s: float = 60.0
    base_margin: float = 0.02
    min_window_requests: int = 50

    def __post_init__(self):
        degrees = tuple(self.degrees)
        if not degrees or list(degrees) != sorted(set(degrees)) or degrees[0] < 1:
            raise ConfigError(f"degrees must be distinct, ascending and >= 1; got {self.degrees}")
        missing = [d for d in degrees if d not in self.capacity_blocks]
        if missing:
            raise ConfigError(f"capacity_blocks lacks degrees {missing}; it has {sorted(self.capacity_blocks)}")
        if self.block_size < 1 or not 0.0 < self.split_headroom <= 1.0:
            raise ConfigError(f"need block_size >= 1 and 0 < split_headroom <= 1; got {self.block_size}, "
                              f"{self.split_headroom}")


class TPPolicy:
    """Decides merges and splits from ClusterState snapshots (see the module docstring for the rules).

    policy = TPPolicy(PolicyParams(...), cost_model=ByteCostModel(...))
    actions = policy.decide(state)      # [] or Merge / Split actions on disjoint instances; call every step
    """

    def __init__(self, params: PolicyParams, cost_model=None, predictor=None):
        self.params = params
        self.cost_model = cost_model if cost_model is not None else ZeroCost()
        self.predictor = predictor
        self._split_possible_since: Dict[Tuple[Tuple[int, ...], float], float] = {}
        self.base = params.degrees[0]             # the degree instances serve at when nothing needs more (rule 0)
        self._window: Deque[WindowRequest] = deque()
        self._base_checked_at = -math.inf
        self.base_history: List[Tuple[float, int, Dict[int, float]]] = []   # (time, new base, predictions)

    # ---- sizes -----------------------------------------------------------------------------------------------
    def need_blocks(self, r: RequestView) -> int:
        """KV blocks the request holds when it finishes."""
        out = (r.max_output_tokens if r.max_output_tokens is not None
               else max(self.params.assumed_output_tokens, r.generated_tokens + 1))
        return -(-(r.prompt_tokens + out - 1) // self.params.block_size)

    def smallest_degree_for(self, blocks: int) -> Optional[int]:
        """The smallest allowed degree whose instance holds `blocks`, or None (no instance can serve it)."""
        return next((d for d in self.params.degrees if self.params.capacity_blocks[d] >= blocks), None)

    def _tokens(self, inst: InstanceState) -> int:
        return inst.blocks_used * self.params.block_size

    def _settled(self, inst: InstanceState, now: float, predicted_s: float) -> bool:
        p = self.params
        return (not inst.transforming and predicted_s <= p.max_transform_s
                and now - inst.formed_at >= max(p.min_dwell_s, p.dwell_cost_factor * predicted_s))

    # ---- the decision --------------------------------------------------------------------------------------
    def decide(self, state: ClusterState) -> List[Action]:
        for inst in state.instances:
            if inst.degree not in self.params.capacity_blocks:
                raise ConfigError(f"instance {inst.instance_id} has degree {inst.degree}, not one of "
                                  f"{self.params.degrees}")
        actions: List[Action] = []
        self._update_base(state)
        pressure = self._kv_pressure(state)
        merge = self._merge(state, pressure)
        if merge is not None:
            actions.append(merge)
        busy = set(merge.instances) if merge is not None else set()
        if pressure is None:
            actions.extend(self._splits(state, busy))
        else:
            self._split_possible_since.clear()
        return actions

    # ---- rule 0: the base degree ----------------------------------------------------------------------------
    def _update_base(self, state: ClusterState) -> None:
        """Keep the load window and, every base_every_s, move the base to the degree the predictor says serves it
        best: predictor.attainment(degree, num_gpus, window) = the share of the window's requests that would have
        met their SLO with every GPU in instances of that degree."""
        p, pred = self.params, self.predictor
        if pred is None:
            return
        for r in state.arrivals:
            t = r.waiting_since if r.waiting_since is not None else state.now
            out = r.max_output_tokens if r.max_output_tokens is not None else p.assumed_output_tokens
            ttft, tpot = pred.slo(r.prompt_tokens, out)
            self._window.append(WindowRequest(t, r.prompt_tokens, out, self.need_blocks(r), ttft, tpot))
        while self._window and self._window[0].arrival < state.now - p.window_s:
            self._window.popleft()
        if state.now - self._base_checked_at < p.base_every_s or len(self._window) < p.min_window_requests:
            return
        self._base_checked_at = state.now
        gpus = sum(i.degree for i in state.instances)
        window = list(self._window)
        scores = {d: pred.attainment(d, gpus, window) for d in p.degrees if gpus % d == 0}
        # The base stays while it is within base_margin of the best prediction; else it moves to the lowest degree
        # within base_margin of the best (predictions that close do not rank degrees: the lowest keeps the most
        # instances, as rule 1 prefers).
        good = [d for d in scores if scores[d] >= max(scores.values()) - p.base_margin]
        if self.base not in good:
            self.base = min(good)
            self.base_history.append((state.now, self.base, scores))

    def _kv_pressure(self, state: ClusterState) -> Optional[Tuple[RequestView, int]]:
        """(oldest waiting request, its need) when it has waited pressure_wait_s for blocks that no instance has
        unreserved although it would fit an empty one; else None."""
        p = self.params
        timed = [r for r in self._waiting(state) if r.waiting_since is not None]
        if p.pressure_wait_s is None or not timed:
            return None
        oldest = min(timed, key=lambda r: r.waiting_since)
        if state.now - oldest.waiting_since < p.pressure_wait_s:
            return None
        need = self.need_blocks(oldest)
        serving = [i for i in state.instances if not i.transforming]
        if not serving or need > max(i.blocks_total for i in serving):
            return None                     # a request no instance holds is rule 2a's
        room = max(i.blocks_total - sum(self.need_blocks(r) for r in i.running) for i in serving)
        return (oldest, need) if need > room else None

    def _waiting(self, state: ClusterState) -> List[RequestView]:
        out = list(state.waiting)
        for inst in state.instances:
            out.extend(inst.waiting)
        return out

    def _merge(self, state: ClusterState, pressure) -> Optional[Merge]:
        largest = max((i.blocks_total for i in state.instances), default=0)
        # Rule 2a: the oldest waiting request no instance can ever hold (queue order = age).
        for r in self._waiting(state):
            need = self.need_blocks(r)
            if need <= largest:
                continue
            target = self.smallest_degree_for(need)
            if target is None:
                continue                        # no degree holds it: the engine must reject it
            merge = self._merge_towards(state, target, need, (), f"request {r.request_id} needs {need} blocks")
            if merge is not None:
                return merge
        # Rule 0: instances below the base degree merge up to it (the cheapest set; a step towards it).
        low = [i for i in state.instances if i.degree < self.base and not i.transforming]
        if low:
            merge = self._merge_towards(state, self.base, 0, (), f"base degree TP{self.base}")
            if merge is not None:
                return merge
        # Rule 2b: an instance whose running requests will outgrow its pool merges with its least-loaded peer.
        for inst in state.instances:
            projected = sum(self.need_blocks(r) for r in inst.running)
            if projected > inst.blocks_total:
                target = self.smallest_degree_for(projected)
                if target is not None and target > inst.degree:
                    merge = self._merge_towards(state, target, projected, (inst.instance_id,),
                                                f"instance {inst.instance_id} will need {projected} of "
                                                f"{inst.blocks_total} blocks")
                    if merge is not None:
                        return merge
        # Rule 2c: KV pressure, where a merge buys KV blocks (the memory handoff).
        if pressure is not None:
            p = self.params
            oldest, need = pressure
            for g in sorted({i.degree for i in state.instances if not i.transforming}):
                if 2 * g in p.capacity_blocks and p.capacity_blocks[2 * g] >= p.min_kv_gain * 2 * p.capacity_blocks[g]:
                    merge = self._merge_towards(state, 2 * g, need, (),
                                                f"KV pressure: request {oldest.request_id} waited "
                                                f"{state.now - oldest.waiting_since:.3g} for {need} blocks")
                    if merge is not None:
                        return merge
        return None

    def _merge_towards(self, state: ClusterState, target: int, need: int, required: Tuple[int, ...],
                       reason: str) -> Optional[Merge]:
        """The cheapest equal-degree set of instances that merges into `target` (containing the `required` ones),
        or a first step towards it: the two least-loaded instances of the smallest degree."""
        p = self.params
        by_degree: Dict[int, List[InstanceState]] = {}
        for inst in state.instances:
            if inst.degree < target and target % inst.degree == 0:
                by_degree.setdefault(inst.degree, []).append(inst)
        req = set(required)
        candidates = []
        for g, insts in sorted(by_degree.items()):
            k = target // g
            pinned = [i for i in insts if i.instance_id in req]
            if len(pinned) != len(req):
                continue
            others = sorted((i for i in insts if i.instance_id not in req),
                            key=lambda i: (i.blocks_used, i.ranks))
            chosen = pinned + others[: k - len(pinned)]
            if len(chosen) == k:
                candidates.append(chosen)
        if not candidates:
            # A step towards the target: two instances of the smallest degree that has two (with the required one).
            for g, insts in sorted(by_degree.items()):
                if 2 * g not in p.capacity_blocks or 2 * g > target:
                    continue
                pinned = [i for i in insts if i.instance_id in req]
                others = sorted((i for i in insts if i.instance_id not in req), key=lambda i: (i.blocks_used, i.ranks))
                chosen = (pinned + others)[:2]
                if len(chosen) == 2 and len(pinned) == len(req):
                    candidates.append(chosen)
                    break
        best = None
        for chosen in candidates:
            g = chosen[0].degree
            seconds = self.cost_model.merge_seconds(g, [self._tokens(i) for i in chosen])
            if not all(self._settled(i, state.now, seconds) for i in chosen):
                continue
            if best is None or seconds < best[0]:
                best = (seconds, chosen)
        if best is None:
            return None
        seconds, chosen = best
        chosen = sorted(chosen, key=lambda i: i.ranks)
        ranks = tuple(r for i in chosen for r in i.ranks)
        return Merge(tuple(i.instance_id for i in chosen), ranks, len(ranks),
                     reason=f"{reason}; TP{target} holds {p.capacity_blocks[target]}", predicted_seconds=seconds)

    def _splits(self, state: ClusterState, busy: set) -> List[Split]:
        p = self.params
        waiting_needs = sorted((self.need_blocks(r) for r in self._waiting(state)), reverse=True)
        seen = set()
        actions = []
        for inst in state.instances:
            if inst.degree <= self.base or inst.instance_id in busy:
                continue
            plan = self._split_plan(state, inst, waiting_needs)
            key = (inst.ranks, inst.formed_at)
            if plan is None:
                self._split_possible_since.pop(key, None)
                continue
            seen.add(key)
            since = self._split_possible_since.setdefault(key, state.now)
            new_degree, destinations, tokens = plan
            seconds = self.cost_model.split_seconds(inst.degree, new_degree, tokens)
            if state.now - since >= p.split_delay_s and self._settled(inst, state.now, seconds):
                n = inst.degree // new_degree
                actions.append(Split(inst.instance_id, inst.ranks, new_degree,
                                     reason=f"its {len(destinations)} requests fit {n}xTP{new_degree}",
                                     predicted_seconds=seconds, destinations=destinations))
        for key in [k for k in self._split_possible_since if k not in seen]:
            del self._split_possible_since[key]
        return actions

    def _split_plan(self, state: ClusterState, inst: InstanceState, waiting_needs: List[int]):
        """(new degree, request -> new instance, tokens per new instance) for the lowest degree the instance can
        split to, or None."""
        p = self.params
        # A waiting request that needs this instance (no other instance could ever hold it) keeps it whole.
        others = max((i.blocks_total for i in state.instances if i.instance_id != inst.instance_id), default=0)
        biggest_waiting = next((n for n in waiting_needs if n > others), 0)
        requests = sorted(inst.running + inst.waiting, key=lambda r: (-self.need_blocks(r), str(r.request_id)))
        running = {r.request_id for r in inst.running}
        for g in p.degrees:
            if g < self.base or g >= inst.degree or inst.degree % g:
                continue
            if biggest_waiting > p.capacity_blocks[g]:
                continue
            bins = [0] * (inst.degree // g)
            tokens = [0] * len(bins)                              # live tokens each new instance receives
            room = p.split_headroom * p.capacity_blocks[g]
            destinations = {}
            for r in requests:                                    # first-fit decreasing
                need = self.need_blocks(r)
                j = next((j for j, used in enumerate(bins) if used + need <= room), None)
                if j is None:
                    break
                bins[j] += need
                if r.request_id in running:
                    tokens[j] += r.prompt_tokens + max(r.generated_tokens - 1, 0)
                destinations[r.request_id] = j
            else:
                return g, destinations, tokens
        return None
