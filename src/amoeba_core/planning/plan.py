"""plan_retp: the pure, deterministic description of a TP change. No process group, no tensors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..config import TPConfig
from ..errors import ConfigError, InvalidDegreeError, ScratchBudgetError
from ..execution.copy import box_bytes
from .kv_plan import KVPlanner
from .kv_rounds import pair_bytes as kv_pair_bytes
from .placement import best_placement, new_slots
from .weights import ALLOC, COMPACT, SAME, VIEW, TensorPlan, Transfers, plan_weights, weight_gain

DEFAULT_SCRATCH_BYTES = 64 << 20


@dataclass
class RetpPlan:
    """Everything every rank needs to execute a TP change, identical on every rank.

    old, new:       TP configurations before and after (new = the chosen or pinned placement)
    specs:          parameter specs, in order
    tensors:        per-parameter plans (what each rank keeps, zero-fills, and how it gets its new tensor)
    transfers:      weight transfers (a Transfers table), chunked to fit the scratch budget, in round order
    rounds:         [start, stop) index ranges into `transfers`; one exchange per round
    scratch_bytes:  staging budget per rank and round (send + receive bytes)
    kv:             the KV cache part (KVPlan) or None
    """

    old: TPConfig
    new: TPConfig
    specs: tuple
    tensors: List[TensorPlan]
    transfers: Transfers
    rounds: List[Tuple[int, int]]
    scratch_bytes: int
    kv: Optional[object] = None
    _digest: Optional[str] = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.old.world_size

    # ---- byte counts ---------------------------------------------------------------------------------------
    def weight_bytes_received(self) -> np.ndarray:
        """(world,) int64: weight bytes each rank receives."""
        out = np.zeros(self.world_size, dtype=np.int64)
        np.add.at(out, self.transfers.dst, self.transfers.nbytes)
        return out

    def weight_bytes_sent(self) -> np.ndarray:
        out = np.zeros(self.world_size, dtype=np.int64)
        np.add.at(out, self.transfers.src, self.transfers.nbytes)
        return out

    @property
    def weight_bytes_moved(self) -> int:
        return int(self.transfers.nbytes.sum())

    @property
    def kv_bytes_moved(self) -> int:
        return 0 if self.kv is None else self.kv.bytes_moved

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes_moved + self.kv_bytes_moved

    def pair_bytes(self) -> np.ndarray:
        """(world, world) bytes rank src sends rank dst: weight transfers and KV parts over every layer."""
        out = np.zeros((self.world_size, self.world_size), dtype=np.int64)
        np.add.at(out, (self.transfers.src, self.transfers.dst), self.transfers.nbytes)
        if self.kv is not None:
            out += kv_pair_bytes(self.kv)
        return out

    def local_relocation_bytes(self, rank: int) -> int:
        """Bytes that stay on `rank` but change place (each could move with one memmove): retained stretches of
        new shards and in-place compactions, and the KV parts that stay on the rank, over every layer."""
        from .kv_program import build_kv_program
        from .weight_program import build_weight_program
        program = build_weight_program(self, rank)
        total = 0
        for op in program.prologue + [op for wr in program.rounds for op in wr.finish]:
            if op.keep is None:
                continue
            b = op.keep
            moved = b if op.kind == "alloc" else b[(b[:, 0] != b[:, 1]) | (b[:, 4] != b[:, 5])]  # compaction
            total += box_bytes(moved)
        if self.kv is not None:
            kv = build_kv_program(self, rank)
            total += kv.local_bytes * self.kv.layout.num_layers
        return total

    def estimate(self, bandwidths, ranks=None, release_storage: bool = False):
        """Predicted seconds of this transformation under measured `bandwidths` (planning.cost.calibrate()):
        a planning.cost.Estimate (seconds of the slowest rank + the per-call cost, and every rank's work)."""
        from .cost import estimate
        return estimate(self, bandwidths, ranks, release_storage)

    def largest_new_shard_bytes(self, rank: int) -> int:
        return max((t.new_nbytes for t in self.tensors if t.mode[rank] == ALLOC), default=0)

    def weight_growth_bytes(self, rank: int) -> int:
        """How much the rank's weight storage grows for good: new shards that replace their old ones (views and
        in-place compactions keep their storage). Positive in splits, 0 in merges."""
        return sum(t.new_nbytes - t.old_nbytes for t in self.tensors if t.mode[rank] == ALLOC)

    # ---- agreement -----------------------------------------------------------------------------------------
    def digest(self) -> str:
        """sha256 over the canonical text of the whole plan; ranks compare it before any byte moves."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(f"old={self.old.degree}:{self.old.slots};new={self.new.degree}:{self.new.slots};"
                     f"scratch={self.scratch_bytes}\n".encode())
            for spec in self.specs:
                h.update(spec.signature().encode() + b"\n")
            seen = {}  # tensors of one template share their per-rank tables: render each table once
            for t in self.tensors:
                key = (id(t.mode), id(t.keep), id(t.zero))
                if key not in seen:
                    seen[key] = f"{sorted(t.mode.items())}:{sorted(t.keep.items())}:{sorted(t.zero.items())}"
                h.update(f"{t.index}:{seen[key]}\n".encode())
            h.update(np.ascontiguousarray(self.transfers.data, dtype=np.int64).tobytes())
            h.update(np.array(self.rounds, dtype=np.int64).tobytes())
            if self.kv is not None:
                h.update(self.kv.digest().encode())
            self._digest = h.hexdigest()
        return self._digest

    # ---- printing ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        recv, sent = self.weight_bytes_received(), self.weight_bytes_sent()
        modes = {m: 0 for m in (SAME, VIEW, COMPACT, ALLOC)}
        for t in self.tensors:
            for m in t.mode.values():
                modes[m] += 1
        lines = [
            f"RetpPlan {self.old.num_instances}x{self.old.degree} -> {self.new.num_instances}x{self.new.degree} "
            f"(world {self.world_size}, {len(self.specs)} tensors, digest {self.digest()[:12]})",
            f"  old instances: {self.old.instances()}",
            f"  new instances: {self.new.instances()}",
            f"  weights: {self.weight_bytes_moved} bytes moved in {len(self.transfers)} transfers, "
            f"{len(self.rounds)} rounds, scratch {self.scratch_bytes} bytes",
            "  tensor outcomes (rank x tensor): " + ", ".join(f"{k}={v}" for k, v in modes.items()),
        ]
        for g in range(self.world_size):
            inst, tp = self.new.slots[g]
            line = (f"  rank {g}: {self.old.slots[g]} -> ({inst}, {tp}); weights sent {int(sent[g])} "
                    f"received {int(recv[g])}")
            if self.kv is not None:
                line += f"; kv sent {int(self.kv.bytes_sent()[g])} received {int(self.kv.bytes_received()[g])}"
            lines.append(line)
        if self.kv is not None:
            lines.append("  " + self.kv.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    __str__ = summary


def _chunk(transfers: Transfers, tensors: Sequence[TensorPlan], max_chunk: int) -> Transfers:
    """Split staged transfers so none exceeds max_chunk bytes: along the split dim first, then along the outer dim.
    Direct transfers (no scratch) stay whole. Order is kept: a transfer's chunks replace it in place, in order."""
    data = transfers.data
    big = np.flatnonzero((data[:, 8] > max_chunk) & (data[:, 9] == 0))
    if big.size == 0:
        return transfers
    k, length = data[big, 0], data[big, 5]
    outer = data[big, 7] - data[big, 6]
    row_bytes = np.array([tp.row_bytes for tp in tensors], dtype=np.int64)[k]
    slab = outer * row_bytes  # bytes of one split-dim element across all outer indices
    too_wide = np.flatnonzero((slab > max_chunk) & (row_bytes > max_chunk))
    if too_wide.size:
        tp = tensors[int(k[too_wide[0]])]
        raise ScratchBudgetError(
            f"{tp.spec.name}: one row of {tp.row_bytes} bytes does not fit half the scratch budget "
            f"({max_chunk} bytes); raise scratch_bytes to at least {2 * tp.row_bytes}")
    # Along the split dim: chunks of `step` elements (whole outer range where a slab fits, else max_chunk rows).
    whole_outer = slab <= max_chunk
    step = np.where(whole_outer, max_chunk // np.maximum(slab, 1), np.minimum(length, max_chunk // row_bytes))
    n_split = -(-length // step)
    src_row = np.repeat(np.arange(big.size), n_split)
    a = (np.arange(src_row.size) - np.repeat(np.cumsum(n_split) - n_split, n_split)) * step[src_row]
    n = np.minimum(step[src_row], length[src_row] - a)
    # Along the outer dim, where a slab does not fit: `per` outer indices per chunk.
    per = np.where(whole_outer[src_row], outer[src_row], np.maximum(1, max_chunk // (n * row_bytes[src_row])))
    n_outer = -(-outer[src_row] // per)
    piece = np.repeat(np.arange(src_row.size), n_outer)
    o = (np.arange(piece.size) - np.repeat(np.cumsum(n_outer) - n_outer, n_outer)) * per[piece]
    i = src_row[piece]
    rows = data[big[i]].copy()
    rows[:, 3] += a[piece]                                  # old_start
    rows[:, 4] += a[piece]                                  # new_start
    rows[:, 5] = n[piece]                                   # length
    rows[:, 6] = data[big[i], 6] + o                        # outer_start
    rows[:, 7] = np.minimum(rows[:, 6] + per[piece], data[big[i], 7])
    rows[:, 8] = (rows[:, 7] - rows[:, 6]) * n[piece] * row_bytes[i]
    rows[:, 9] = 0
    # Replace each big transfer by its chunks, in place.
    keep = np.ones(data.shape[0], dtype=bool)
    keep[big] = False
    position = np.concatenate((np.flatnonzero(keep), big[i]))
    order = np.argsort(position, kind="stable")
    return Transfers(np.concatenate((data[keep], rows))[order])


def _rounds(transfers: Transfers, tensors: Sequence[TensorPlan], world: int, budget: int):
    """Greedy, in order: a round closes when a rank's staged send + receive bytes would pass the budget, or when the
    new shards a rank allocates for the tensors of the round would add up to more than the largest new shard it
    allocates at all (so peak extra memory stays <= that shard + the scratch budget, while small tensors share
    rounds). Direct transfers use no scratch and do not count against the budget."""
    alloc = np.array([[tp.mode[g] == ALLOC for g in range(world)] for tp in tensors], dtype=bool).reshape(-1, world)
    new_bytes = np.array([tp.new_nbytes for tp in tensors], dtype=np.int64)
    cap = [int(new_bytes[alloc[:, g]].max(initial=0)) for g in range(world)]
    data = transfers.data
    k, src, dst = data[:, 0], data[:, 1], data[:, 2]
    # Per transfer, as lists for the sequential greedy: staged bytes, whether src / dst allocate the tensor, its
    # new shard's bytes, and (rank, tensor) keys.
    staged_of = np.where(data[:, 9] == 0, data[:, 8], 0).tolist()
    alloc_src, alloc_dst = alloc[k, src].tolist(), alloc[k, dst].tolist()
    shard = new_bytes[k].tolist()
    key_src, key_dst = (src * len(tensors) + k).tolist(), (dst * len(tensors) + k).tolist()
    src, dst = src.tolist(), dst.tolist()
    rounds, start = [], 0
    load = [0] * world
    in_flight = [0] * world
    counted = {}  # (rank, tensor) key -> the round (its start) whose allocations already count that new shard
    for i in range(len(src)):
        s, d, staged, n = src[i], dst[i], staged_of[i], shard[i]
        while True:
            add_src = alloc_src[i] and counted.get(key_src[i]) != start
            add_dst = alloc_dst[i] and counted.get(key_dst[i]) != start
            too_big = (add_src and in_flight[s] + n > cap[s]) or (add_dst and in_flight[d] + n > cap[d])
            if i > start and (too_big or load[s] + staged > budget or load[d] + staged > budget):
                rounds.append((start, i))
                start = i
                load = [0] * world
                in_flight = [0] * world
                continue
            break
        load[s] += staged
        load[d] += staged
        if add_src:
            in_flight[s] += n
            counted[key_src[i]] = start
        if add_dst:
            in_flight[d] += n
            counted[key_dst[i]] = start
    if start < len(src):
        rounds.append((start, len(src)))
    return rounds


def plan_retp(old_config: TPConfig, new_degree: int, specs: Sequence, *, kv=None,
              placement: Optional[TPConfig] = None, scratch_bytes: int = DEFAULT_SCRATCH_BYTES) -> RetpPlan:
    """Plan changing the TP degree of every instance of `old_config` to `new_degree`.

    specs:        ParamSpec list (e.g. llama_param_specs(config)); every rank must pass the same list
    kv:           optional KVRequest (amoeba_core.kv) describing the paged KV cache and the live sequences
    placement:    pin the new configuration (a TPConfig of degree new_degree); default: the placement that
                  maximises the bytes ranks keep (weights and KV together) among those that satisfy the KV
                  destinations' rank constraints (kv.destinations)
    scratch_bytes: staging budget per rank (send + receive bytes of one round)
    Raises InvalidDegreeError / ConfigError before anything else happens.
    """
    world = old_config.world_size
    if not isinstance(new_degree, int) or new_degree < 1 or world % new_degree:
        raise InvalidDegreeError(f"new TP degree {new_degree} does not divide world size {world}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"parameter names appear more than once: {dup}")
    for spec in specs:
        spec.check_degree(old_config.degree)
        spec.check_degree(new_degree)
    if scratch_bytes < 2:
        raise ScratchBudgetError(f"scratch_bytes must be positive, got {scratch_bytes}")

    kv_planner = None
    if kv is not None:
        kv_planner = KVPlanner(kv, old_config, new_degree)

    if placement is None:
        wg = weight_gain(specs, old_config.degree, new_degree)
        slots = new_slots(world, new_degree)
        gain = np.array([[wg[old_config.slots[g][1], s[1]] for s in slots] for g in range(world)], dtype=np.int64)
        allowed = None
        if kv_planner is not None:
            gain += kv_planner.gain()
            allowed = kv_planner.resolved.allowed
        placement = best_placement(gain, new_degree, allowed)
    elif placement.degree != new_degree or placement.world_size != world:
        raise ConfigError(f"pinned placement {placement.describe()} is not {world // new_degree}x{new_degree} "
                          f"over world size {world}")
    elif kv_planner is not None:
        kv_planner.resolved.check_placement(placement)

    tensors, transfers = plan_weights(specs, old_config, placement)
    # Largest tensors first: in a split each new shard lives beside its old one while it fills, and the shards
    # still to come hold less memory than they will; ending on the smallest keeps the overshoot above the final
    # footprint smallest.
    size = np.array([tp.new_nbytes for tp in tensors], dtype=np.int64)
    transfers = Transfers(transfers.data[np.argsort(-size[transfers.tensor], kind="stable")])
    transfers = _chunk(transfers, tensors, max(1, scratch_bytes // 2))
    rounds = _rounds(transfers, tensors, world, scratch_bytes)
    kv_plan = kv_planner.plan(placement, scratch_bytes) if kv_planner is not None else None
    return RetpPlan(old_config, placement, tuple(specs), tensors, transfers, rounds, scratch_bytes, kv_plan)
