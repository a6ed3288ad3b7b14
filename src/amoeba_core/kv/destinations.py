"""Where a sequence (or a cached block) should go, said before the placement is known.

A destination in KVCache(destinations=..., cached_destinations=...) is one of:

  int d              a label: everything with label d ends in one new instance; which group ranks that instance
                     gets is still the placement optimiser's choice (the byte-maximising one). Labels are
                     0 .. new number of instances - 1 and are the indices of result.config's instances.
  WithSequence(x)    in the same new instance as sequence x (whatever x's destination is, given or default).
  OnRanks(ranks)     on given group ranks: the new instance contains all of `ranks` when there are at most
                     new_degree of them, and lies within them when there are more (exactly them when equal).
                     OnRanks({4}) keeps a sequence on GPU 4; OnRanks(range(4)) keeps it on GPUs 0-3 (any of the
                     instances there, at degree <= 4).
  WithRanksOf(i)     OnRanks(the group ranks of old instance i): in a merge, the new instance that contains old
                     instance i; in a split, one of the instances carved out of it.

The rank constraints are hard constraints of the placement (an assignment problem with forbidden cells): among the
placements that satisfy every constraint, retp picks the one that keeps the most bytes in place. A sequence with a
rank constraint and no label gets a label that can satisfy it (its default label when possible). Impossible
combinations raise ConfigError before anything moves.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Hashable, Iterable, Tuple, Union

from ..errors import ConfigError


@dataclass(frozen=True)
class WithSequence:
    """In the same new instance as sequence `seq_id` (a sequence of any instance of the group)."""

    seq_id: Hashable


@dataclass(frozen=True)
class OnRanks:
    """On group ranks `ranks`: the new instance contains them all (at most new_degree ranks given) or lies within
    them (more given). Stored sorted, so equal sets compare and hash equal on every rank."""

    ranks: Tuple[int, ...]

    def __init__(self, ranks: Iterable[int]):
        try:
            values = sorted({operator.index(r) for r in ranks})
        except TypeError:
            raise ConfigError(f"OnRanks takes group ranks (integers), got {ranks!r}") from None
        if not values:
            raise ConfigError("OnRanks needs at least one group rank")
        object.__setattr__(self, "ranks", tuple(values))


@dataclass(frozen=True)
class WithRanksOf:
    """OnRanks(the group ranks of old instance `instance`)."""

    instance: int


Destination = Union[int, WithSequence, OnRanks, WithRanksOf]


def normalize(value, what: str) -> Destination:
    """A destination as plain, picklable data that every rank renders identically; ConfigError otherwise."""
    if isinstance(value, (WithSequence, OnRanks)):
        return value
    if isinstance(value, WithRanksOf):
        return WithRanksOf(_index(value.instance, what))
    return _index(value, what)


def _index(value, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: destination {value!r} is not an instance index nor a destination constraint")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what}: destination {value!r} is not an instance index (int) nor WithSequence, "
                          f"OnRanks or WithRanksOf") from None
