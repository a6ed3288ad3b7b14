"""KV planning, part 2: which new block each move gets, and when it may be written.

In place, a rank's pool keeps its bytes: at the new degree they are cut into blocks of another size, so a new block
j overlaps old blocks' bytes. Old blocks are consumed (read) in increasing id order, in lockstep on every rank
(time t = old block id); j may be written once every old live block that overlaps it, on every rank of its new
instance, has been consumed: its ready time. The k-th move into a new instance (by time) gets its k-th new block
(by ready time), which minimises what must wait; a move whose block is not ready when its data is read waits in a
park slot of the scratch buffer.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Sequence

import numpy as np

from ..errors import ConfigError


def overlapping_old_blocks(layout, new_blocks: np.ndarray, n_old: int, n_new: int, old_degree: int,
                           new_degree: int):
    """Which old blocks share bytes with each of `new_blocks` in one buffer (the same on every rank of an
    instance). Yields (ok, old_block) array pairs aligned with new_blocks: every old block b = old_block[ok] that
    overlaps the corresponding new block appears in some pair."""
    L = layout
    s_old, s_new = L.region_bytes(old_degree), L.region_bytes(new_degree)
    regions_old = n_old * L.regions_per_buffer
    for c in range(L.num_components):
        idx = L.region_index(c, new_blocks, n_new)
        lo = (idx * s_new) // s_old
        hi = -((-(idx + 1) * s_new) // s_old)
        for m in range(int((hi - lo).max(initial=0))):
            k = lo + m
            ok = (k < hi) & (k < regions_old)
            _, b = L.region_owner(np.where(ok, k, 0), n_old)
            yield ok, b


def old_block_overlaps(layout, n_old: int, n_new: int, old_degree: int, new_degree: int) -> List[np.ndarray]:
    """The old blocks sharing bytes with each new block, as a few (n_new,) int64 arrays: every old block that
    overlaps new block j is arrays[m][j] for some m (n_old where an array has none for j). The same for every new
    instance, so it is computed once per plan."""
    return [np.where(ok, b, n_old) for ok, b in overlapping_old_blocks(layout, np.arange(n_new), n_old, n_new,
                                                                      old_degree, new_degree)]


def ready_times(live: np.ndarray, overlaps: List[np.ndarray], n_new: int) -> np.ndarray:
    """(n_new,) int64: for each new block, the last consumption time of an old block that is live (live[b]) and
    shares bytes with it (-1: free from the start); overlaps from old_block_overlaps."""
    n_old = live.size
    times = np.append(np.where(live, np.arange(n_old), -1), -1)  # index n_old: no old block
    ready = np.full(n_new, -1, dtype=np.int64)
    for b in overlaps:
        np.maximum(ready, times[b], out=ready)
    return ready


def assign_new_blocks(layout, n_new: int, move_dest: np.ndarray, ready: Sequence[np.ndarray],
                      fixed: Dict[int, int]) -> np.ndarray:
    """New block id per move (moves in time order): the caller's choice where `fixed` (move -> id) gives one, else
    the free blocks of the move's new instance in order of ready time."""
    new_block = np.full(move_dest.size, -1, dtype=np.int64)
    for k, j in fixed.items():
        new_block[k] = j
    by_dest = np.argsort(move_dest.astype(np.int16 if len(ready) < (1 << 15) else np.int64), kind="stable")
    bounds = np.searchsorted(move_dest[by_dest], np.arange(len(ready) + 1))
    for d in range(len(ready)):
        moves = by_dest[bounds[d]:bounds[d + 1]]  # in time order
        if fixed:
            taken = new_block[moves[new_block[moves] >= 0]]
            if np.unique(taken).size != taken.size:
                raise ConfigError(f"new instance {d}: the caller's new block tables give one id to two blocks")
            todo = moves[new_block[moves] < 0]
        else:
            taken, todo = moves[:0], moves
        if not todo.size:
            continue
        is_free = np.ones(n_new, dtype=bool)
        is_free[:layout.reserved_blocks] = False
        is_free[taken] = False
        free = np.flatnonzero(is_free)
        new_block[todo] = free[np.argsort(ready[d][free], kind="stable")][:todo.size]
    return new_block


def park_slots(start: np.ndarray, end: np.ndarray, dest: np.ndarray):
    """Park slot per move that waits (end > start), reused once freed; slots are per new instance (its ranks park
    the move's data). Returns (slot per move or -1, slots needed)."""
    park = np.full(start.size, -1, dtype=np.int64)
    busy: Dict[int, list] = {}   # new instance -> heap of (end time, slot)
    free: Dict[int, list] = {}   # new instance -> heap of free slots
    count: Dict[int, int] = {}
    for k in sorted(np.flatnonzero(end > start).tolist(), key=lambda k: (int(start[k]), k)):
        d = int(dest[k])
        heap, fl = busy.setdefault(d, []), free.setdefault(d, [])
        while heap and heap[0][0] <= start[k]:  # freed in an earlier or the same round, before this one parks
            heapq.heappush(fl, heapq.heappop(heap)[1])
        if fl:
            slot = heapq.heappop(fl)
        else:
            slot = count.get(d, 0)
            count[d] = slot + 1
        park[k] = slot
        heapq.heappush(heap, (int(end[k]), slot))
    return park, max(count.values(), default=0)
