"""plan_retp: the pure, deterministic description of a TP change. No process group, no tensors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..config import TPConfig
from ..errors import ConfigError, InvalidDegreeError, ScratchBudgetError
from .kv_plan import KVPlanner
from .kv_rounds import pair_bytes as kv_pair_bytes
from .placement import best_placement, new_slots
from .weights import ALLOC, COMPACT, SAME, VIEW, TensorPlan, Transfer, Transfers, plan_weights, weight_gain

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
            total += int((moved[:, 2] * moved[:, 3] * moved[:, 6] * moved[:, 9]).sum())
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
    Direct transfers (no scratch) stay whole. Order is kept: a transfer's chunks replace it in place."""
    data = transfers.data
    big = np.flatnonzero((data[:, 8] > max_chunk) & (data[:, 9] == 0))
    if big.size == 0:
        return transfers
    pieces = []  # (row index, chunk rows)
    for i in big.tolist():
        t = Transfer(*data[i, :-1].tolist(), False)
        tp = tensors[t.tensor]
        outer = t.outer_stop - t.outer_start
        slab = outer * tp.row_bytes  # bytes of one split-dim element across all outer indices
        rows = []
        if slab <= max_chunk:
            step = max_chunk // slab
            for a in range(0, t.length, step):
                n = min(step, t.length - a)
                rows.append((t.tensor, t.src, t.dst, t.old_start + a, t.new_start + a, n, t.outer_start,
                             t.outer_stop, n * slab, 0))
        else:
            if tp.row_bytes > max_chunk:
                raise ScratchBudgetError(
                    f"{tp.spec.name}: one row of {tp.row_bytes} bytes does not fit half the scratch budget "
                    f"({max_chunk} bytes); raise scratch_bytes to at least {2 * tp.row_bytes}")
            step_len = min(t.length, max_chunk // tp.row_bytes)
            for a in range(0, t.length, step_len):
                n = min(step_len, t.length - a)
                per = max(1, max_chunk // (n * tp.row_bytes))
                for o in range(t.outer_start, t.outer_stop, per):
                    o2 = min(o + per, t.outer_stop)
                    rows.append((t.tensor, t.src, t.dst, t.old_start + a, t.new_start + a, n, o, o2,
                                 (o2 - o) * n * tp.row_bytes, 0))
        pieces.append((i, np.array(rows, dtype=np.int64)))
    out, prev = [], 0
    for i, rows in pieces:
        out += [data[prev:i], rows]
        prev = i + 1
    out.append(data[prev:])
    return Transfers(np.concatenate(out))


def _rounds(transfers: Transfers, tensors: Sequence[TensorPlan], world: int, budget: int):
    """Greedy, in order: a round closes when a rank's staged send + receive bytes would pass the budget, or when the
    new shards a rank allocates for the tensors of the round would add up to more than the largest new shard it
    allocates at all (so peak extra memory stays <= that shard + the scratch budget, while small tensors share
    rounds). Direct transfers use no scratch and do not count against the budget."""
    alloc = np.array([[tp.mode[g] == ALLOC for g in range(world)] for tp in tensors], dtype=bool).reshape(-1, world)
    new_bytes = [tp.new_nbytes for tp in tensors]
    cap = [max([new_bytes[k] for k in np.flatnonzero(alloc[:, g])], default=0) for g in range(world)]
    alloc_rows = alloc.tolist()
    rounds, start = [], 0
    load = [0] * world
    in_flight = [0] * world
    counted = set()  # (rank, tensor) whose new shard this round already counts
    rows = transfers.data[:, [0, 1, 2, 8, 9]].tolist()
    for i, (k, src, dst, nbytes, direct) in enumerate(rows):
        staged = 0 if direct else nbytes
        while True:
            add_src = alloc_rows[k][src] and (src, k) not in counted
            add_dst = alloc_rows[k][dst] and (dst, k) not in counted
            n = new_bytes[k]
            too_big = (add_src and in_flight[src] + n > cap[src]) or (add_dst and in_flight[dst] + n > cap[dst])
            if i > start and (too_big or load[src] + staged > budget or load[dst] + staged > budget):
                rounds.append((start, i))
                start = i
                load = [0] * world
                in_flight = [0] * world
                counted.clear()
                continue
            break
        load[src] += staged
        load[dst] += staged
        if add_src:
            in_flight[src] += n
            counted.add((src, k))
        if add_dst:
            in_flight[dst] += n
            counted.add((dst, k))
    if start < len(rows):
        rounds.append((start, len(rows)))
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
