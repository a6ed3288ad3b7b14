"""KV planning, part 3: who sends which heads of a block, and rounds that fit the scratch budget.

For each pair (old instance i, new instance I') a *pattern* lists, per TP rank of I', the head ranges it needs and
where they come from: pieces it already holds (local) or the ranks of i holding them. When several ranks hold a piece
(KV heads replicated at the old degree) one sends it, chosen by source_choice(), the one place that decision is
made. Bytes per rank and per consumption time give the byte counts and the rounds: runs of consecutive times whose
staging (sends + receives + local re-placements) fits the scratch budget next to the park area.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ..errors import ScratchBudgetError
from ..layout.overlap import _pieces


@dataclass(frozen=True)
class PatternPiece:
    """Heads [new_off, +nheads) of the block on dst (a group rank); sources: ((group rank, old head offset), ...)
    candidates; a move uses sources[0] when local, else sources[(block + dst_tp) % len]."""

    dst: int
    dst_tp: int
    new_off: int
    nheads: int
    sources: Tuple[Tuple[int, int], ...]
    local: bool


def source_choice(blocks: np.ndarray, piece: PatternPiece) -> np.ndarray:
    """Index into piece.sources of the rank that sends `piece` of each block (0 for a local piece): replicas take
    turns by block id, offset by the receiver's TP rank, so senders share the load."""
    if piece.local:
        return np.zeros(blocks.size, dtype=np.int64)
    return (blocks + piece.dst_tp) % len(piece.sources)


def build_patterns(pairs, layout, old, new) -> Dict[Tuple[int, int], List[PatternPiece]]:
    """patterns[(i, I')] for every (old instance, new instance) pair in `pairs`."""
    old_ranks, new_ranks = old.instances(), new.instances()
    t0, t1 = old.degree, new.degree
    patterns = {}
    for (i, d) in sorted(pairs):
        pieces = []
        for r1 in range(t1):
            dst = new_ranks[d][r1]
            for p in _pieces((layout.section,), t0, r1, t1):
                own = [(dst, off) for r0, off in p.holders if old.slots[dst] == (i, r0)]
                sources = tuple(own) if own else tuple((old_ranks[i][r0], off) for r0, off in p.holders)
                pieces.append(PatternPiece(dst, r1, p.new_start, p.length, sources, bool(own)))
        patterns[(i, d)] = pieces
    return patterns


def traffic(patterns, layout, pair_moves, move_block, n_old: int, world: int):
    """Bytes of one layer: need[g, t], what rank g stages at consumption time t (its reads: sends and local
    re-placements, plus its receives), sent[g] and received[g] (crossing ranks)."""
    unit = layout.num_components * layout.block_size * layout.head_dim * layout.itemsize
    need = np.zeros((world, n_old), dtype=np.int64)
    sent = np.zeros(world, dtype=np.int64)
    received = np.zeros(world, dtype=np.int64)
    for (i, d), pieces in patterns.items():
        blocks = move_block[pair_moves[(i, d)]]
        per_time = np.bincount(blocks, minlength=n_old)  # a move's block is its time
        # Bytes per block, summed per rank first: one pass over the times per rank, not per piece.
        whole: Dict[int, int] = {}                     # rank -> bytes of every block it reads or receives
        strided: Dict[Tuple[int, int, int], int] = {}  # (rank, n, first) -> bytes of blocks t = first (mod n)
        for pc in pieces:
            nbytes = pc.nheads * unit
            if pc.local:
                whole[pc.dst] = whole.get(pc.dst, 0) + nbytes
                continue
            # source_choice by time: replica k sends the blocks t with (t + dst_tp) % n == k.
            n = len(pc.sources)
            for k, (src, _) in enumerate(pc.sources):
                key = (src, n, (k - pc.dst_tp) % n)
                strided[key] = strided.get(key, 0) + nbytes
            whole[pc.dst] = whole.get(pc.dst, 0) + nbytes
            received[pc.dst] += blocks.size * nbytes
        for g, nbytes in whole.items():
            need[g] += per_time * nbytes
        for (g, n, first), nbytes in strided.items():
            need[g, first::n] += per_time[first::n] * nbytes
            sent[g] += int(per_time[first::n].sum()) * nbytes
    return need, sent, received


def pair_bytes(kvp) -> np.ndarray:
    """(world, world) KV bytes rank src sends rank dst over every layer (the same choice of replicas as traffic)."""
    L = kvp.layout
    unit = L.num_components * L.block_size * L.head_dim * L.itemsize * L.num_layers
    out = np.zeros((kvp.world_size, kvp.world_size), dtype=np.int64)
    for (i, d), pieces in kvp.patterns.items():
        blocks = kvp.move_block[kvp.pair_moves[(i, d)]]
        for pc in pieces:
            if pc.local:
                continue
            choice = source_choice(blocks, pc)
            for k, (src, _) in enumerate(pc.sources):
                out[src, pc.dst] += int((choice == k).sum()) * pc.nheads * unit
    return out


def cut_rounds(need: np.ndarray, budget: int, park_bytes: int, scratch_bytes: int):
    """Cut consumption time into rounds whose per-rank staging (need[g, t] summed) fits `budget`."""
    world, n = need.shape
    largest = int(need.max(initial=0))
    if largest > budget:
        raise ScratchBudgetError(
            f"KV relayout needs {largest} bytes of staging for one block plus {park_bytes} bytes of park area, "
            f"more than the scratch budget of {scratch_bytes} bytes; raise scratch_bytes to at least "
            f"{largest + park_bytes}")
    cum = np.cumsum(need, axis=1)
    rounds, start = [], 0
    staging = np.zeros(world, dtype=np.int64)
    active = np.flatnonzero(cum[:, -1] > 0) if n else np.array([], dtype=np.int64)
    if active.size == 0:
        return [], staging
    # The last time any rank stages something: where each active rank's running total reaches its end.
    last_active = max(int(np.searchsorted(cum[g], cum[g, -1], side="left")) for g in active.tolist())
    while start <= last_active:
        end = n
        base = cum[:, start - 1] if start else np.zeros(world, dtype=np.int64)
        for g in active:
            end = min(end, int(np.searchsorted(cum[g], base[g] + budget, side="right")))
        end = max(end, start + 1)
        staging = np.maximum(staging, cum[:, end - 1] - base)
        rounds.append((start, end))
        start = end
    return rounds, staging
