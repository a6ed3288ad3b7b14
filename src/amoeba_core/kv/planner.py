"""Planning the KV part of a TP change: destinations, new block ids, and an in-place schedule.

Model. Every old instance i holds live blocks b (ids shared by its TP ranks). A *move* is one live block going to
one new instance I' (a prefix block shared by sequences that go to two instances makes two moves). For each move,
each rank of I' needs its heads of the block: pieces it already holds (local) and pieces held by ranks of i (one
replica sends).

In place. A rank's pool keeps its bytes; at the new degree it is cut into blocks of a new size. Old blocks are
*consumed* (read into scratch, for sending or for local re-placement) in increasing block-id order, in lockstep on
every rank; time t = old block id. A new block j of instance I' may be written once every old live block whose
bytes overlap j's bytes, on every rank of I', has been consumed: its ready time. The k-th move into I' (by time)
gets the k-th new block of I' (by ready time), which minimises what must wait. A move whose block is not ready when
its data is read waits in a *park* area of the scratch buffer. Rounds are runs of consecutive times whose staging
(sends + receives + local re-placements) fits the scratch budget next to the park area.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ..config import TPConfig
from ..errors import CapacityError, ConfigError, ScratchBudgetError
from ..layout.overlap import _pieces
from .request import KVRequest


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


@dataclass
class KVPlan:
    """KV part of a RetpPlan. Arrays are indexed by move, sorted by (time, move order).

    move_instance (old instance i), move_block (old id b = consumption time), move_dest (new instance I'),
    move_new_block (new id j), move_write_time (max(b, ready time of j)), move_park (park slot or -1).
    patterns[(i, I')]: list of PatternPiece. rounds: [(t_lo, t_hi)) of consumption time.
    """

    layout: object
    old_degree: int
    new_degree: int
    old_num_blocks: int
    new_num_blocks: int
    move_instance: np.ndarray
    move_block: np.ndarray
    move_dest: np.ndarray
    move_new_block: np.ndarray
    move_write_time: np.ndarray
    move_park: np.ndarray
    patterns: Dict[Tuple[int, int], List[PatternPiece]]
    rounds: List[Tuple[int, int]]
    park_slots: int
    seq_ids: List[object]                     # sequence ids, in request order
    new_of_entry: np.ndarray                  # new block id of every block-table entry, tables concatenated
    seq_lens: np.ndarray                      # table length per sequence
    destinations: Dict[object, int]           # seq_id -> new instance
    sent: np.ndarray                          # (world,) bytes sent, all layers
    received: np.ndarray
    staging_need: np.ndarray                  # (world,) largest round staging per layer
    world_size: int
    seq_instances: np.ndarray                 # old instance per sequence, in request order
    old_of_entry: np.ndarray                  # old block id of every block-table entry, tables concatenated
    buffer_bytes: int = 0                     # bytes of each physical buffer before the move
    new_buffer_bytes: int = 0                 # ... while the KV cache moves (an elastic pool grown or to shrink)
    _digest: str = field(default="", repr=False)

    # ---- sizes ---------------------------------------------------------------------------------------------
    def block_tables(self, instance=None) -> Dict[object, List[int]]:
        """seq_id -> new block table, for every sequence or only those going to new instance `instance`."""
        starts = np.concatenate(([0], np.cumsum(self.seq_lens)))
        return {sid: self.new_of_entry[starts[n]:starts[n + 1]].tolist() for n, sid in enumerate(self.seq_ids)
                if instance is None or self.destinations[sid] == instance}

    @property
    def unit_bytes(self) -> int:
        """Bytes of one head of one block, every component (K and V, or MLA's latent), one layer."""
        L = self.layout
        return L.num_components * L.block_size * L.head_dim * L.itemsize

    @property
    def park_bytes(self) -> int:
        return self.park_slots * self.layout.block_bytes(self.new_degree)

    @property
    def bytes_moved(self) -> int:
        return int(self.received.sum())

    @property
    def num_moves(self) -> int:
        return int(self.move_block.size)

    def bytes_sent(self) -> np.ndarray:
        return self.sent

    def bytes_received(self) -> np.ndarray:
        return self.received

    def scratch_need(self, rank: int) -> int:
        return int(self.park_bytes + self.staging_need[rank])

    def overwritten_old_blocks(self, new_instance: int, layers_done: int, rounds_started: int) -> np.ndarray:
        """(old_num_blocks,) bool: old blocks whose bytes a rank of `new_instance` may have overwritten in some
        layer, once it has finished `layers_done` layers and started `rounds_started` rounds of the next one.
        Conservative: every write of a started round counts as done."""
        moves = self.move_dest == new_instance
        if layers_done == 0:
            hi = self.rounds[rounds_started - 1][1] if rounds_started > 0 else -1
            moves &= self.move_write_time < hi
        out = np.zeros(self.old_num_blocks, dtype=bool)
        written = np.unique(self.move_new_block[moves])
        for ok, b in overlapping_old_blocks(self.layout, written, self.old_num_blocks, self.new_num_blocks,
                                            self.old_degree, self.new_degree):
            out[b[ok]] = True
        return out

    def digest(self) -> str:
        if not self._digest:
            h = hashlib.sha256()
            h.update(f"{self.layout.signature()}|{self.old_degree}|{self.new_degree}|{self.old_num_blocks}|"
                     f"{self.new_num_blocks}|{self.rounds}|{self.park_slots}|{self.buffer_bytes}|"
                     f"{self.new_buffer_bytes}".encode())
            for a in (self.move_instance, self.move_block, self.move_dest, self.move_new_block,
                      self.move_write_time, self.move_park):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            h.update(repr(sorted(self.patterns.items())).encode())
            h.update(repr(self.seq_ids).encode())
            h.update(np.ascontiguousarray(self.new_of_entry, dtype=np.int64).tobytes())
            h.update(repr(sorted(self.destinations.items(), key=lambda kv: repr(kv[0]))).encode())
            self._digest = h.hexdigest()
        return self._digest

    def summary(self) -> str:
        parked = int((self.move_park >= 0).sum())
        return (f"kv: {self.num_moves} block moves ({self.layout.engine} {self.layout.order}, {self.old_num_blocks} "
                f"-> {self.new_num_blocks} blocks per rank), {self.bytes_moved} bytes moved, {len(self.rounds)} "
                f"rounds per layer, {parked} moves parked in {self.park_slots} slots ({self.park_bytes} bytes)")


def _default_destinations(req: KVRequest, old_degree: int, new_degree: int) -> Dict[object, int]:
    """Merges keep every sequence of an old instance together; splits balance blocks over the new instances that
    the old instance's ranks cover in the contiguous layout (largest sequences first)."""
    out = dict(req.destinations)
    by_instance: Dict[int, list] = {}
    for inst, seq_id, table in req.sequences:
        if seq_id not in out:
            by_instance.setdefault(inst, []).append((seq_id, len(table)))
    for inst, seqs in by_instance.items():
        first = inst * old_degree // new_degree
        last = ((inst + 1) * old_degree - 1) // new_degree
        if first == last:  # a merge (or same degree): the whole instance goes to one place
            out.update((seq_id, first) for seq_id, _ in seqs)
            continue
        load = {d: 0 for d in range(first, last + 1)}
        for seq_id, n in sorted(seqs, key=lambda s: -s[1]):  # stable: ties keep the caller's order
            d = min(load, key=lambda k: (load[k], k))
            out[seq_id] = d
            load[d] += n
    return out


class KVPlanner:
    """Validates a KVRequest against the old configuration and the new degree, then plans (see module doc)."""

    def __init__(self, req: KVRequest, old: TPConfig, new_degree: int):
        L = req.layout
        L.check_degree(old.degree)
        L.check_degree(new_degree)
        self.req, self.old, self.new_degree = req, old, new_degree
        self.n_old = req.num_blocks
        expect = self.n_old * L.regions_per_buffer * L.region_bytes(old.degree)
        if req.buffer_bytes < expect:
            raise ConfigError(f"KV buffer of {req.buffer_bytes} bytes does not hold {self.n_old} blocks of "
                              f"{L.region_bytes(old.degree)} bytes per component ({expect} bytes)")
        # The new blocks fit the buffers as they will be when the KV cache moves: grown first (a merge with an
        # elastic pool), shrunk after (a split), else the same bytes. The old blocks lie in [0, expect) of it.
        self.new_buffer_bytes = req.new_buffer_bytes if req.new_buffer_bytes is not None else req.buffer_bytes
        self.n_new = L.num_blocks_for(self.new_buffer_bytes, new_degree)
        world = old.world_size
        self.num_new_instances = world // new_degree
        self.destinations = _default_destinations(req, old.degree, new_degree)
        # Flatten every block table into entries; entry e belongs to sequence entry_seq[e].
        seq_ids = [seq_id for _, seq_id, _ in req.sequences]
        self.seq_ids = seq_ids
        seq_inst = self.seq_inst = np.array([inst for inst, _, _ in req.sequences], dtype=np.int64)
        self.seq_lens = np.array([len(t) for _, _, t in req.sequences], dtype=np.int64)
        seq_dest = np.array([self.destinations.get(sid, -1) for sid in seq_ids], dtype=np.int64)
        blocks = np.fromiter(itertools.chain.from_iterable(t for _, _, t in req.sequences), dtype=np.int64,
                             count=int(self.seq_lens.sum()))
        entry_seq = np.repeat(np.arange(len(seq_ids)), self.seq_lens)
        bad_dest = np.flatnonzero((seq_dest < 0) | (seq_dest >= self.num_new_instances))
        if bad_dest.size:
            sid = seq_ids[bad_dest[0]]
            raise ConfigError(f"sequence {sid!r}: destination instance {self.destinations.get(sid)} is outside "
                              f"[0, {self.num_new_instances})")
        bad_block = np.flatnonzero((blocks < L.reserved_blocks) | (blocks >= self.n_old))
        if bad_block.size:
            k = int(entry_seq[bad_block[0]])
            bad = sorted({int(x) for x in blocks[bad_block[entry_seq[bad_block] == k]]})[:5]
            raise ConfigError(f"sequence {seq_ids[k]!r} of instance {int(seq_inst[k])}: block ids {bad} are outside "
                              f"[{L.reserved_blocks}, {self.n_old})")
        unknown = sorted(set(self.destinations) - set(seq_ids), key=repr)
        if unknown:
            raise ConfigError(f"destinations given for unknown sequences {unknown[:5]}")
        # Unique moves (old block, old instance, new instance), sorted in that order: time order.
        n_inst, n_dest = old.num_instances, self.num_new_instances
        key = (blocks * n_inst + seq_inst[entry_seq]) * n_dest + seq_dest[entry_seq]
        mark = np.zeros(self.n_old * n_inst * n_dest, dtype=bool)
        mark[key] = True
        moves = np.flatnonzero(mark)              # sorted unique keys, without a sort
        self.entry_move = (np.cumsum(mark) - 1)[key]
        self.mb, rest = moves // (n_inst * n_dest), moves % (n_inst * n_dest)
        self.mi, self.md = rest // n_dest, rest % n_dest
        need = np.bincount(self.md, minlength=self.num_new_instances)
        avail = self.n_new - L.reserved_blocks
        for d in range(self.num_new_instances):
            if need[d] > avail:
                raise CapacityError(
                    f"new instance {d} needs {int(need[d])} KV blocks but a rank's pool holds only {avail} at degree "
                    f"{new_degree} ({self.new_buffer_bytes} bytes per buffer, {L.block_bytes(new_degree)} bytes per "
                    f"block "
                    f"per layer{', ' + str(L.reserved_blocks) + ' reserved' if L.reserved_blocks else ''})")
        pairs, counts = np.unique(self.mi * n_dest + self.md, return_counts=True)
        self.pair_counts = {(int(p // n_dest), int(p % n_dest)): int(c) for p, c in zip(pairs, counts)}

    # ---- placement -----------------------------------------------------------------------------------------
    def head_overlap(self) -> np.ndarray:
        """(old_degree, new_degree): heads of new TP rank r' that old TP rank r holds."""
        L, t0, t1 = self.req.layout, self.old.degree, self.new_degree
        out = np.zeros((t0, t1), dtype=np.int64)
        for r1 in range(t1):
            a1, b1 = L.head_range(r1, t1)
            for r0 in range(t0):
                a0, b0 = L.head_range(r0, t0)
                out[r0, r1] = max(0, min(b0, b1) - max(a0, a1))
        return out

    def gain(self) -> np.ndarray:
        """(world, world) KV bytes group rank g keeps if it takes new slot s (slot order of new_slots())."""
        L, world, t1 = self.req.layout, self.old.world_size, self.new_degree
        per_head = L.num_components * L.block_size * L.head_dim * L.itemsize * L.num_layers
        ho = self.head_overlap() * per_head
        out = np.zeros((world, world), dtype=np.int64)
        for g in range(world):
            i, r = self.old.slots[g]
            for s in range(world):
                out[g, s] = self.pair_counts.get((i, s // t1), 0) * ho[r, s % t1]
        return out

    # ---- plan ----------------------------------------------------------------------------------------------
    def plan(self, new: TPConfig, send_load: np.ndarray, scratch_bytes: int) -> KVPlan:
        L, old = self.req.layout, self.old
        world, t0, t1 = old.world_size, old.degree, new.degree
        old_ranks, new_ranks = old.instances(), new.instances()
        live = np.zeros((old.num_instances, self.n_old), dtype=bool)
        live[self.mi, self.mb] = True
        ready = {d: self._ready_times(live, {old.slots[g][0] for g in new_ranks[d]})
                 for d in range(self.num_new_instances)}
        new_block = np.full(self.mb.size, -1, dtype=np.int64)
        self._assign_new_blocks(new_block, ready)
        ready_of_move = np.stack([ready[d] for d in range(self.num_new_instances)])[self.md, new_block]
        write_time = np.maximum(self.mb, ready_of_move)
        park, park_slots = _park_slots(self.mb, write_time, self.md)

        # Patterns: which rank sends which heads of a block from old instance i to new instance d.
        patterns: Dict[Tuple[int, int], List[PatternPiece]] = {}
        for (i, d) in sorted(self.pair_counts):
            pieces = []
            for r1 in range(t1):
                dst = new_ranks[d][r1]
                for p in _pieces((L.section,), t0, r1, t1):
                    own = [(dst, off) for r0, off in p.holders if old.slots[dst] == (i, r0)]
                    sources = tuple(own) if own else tuple((old_ranks[i][r0], off) for r0, off in p.holders)
                    pieces.append(PatternPiece(dst, r1, p.new_start, p.length, sources, bool(own)))
            patterns[(i, d)] = pieces

        # Bytes per rank and per time (one layer), for the byte counts and the rounds.
        unit = L.num_components * L.block_size * L.head_dim * L.itemsize
        reads = np.zeros((world, self.n_old), dtype=np.int64)
        recvs = np.zeros((world, self.n_old), dtype=np.int64)
        sent = np.zeros(world, dtype=np.int64)
        received = np.zeros(world, dtype=np.int64)
        for (i, d), pieces in patterns.items():
            sel = (self.mi == i) & (self.md == d)
            blocks = self.mb[sel]
            for pc in pieces:
                nbytes = pc.nheads * unit
                if pc.local:
                    reads[pc.dst] += np.bincount(blocks, minlength=self.n_old) * nbytes
                    continue
                choice = (blocks + pc.dst_tp) % len(pc.sources)
                for k, (src, _) in enumerate(pc.sources):
                    bsel = blocks[choice == k]
                    reads[src] += np.bincount(bsel, minlength=self.n_old) * nbytes
                    sent[src] += bsel.size * nbytes
                    send_load[src] += bsel.size * nbytes * L.num_layers
                recvs[pc.dst] += np.bincount(blocks, minlength=self.n_old) * nbytes
                received[pc.dst] += blocks.size * nbytes
        park_bytes = park_slots * L.block_bytes(t1)
        budget = scratch_bytes - park_bytes
        rounds, staging_need = _rounds(reads + recvs, budget, park_bytes, scratch_bytes)

        return KVPlan(L, t0, t1, self.n_old, self.n_new, self.mi, self.mb, self.md, new_block, write_time, park,
                      patterns, rounds, park_slots, self.seq_ids, new_block[self.entry_move], self.seq_lens,
                      dict(self.destinations), sent * L.num_layers,
                      received * L.num_layers, staging_need, world, self.seq_inst, self.mb[self.entry_move],
                      self.req.buffer_bytes, self.new_buffer_bytes)

    def _ready_times(self, live: np.ndarray, old_instances) -> np.ndarray:
        """(n_new,) for each new block: the last consumption time of an old live block its bytes overlap on any
        rank of the new instance (-1: free from the start)."""
        any_live = np.zeros(self.n_old, dtype=bool)
        for i in old_instances:
            any_live |= live[i]
        times = np.where(any_live, np.arange(self.n_old), -1)
        ready = np.full(self.n_new, -1, dtype=np.int64)
        for ok, b in overlapping_old_blocks(self.req.layout, np.arange(self.n_new), self.n_old, self.n_new,
                                            self.old.degree, self.new_degree):
            ready = np.maximum(ready, np.where(ok, times[b], -1))
        return ready

    def _assign_new_blocks(self, new_block: np.ndarray, ready: Dict[int, np.ndarray]) -> None:
        L = self.req.layout
        fixed: Dict[int, int] = {}
        starts = np.concatenate(([0], np.cumsum(self.seq_lens)[:-1]))
        for n, (inst, seq_id, table) in enumerate(self.req.sequences):
            want = self.req.new_block_tables.get(seq_id)
            if want is None:
                continue
            if len(want) != len(table):
                raise ConfigError(f"sequence {seq_id!r}: new block table has {len(want)} entries, the old one "
                                  f"{len(table)}")
            for pos, (b, j) in enumerate(zip(table, want)):
                k = int(self.entry_move[starts[n] + pos])
                if not L.reserved_blocks <= j < self.n_new:
                    raise ConfigError(f"sequence {seq_id!r}: new block id {j} is outside "
                                      f"[{L.reserved_blocks}, {self.n_new})")
                if fixed.setdefault(k, int(j)) != j:
                    raise ConfigError(f"sequence {seq_id!r}: block {b} of instance {inst} is given new ids "
                                      f"{fixed[k]} and {j} by different sequences")
        for k, j in fixed.items():
            new_block[k] = j
        for d in range(self.num_new_instances):
            moves = np.flatnonzero(self.md == d)
            taken = new_block[moves[new_block[moves] >= 0]]
            if np.unique(taken).size != taken.size:
                raise ConfigError(f"new instance {d}: the caller's new block tables give one id to two blocks")
            todo = moves[new_block[moves] < 0]  # already in time order
            is_free = np.ones(self.n_new, dtype=bool)
            is_free[:L.reserved_blocks] = False
            is_free[taken] = False
            free = np.flatnonzero(is_free)
            order = free[np.argsort(ready[d][free], kind="stable")]
            new_block[todo] = order[:todo.size]


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


def _park_slots(start: np.ndarray, end: np.ndarray, dest: np.ndarray):
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


def _rounds(need: np.ndarray, budget: int, park_bytes: int, scratch_bytes: int):
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
    last_active = int(np.flatnonzero(need[active].any(axis=0)).max())
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
