"""Finest common split of the shards of one tensor at two TP degrees."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

from .specs import ParamSpec, section_pads, section_ranges


@dataclass(frozen=True)
class Piece:
    """A stretch of a new shard along the split dim, in split-dim elements.

    new_start: offset in the new shard; length: elements.
    holders:   old TP ranks whose shard contains this stretch, with the stretch's offset there:
               ((old_tp_rank, old_start), ...).
    padding:   the stretch is vocabulary padding: zeros, never sent; a rank that does not hold it zero-fills it.
    """

    new_start: int
    length: int
    holders: Tuple[Tuple[int, int], ...]
    padding: bool = False


def shard_pieces(spec: ParamSpec, old_degree: int, new_tp_rank: int, new_degree: int) -> Tuple[Piece, ...]:
    """Cut the new shard of TP rank `new_tp_rank` at the boundaries of every old shard (and of padding).

    Pure and cached on the spec's sections, so the identical layers of a model cost one computation.
    """
    spec.check_degree(old_degree)
    spec.check_degree(new_degree)
    return _pieces(spec.sections, old_degree, new_tp_rank, new_degree)


@lru_cache(maxsize=65536)
def _pieces(sections, old_degree, new_tp_rank, new_degree):
    old = [section_ranges(sections, r, old_degree) for r in range(old_degree)]
    pads = section_pads(sections)
    out = []
    pos = 0
    for start, stop in section_ranges(sections, new_tp_rank, new_degree):
        cuts = {start, stop}
        for ranges in old:
            for a, b in ranges:
                for x in (a, b):
                    if start < x < stop:
                        cuts.add(x)
        for a, b in pads:
            for x in (a, b):
                if start < x < stop:
                    cuts.add(x)
        cuts = sorted(cuts)
        for a, b in zip(cuts, cuts[1:]):
            in_pad = any(pa <= a and b <= pb for pa, pb in pads)
            holders = []
            for r, ranges in enumerate(old):
                off = 0
                for oa, ob in ranges:
                    if oa <= a and b <= ob:
                        holders.append((r, off + a - oa))
                    off += ob - oa
            out.append(Piece(pos + a - start, b - a, tuple(holders), in_pad))
        pos += stop - start
    return tuple(out)
