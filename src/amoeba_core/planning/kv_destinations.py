"""KV planning, part 0: which new instance (label) every sequence and every cached block goes to, and the rank
constraints the placement must honour.

A *label* d in [0, new number of instances) names a new instance before the placement is chosen; the placement
(placement.best_placement) then decides which group ranks serve label d. Destinations (kv.destinations) are
resolved in this order:

  1. units: a sequence or cached block with WithSequence(x) joins x's unit; a unit takes the label or rank
     constraint (OnRanks, WithRanksOf) of the member its links end in
  2. labelled units keep their label; their rank constraints become constraints of that label
  3. constrained units without a label take, in request order, the first label that keeps every label's
     constraints satisfiable, trying (least loaded first within each group) the labels that the old instances of
     the constraint's ranks go to by default, then those carved out of the unit's own old instance, then the rest
  4. the rest (no label, no constraint) by default: merges keep an old instance's units together; splits balance
     blocks over the labels carved out of the old instance (largest units first, onto the least loaded label)
  5. cached blocks without a destination: every label a live sequence of their old instance holding the block
     goes to (it moves there anyway); blocks no live sequence holds go, all of an old instance together, to the
     least loaded label carved out of it. One copy per (label, key) survives: one a sequence moves there anyway,
     else the lowest old instance's.

"Carved out of old instance i" is the contiguous reading: labels i*t0//t1 .. ((i+1)*t0-1)//t1 (one label in a
merge). Rank constraints: OnRanks(S) on label d means the ranks of d contain S (|S| <= new degree: each g in S may
serve d only) or lie within S (|S| >= new degree: ranks outside S may not serve d). They form allowed[g, d].
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..config import TPConfig
from ..errors import ConfigError
from ..kv.destinations import OnRanks, WithRanksOf, WithSequence


@dataclass
class Destinations:
    """The resolved destinations (pure data).

    seq_label:   seq_id -> label, every sequence
    cached:      surviving cached entries (old instance, key, old block id, label), in request order
    constraints: label -> rank sets (sorted tuples) the label's ranks must contain or lie within
    allowed:     (world, num_labels) bool: group rank g may serve label d; None without constraints
    """

    seq_label: Dict[Hashable, int]
    cached: List[Tuple[int, Hashable, int, int]] = field(default_factory=list)
    constraints: Dict[int, List[Tuple[int, ...]]] = field(default_factory=dict)
    allowed: Optional[np.ndarray] = None

    def check_placement(self, placement: TPConfig) -> None:
        """ConfigError unless `placement` (a pinned one) satisfies every rank constraint."""
        if self.allowed is None:
            return
        bad = [g for g, (inst, _) in enumerate(placement.slots) if not self.allowed[g, inst]]
        if bad:
            inst = placement.slots[bad[0]][0]
            raise ConfigError(f"pinned placement {placement.describe()} puts group rank {bad[0]} in instance {inst}, "
                              f"against the rank constraints {self.describe()}")

    def describe(self) -> str:
        return "; ".join(f"instance {d}: {_describe_sets(sets)}" for d, sets in sorted(self.constraints.items()))


def _describe_sets(sets) -> str:
    return ", ".join(f"ranks {list(s)}" for s in sets)


def allowed_matrix(constraints: Dict[int, List[Tuple[int, ...]]], world: int, new_degree: int) -> np.ndarray:
    """(world, num_labels) bool from label -> rank sets (see the module doc)."""
    num_labels = world // new_degree
    allowed = np.ones((world, num_labels), dtype=bool)
    for d, sets in constraints.items():
        for ranks in sets:
            idx = np.array(ranks, dtype=np.int64)
            if len(ranks) <= new_degree:   # contain: these ranks serve d and nothing else
                keep = allowed[idx, d].copy()
                allowed[idx, :] = False
                allowed[idx, d] = keep
            if len(ranks) >= new_degree:   # within: no other rank serves d
                outside = np.ones(world, dtype=bool)
                outside[idx] = False
                allowed[outside, d] = False
    return allowed


def feasible(allowed: np.ndarray, new_degree: int) -> bool:
    """Is there a placement (every label gets new_degree ranks) within `allowed`?"""
    slots = np.repeat(allowed, new_degree, axis=1).astype(np.float64)
    score = np.where(slots, 0.0, -np.inf)
    try:
        linear_sum_assignment(score, maximize=True)
    except ValueError:
        return False
    return True


class _Units:
    """Union-find over items: sequences 0..S-1 then cached blocks S..S+C-1."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the root is the unit's first item


def resolve_destinations(req, old: TPConfig, new_degree: int) -> Destinations:
    """Resolve req.destinations and req.cached_destinations (see the module doc). ConfigError for unknown
    sequences, labels out of range, contradictions and unsatisfiable rank constraints."""
    world, t0, t1 = old.world_size, old.degree, new_degree
    num_labels = world // t1
    old_ranks = old.instances()
    seqs = req.sequences
    S, C = len(seqs), len(req.cached)
    if not (req.destinations or req.cached_destinations or C):
        return Destinations(_default_labels(seqs, t0, t1, num_labels), [], {}, None)
    seq_index = ({seq_id: n for n, (_, seq_id, _) in enumerate(seqs)}
                 if req.destinations or req.cached_destinations else {})
    unknown = sorted(set(req.destinations) - set(seq_index), key=repr)
    if unknown:
        raise ConfigError(f"destinations given for unknown sequences {unknown[:5]}")
    item_inst = [inst for inst, _, _ in seqs] + [inst for inst, _, _ in req.cached]
    item_size = [len(t) for _, _, t in seqs] + [1] * C

    def name(n: int) -> str:
        if n < S:
            return f"sequence {seqs[n][1]!r}"
        inst, key, _ = req.cached[n - S]
        return f"cached block {key!r} of instance {inst}"

    def home(inst: int) -> range:
        return range(inst * t0 // t1, ((inst + 1) * t0 - 1) // t1 + 1)

    # 1. Units, their labels and rank constraints (items: sequences 0..S-1, cached blocks S..S+C-1).
    spec_of: Dict[int, object] = {seq_index[seq_id]: spec for seq_id, spec in req.destinations.items()}
    if req.cached_destinations:
        cached_index = {(inst, key): c for c, (inst, key, _) in enumerate(req.cached)}
        unknown = sorted((k for k in req.cached_destinations if k not in cached_index), key=repr)
        if unknown:
            raise ConfigError(f"cached destinations given for unknown cached blocks (instance, key) {unknown[:5]}")
        spec_of.update((S + cached_index[k], spec) for k, spec in req.cached_destinations.items())
    root = list(range(S + C))
    links = [(n, spec.seq_id) for n, spec in spec_of.items() if isinstance(spec, WithSequence)]
    if links:
        units = _Units(S + C)
        for n, target in links:
            if target not in seq_index:
                raise ConfigError(f"{name(n)}: WithSequence({target!r}) names no live sequence of the group")
            units.union(n, seq_index[target])
        root = [units.find(n) for n in range(S + C)]
    # Every item has one destination, so a unit (a tree of WithSequence links, or a cycle) holds at most one
    # label or rank set: the one of the item its links end in.
    label: Dict[int, int] = {}
    rank_sets: Dict[int, List[Tuple[int, ...]]] = {}
    for n, spec in spec_of.items():
        if isinstance(spec, int):
            if not 0 <= spec < num_labels:
                raise ConfigError(f"{name(n)}: destination instance {spec} is outside [0, {num_labels})")
            label[root[n]] = spec
        elif isinstance(spec, (OnRanks, WithRanksOf)):
            if isinstance(spec, WithRanksOf):
                if not 0 <= spec.instance < old.num_instances:
                    raise ConfigError(f"{name(n)}: WithRanksOf({spec.instance}) names no old instance (there are "
                                      f"{old.num_instances})")
                ranks = tuple(sorted(old_ranks[spec.instance]))
            else:
                ranks = spec.ranks
                if ranks[0] < 0 or ranks[-1] >= world:
                    raise ConfigError(f"{name(n)}: OnRanks{list(ranks)} names ranks outside [0, {world})")
            sets = rank_sets.setdefault(root[n], [])
            if ranks not in sets:
                sets.append(ranks)
    # Cached blocks that nobody placed (no destination; links only ever point at sequences) wait for step 5.
    free_cached = {n for n in range(S, S + C) if n not in spec_of}
    if links:
        roots = sorted(set(root) - free_cached)
        size = dict.fromkeys(roots, 0)
        for n in range(S + C):
            if n not in free_cached:
                size[root[n]] += item_size[n]
    else:
        roots = [n for n in range(S + C) if n not in free_cached]
        size = item_size

    constraints: Dict[int, List[Tuple[int, ...]]] = {}
    load = [0] * num_labels  # blocks per label so far
    cache: Dict[tuple, bool] = {}

    def satisfiable(trial: Dict[int, List[Tuple[int, ...]]]) -> bool:
        key = tuple(sorted((d, tuple(sorted(v))) for d, v in trial.items()))
        if key not in cache:
            cache[key] = feasible(allowed_matrix(trial, world, t1), t1)
        return cache[key]

    def with_sets(d: int, sets) -> Dict[int, List[Tuple[int, ...]]]:
        trial = {k: list(v) for k, v in constraints.items()}
        trial.setdefault(d, [])
        trial[d] += [s for s in sets if s not in trial[d]]
        return trial

    # 2. Labelled units.
    unit_label: Dict[int, int] = {}
    for r in roots:
        if r in label:
            unit_label[r] = label[r]
            load[label[r]] += size[r]
            if r in rank_sets:
                constraints = with_sets(label[r], rank_sets[r])
    if constraints and not satisfiable(constraints):
        raise ConfigError(f"no placement satisfies the rank constraints of the labelled destinations: "
                          f"{_describe(constraints)}")
    # 3. Constrained units without a label.
    for r in roots:
        if r in unit_label or r not in rank_sets:
            continue
        by_load = lambda labels: sorted(labels, key=lambda d: (load[d], d))  # noqa: E731
        ranks_home = by_load({d for ranks in rank_sets[r] for g in ranks for d in home(old.slots[g][0])})
        own_home = by_load(d for d in home(item_inst[r]) if d not in ranks_home)
        rest = by_load(d for d in range(num_labels) if d not in ranks_home and d not in own_home)
        for d in ranks_home + own_home + rest:
            trial = with_sets(d, rank_sets[r])
            if satisfiable(trial):
                constraints, unit_label[r] = trial, d
                load[d] += size[r]
                break
        else:
            raise ConfigError(f"{name(r)}: no new instance can satisfy {_describe_sets(rank_sets[r])} together "
                              f"with the constraints already placed ({_describe(constraints)})")
    # 4. Defaults.
    by_home: Dict[int, List[int]] = {}
    for r in roots:
        if r not in unit_label:
            by_home.setdefault(item_inst[r], []).append(r)
    for inst, rs in sorted(by_home.items()):
        labels = home(inst)
        if len(labels) == 1:  # a merge (or the same degree): the whole old instance goes to one place
            unit_label.update(dict.fromkeys(rs, labels[0]))
            load[labels[0]] += sum(size[r] for r in rs)
            continue
        # Largest first to the least loaded label (ties: the lower label; equal sizes keep the request order).
        heap = [(load[d], d) for d in labels]
        heapq.heapify(heap)
        for r in sorted(rs, key=lambda r: -size[r]):
            d_load, d = heapq.heappop(heap)
            unit_label[r] = d
            heapq.heappush(heap, (d_load + size[r], d))
        for d_load, d in heap:
            load[d] = d_load
    seq_label = {seq_id: unit_label[root[n]] for n, (_, seq_id, _) in enumerate(seqs)}
    # 5. Cached blocks.
    candidates: List[Tuple[int, Hashable, int, int]] = []
    if C:
        held = _held_pairs(seqs, seq_label, req.num_blocks, num_labels)
        chain_label: Dict[int, int] = {}
        for c, (inst, key, b) in enumerate(req.cached):
            n = S + c
            if n not in free_cached:
                candidates.append((inst, key, b, unit_label[root[n]]))
                continue
            labels = held.labels(inst, b)
            if not labels:
                if inst not in chain_label:
                    chain_label[inst] = min(home(inst), key=lambda k: (load[k], k))
                labels = [chain_label[inst]]
                load[labels[0]] += 1
            candidates += [(inst, key, b, d) for d in labels]
        best: Dict[Tuple[int, Hashable], Tuple[tuple, int]] = {}  # (label, key) -> (preference, index)
        for k, (inst, key, b, d) in enumerate(candidates):
            preference = (0 if d in held.labels(inst, b) else 1, inst)
            if (d, key) not in best or preference < best[(d, key)][0]:
                best[(d, key)] = (preference, k)
        candidates = [candidates[k] for k in sorted(k for _, k in best.values())]
    allowed = allowed_matrix(constraints, world, t1) if constraints else None
    return Destinations(seq_label, candidates, constraints, allowed)


def _default_labels(seqs, t0: int, t1: int, num_labels: int) -> Dict[object, int]:
    """seq_id -> label when nothing is constrained: step 4 of resolve_destinations over arrays (a merge sends an
    old instance's sequences to its one home label; a split deals them out largest first to the least loaded)."""
    inst = np.fromiter((i for i, _, _ in seqs), dtype=np.int64, count=len(seqs))
    size = np.fromiter((len(t) for _, _, t in seqs), dtype=np.int64, count=len(seqs))
    label = np.empty(len(seqs), dtype=np.int64)
    load = [0] * num_labels
    for i in np.unique(inst).tolist():
        mine = np.flatnonzero(inst == i)
        homes = range(i * t0 // t1, ((i + 1) * t0 - 1) // t1 + 1)
        if len(homes) == 1:
            label[mine] = homes[0]
            load[homes[0]] += int(size[mine].sum())
            continue
        heap = [(load[d], d) for d in homes]
        heapq.heapify(heap)
        order = mine[np.argsort(-size[mine], kind="stable")]
        out = []
        for n in size[order].tolist():
            d_load, d = heapq.heappop(heap)
            out.append(d)
            heapq.heappush(heap, (d_load + n, d))
        label[order] = out
        for d_load, d in heap:
            load[d] = d_load
    return dict(zip((seq_id for _, seq_id, _ in seqs), label.tolist()))


class _HeldPairs:
    """Which labels the live sequences of old instance i take block b to: sorted codes (i * N + b) * L + label."""

    def __init__(self, codes: np.ndarray, num_blocks: int, num_labels: int):
        self.codes, self.n, self.num_labels = codes, num_blocks, num_labels

    def labels(self, inst: int, block: int) -> List[int]:
        base = (inst * self.n + block) * self.num_labels
        lo, hi = np.searchsorted(self.codes, [base, base + self.num_labels])
        return (self.codes[lo:hi] - base).tolist()


def _held_pairs(seqs, seq_label, num_blocks: int, num_labels: int) -> _HeldPairs:
    """Every (old instance, block, label) a live sequence moves, as one sorted array (vectorised: tables may hold
    millions of entries)."""
    lens = np.array([len(t) for _, _, t in seqs], dtype=np.int64)
    blocks = np.fromiter(itertools.chain.from_iterable(t for _, _, t in seqs), dtype=np.int64, count=int(lens.sum()))
    inst = np.repeat(np.array([i for i, _, _ in seqs], dtype=np.int64), lens)
    label = np.repeat(np.array([seq_label[s] for _, s, _ in seqs], dtype=np.int64), lens)
    n = max(num_blocks, int(blocks.max(initial=0)) + 1)  # ids out of range are reported by the planner
    return _HeldPairs(np.unique((inst * n + blocks) * num_labels + label), n, num_labels)


def _describe(constraints) -> str:
    return "; ".join(f"instance {d}: {_describe_sets(sets)}" for d, sets in sorted(constraints.items())) or "none"
