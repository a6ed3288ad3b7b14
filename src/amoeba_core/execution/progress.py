"""What a rank has done in the move phase, and the damage report a failed transformation leaves behind.

Each rank keeps a Progress while it moves bytes. When a transformation fails after moving began, every rank that
can still answer publishes Progress.local_report(); each of them then assembles the same DamageReport from all the
reports it received, so the caller learns exactly what every rank now holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np

from ..planning.weights import SAME

# State of one weight tensor on one rank.
OLD = "old"          # the dict holds the old shard, bytes unchanged
NEW = "new"          # the dict holds the new shard, complete
BOTH = "both"        # the shard is the same at both degrees (replicated, or same degree and TP rank)
PARTIAL = "partial"  # overwritten in place part way: neither shard; restore it from the checkpoint
UNKNOWN = "unknown"  # the rank did not report (dead or stuck)


class Progress:
    """One rank's progress through the move phase, updated by the weight and KV executors."""

    def __init__(self, plan, rank: int):
        self.plan, self.rank = plan, rank
        self.weights: Dict[str, str] = {t.spec.name: BOTH if t.mode[rank] == SAME else OLD for t in plan.tensors}
        self.kv_layers_done = 0
        self.kv_rounds_started = 0  # rounds of layer kv_layers_done begun
        self.kv_done = plan.kv is None
        self.kv_tail_unmapped = False  # an elastic pool was shrunk: no old block can be trusted any more

    def kv_round_started(self) -> None:
        self.kv_rounds_started += 1

    def kv_layer_done(self) -> None:
        self.kv_layers_done += 1
        self.kv_rounds_started = 0

    def local_report(self) -> dict:
        """Plain data for the other ranks: this rank's weight states and which old KV blocks it still holds."""
        intact = None
        kvp = self.plan.kv
        if kvp is not None:
            new_instance = self.plan.new.slots[self.rank][0]
            if self.kv_tail_unmapped:
                overwritten = np.ones(kvp.old_num_blocks, dtype=bool)
            elif self.kv_layers_done == 0 and self.kv_rounds_started == 0:
                overwritten = np.zeros(kvp.old_num_blocks, dtype=bool)
            else:
                overwritten = kvp.overwritten_old_blocks(new_instance, self.kv_layers_done, self.kv_rounds_started)
            intact = np.packbits(~overwritten)
        return {"rank": self.rank, "weights": dict(self.weights), "kv_intact_old": intact, "kv_done": self.kv_done}


@dataclass(frozen=True)
class SequenceDamage:
    """Where one sequence's KV cache is usable after a failed transformation.

    intact_at_old:   every byte of its blocks is unchanged on every rank of its old instance (old block table)
    complete_at_new: every rank of its new instance finished moving (new_block_table is valid there)
    """

    old_instance: int
    new_instance: int
    intact_at_old: bool
    complete_at_new: bool
    new_block_table: Optional[Tuple[int, ...]] = None


@dataclass
class DamageReport:
    """What a failed transformation left on every rank. The same on every rank that received the same reports.

    old_config, new_config: TPConfigs before and after (the plan's placement)
    phase, failed_rank, cause: where the failure arose (see errors.AmoebaError)
    reported_ranks:  ranks whose reports were received; unresponsive_ranks: the others (dead or stuck)
    weights:         group rank -> tensor name -> "old" | "new" | "both" | "partial" (a rank that did not report
                     is absent: treat all its tensors as lost)
    sequences:       seq_id -> SequenceDamage
    cached_old:      (old instance, key) -> its old block id where its bytes are intact on every rank of the old
                     instance (else None)
    cached_new:      (new instance, key) -> its new block id, where it was to survive and every rank of the new
                     instance finished moving (else None)
    """

    old_config: object
    new_config: object
    phase: str
    failed_rank: Optional[int]
    cause: Optional[str]
    reported_ranks: Tuple[int, ...]
    unresponsive_ranks: Tuple[int, ...]
    tensor_names: Tuple[str, ...] = ()
    weights: Dict[int, Dict[str, str]] = field(default_factory=dict)
    sequences: Dict[Hashable, SequenceDamage] = field(default_factory=dict)
    cached_old: Dict[Tuple[int, Hashable], Optional[int]] = field(default_factory=dict)
    cached_new: Dict[Tuple[int, Hashable], Optional[int]] = field(default_factory=dict)

    def weight_state(self, rank: int, name: str) -> str:
        return self.weights.get(rank, {}).get(name, UNKNOWN)

    def weights_to_restore(self, rank: int, target: str = OLD) -> List[str]:
        """Names of the tensors group rank `rank` must reload (e.g. shard() of the checkpoint) to serve at the
        old configuration (target "old") or the new one (target "new")."""
        if target not in (OLD, NEW):
            raise ValueError(f"target must be {OLD!r} or {NEW!r}, got {target!r}")
        states = self.weights.get(rank)
        if states is None:  # the rank did not report: nothing it holds can be trusted
            return list(self.tensor_names)
        return [name for name, state in states.items() if state not in (target, BOTH)]

    def sequences_lost(self, target: str = OLD) -> List[Hashable]:
        """Sequences whose KV cache is not usable at the target configuration (recompute or drop them)."""
        key = "intact_at_old" if target == OLD else "complete_at_new"
        return [s for s, d in self.sequences.items() if not getattr(d, key)]

    def cached_index(self, instance: int, target: str = OLD) -> Dict[Hashable, int]:
        """key -> block id of the cached blocks still usable at the target configuration: for target "old", those
        of old instance `instance` whose bytes are intact (old ids; the rest must leave the prefix-cache index);
        for "new", those new instance `instance` completed (new ids)."""
        if target not in (OLD, NEW):
            raise ValueError(f"target must be {OLD!r} or {NEW!r}, got {target!r}")
        blocks = self.cached_old if target == OLD else self.cached_new
        return {key: b for (inst, key), b in blocks.items() if inst == instance and b is not None}

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for states in self.weights.values():
            for state in states.values():
                counts[state] = counts.get(state, 0) + 1
        seq = (f"{sum(d.intact_at_old for d in self.sequences.values())} intact at old, "
               f"{sum(d.complete_at_new for d in self.sequences.values())} complete at new, "
               f"{len(self.sequences_lost(OLD))} lost at old of {len(self.sequences)} sequences")
        return (f"damage after a failure in phase {self.phase} (first failing rank {self.failed_rank}): reports "
                f"from ranks {list(self.reported_ranks)}, none from {list(self.unresponsive_ranks)}; weight tensors "
                f"(rank x tensor): {counts}; KV: {seq}")


def assemble_damage(plan, reports: Dict[int, dict], *, phase: str, failed_rank: Optional[int],
                    cause: Optional[str]) -> DamageReport:
    """The group's DamageReport from the local reports that arrived (rank -> Progress.local_report())."""
    world = plan.world_size
    reported = tuple(sorted(reports))
    report = DamageReport(plan.old, plan.new, phase, failed_rank, cause, reported,
                          tuple(r for r in range(world) if r not in reports),
                          tensor_names=tuple(t.spec.name for t in plan.tensors),
                          weights={r: dict(rep["weights"]) for r, rep in sorted(reports.items())})
    kvp = plan.kv
    if kvp is None:
        return report
    intact = {r: np.unpackbits(rep["kv_intact_old"], count=kvp.old_num_blocks).astype(bool)
              for r, rep in reports.items()}
    old_ranks, new_ranks = plan.old.instances(), plan.new.instances()
    new_tables = kvp.block_tables()
    starts = np.concatenate(([0], np.cumsum(kvp.seq_lens)))
    for n, sid in enumerate(kvp.seq_ids):
        inst = int(kvp.seq_instances[n])
        dest = int(kvp.destinations[sid])
        blocks = kvp.old_of_entry[starts[n]:starts[n + 1]]
        at_old = all(r in intact and bool(intact[r][blocks].all()) for r in old_ranks[inst])
        at_new = all(r in reports and reports[r]["kv_done"] for r in new_ranks[dest])
        report.sequences[sid] = SequenceDamage(inst, dest, at_old, at_new,
                                               tuple(new_tables[sid]) if at_new else None)
    for inst, key, b in kvp.old_cached:
        ok = all(r in intact and bool(intact[r][b]) for r in old_ranks[inst])
        report.cached_old[(inst, key)] = int(b) if ok else None
    for (_, key, _, dest), j in zip(kvp.cached, kvp.cached_new_block.tolist()):
        done = all(r in reports and reports[r]["kv_done"] for r in new_ranks[dest])
        report.cached_new[(dest, key)] = int(j) if done else None
    return report
