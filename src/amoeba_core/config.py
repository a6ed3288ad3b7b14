"""TP configuration of a process group: which instance and which TP rank each group rank is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError, InvalidDegreeError


@dataclass(frozen=True)
class RankSlot:
    """Where a group rank serves: instance `instance`, TP rank `tp_rank` of `degree`."""

    instance: int
    tp_rank: int
    degree: int


@dataclass(frozen=True)
class TPConfig:
    """A partition of `world_size` group ranks into instances of equal TP degree.

    slots[g] = (instance, tp_rank) of group rank g. Every instance has exactly `degree` ranks with tp ranks
    0..degree-1. Instances are numbered 0..num_instances-1.
    """

    degree: int
    slots: tuple  # tuple[tuple[int, int], ...], indexed by group rank

    def __post_init__(self):
        world = len(self.slots)
        if self.degree < 1 or world == 0 or world % self.degree:
            raise InvalidDegreeError(f"TP degree {self.degree} does not divide world size {world}")
        seen = set()
        for g, (inst, tp) in enumerate(self.slots):
            if not (0 <= inst < world // self.degree and 0 <= tp < self.degree):
                raise ConfigError(f"group rank {g} has slot (instance={inst}, tp_rank={tp}) outside "
                                  f"{world // self.degree} instances of degree {self.degree}")
            if (inst, tp) in seen:
                raise ConfigError(f"slot (instance={inst}, tp_rank={tp}) is held by more than one rank: {self.slots}")
            seen.add((inst, tp))

    @classmethod
    def contiguous(cls, world_size: int, degree: int) -> "TPConfig":
        """Default layout: instance i is group ranks [i*degree, (i+1)*degree), tp rank = offset in the instance."""
        if degree < 1 or world_size < 1 or world_size % degree:
            raise InvalidDegreeError(f"TP degree {degree} does not divide world size {world_size}")
        return cls(degree, tuple((g // degree, g % degree) for g in range(world_size)))

    @classmethod
    def from_instances(cls, instances: Sequence[Sequence[int]]) -> "TPConfig":
        """Build from a list of instances, each the list of its group ranks in TP-rank order."""
        sizes = {len(ranks) for ranks in instances}
        if len(sizes) != 1:
            raise ConfigError(f"instances must all have the same degree, got sizes {[len(r) for r in instances]}")
        world = sum(len(r) for r in instances)
        slots = [None] * world
        for i, ranks in enumerate(instances):
            for tp, g in enumerate(ranks):
                if not 0 <= g < world or slots[g] is not None:
                    raise ConfigError(f"group rank {g} is out of range [0, {world}) or listed twice in {instances}")
                slots[g] = (i, tp)
        return cls(sizes.pop(), tuple(slots))

    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def num_instances(self) -> int:
        return self.world_size // self.degree

    def slot(self, rank: int) -> RankSlot:
        inst, tp = self.slots[rank]
        return RankSlot(inst, tp, self.degree)

    def instances(self) -> list:
        """instances()[i] = group ranks of instance i, in TP-rank order."""
        out = [[None] * self.degree for _ in range(self.num_instances)]
        for g, (inst, tp) in enumerate(self.slots):
            out[inst][tp] = g
        return out

    def describe(self) -> str:
        """e.g. '2x2 [[0, 1], [2, 3]]'."""
        return f"{self.num_instances}x{self.degree} {self.instances()}"
