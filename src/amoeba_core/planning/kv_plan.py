"""KV planning, part 1: the plan of the KV cache's move (KVPlan) and the planner that validates a request and ties
the parts together.

Model. Every old instance i holds live blocks b (ids shared by its TP ranks). A *move* is one live block going to
one new instance I' (a prefix block shared by sequences that go to two instances makes two moves). For each move,
each rank of I' needs its heads of the block: pieces it already holds (local) and pieces held by ranks of i (one
replica sends). The parts:

  planning.kv_destinations  which new instance (label) each sequence and cached block goes to, rank constraints
  here                  the moves, KVPlan
  planning.kv_blocks    new block ids, ready times and park slots (the in-place schedule)
  planning.kv_rounds    who sends which heads (patterns, the replica choice), byte counts, rounds
  planning.kv_program   one rank's copies and messages, round by round (what the executor runs)
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ..config import TPConfig
from ..errors import CapacityError, ConfigError
from ..kv.request import KVRequest
from .kv_destinations import resolve_destinations
from .kv_blocks import assign_new_blocks, old_block_overlaps, overlapping_old_blocks, park_slots, ready_times
from .kv_rounds import PatternPiece, build_patterns, cut_rounds, traffic


@dataclass
class KVPlan:
    """KV part of a RetpPlan. Arrays are indexed by move, sorted by (time, move order).

    move_instance (old instance i), move_block (old id b = consumption time), move_dest (new instance I'),
    move_new_block (new id j), move_ready (ready time of j: the last consumption of an old live block sharing its
    bytes, -1 if none), move_write_time (max(b, move_ready)), move_park (park slot or -1).
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
    move_ready: np.ndarray
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
    cached: List[Tuple[int, object, int, int]] = field(default_factory=list)  # (old inst, key, old block, new inst)
    cached_new_block: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    old_cached: List[Tuple[int, object, int]] = field(default_factory=list)  # every (old inst, key, block) given
    pair_moves: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)  # (i, I') -> moves
    _digest: str = field(default="", repr=False)

    # ---- sizes ---------------------------------------------------------------------------------------------
    def block_tables(self, instance=None) -> Dict[object, List[int]]:
        """seq_id -> new block table, for every sequence or only those going to new instance `instance`."""
        starts = np.concatenate(([0], np.cumsum(self.seq_lens)))
        return {sid: self.new_of_entry[starts[n]:starts[n + 1]].tolist() for n, sid in enumerate(self.seq_ids)
                if instance is None or self.destinations[sid] == instance}

    def cached_blocks(self, instance: int) -> Dict[object, int]:
        """key -> new block id of the cached blocks new instance `instance` holds after the move."""
        return {key: int(j) for (_, key, _, d), j in zip(self.cached, self.cached_new_block) if d == instance}

    def block_map(self, instance: int) -> Dict[int, Dict[int, int]]:
        """old instance -> {old block id: new block id} of every block new instance `instance` receives."""
        sel = np.flatnonzero(self.move_dest == instance)
        old_inst, old_block, new_block = self.move_instance[sel], self.move_block[sel], self.move_new_block[sel]
        return {i: dict(zip(old_block[old_inst == i].tolist(), new_block[old_inst == i].tolist()))
                for i in np.unique(old_inst).tolist()}

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
                      self.move_write_time, self.move_park, self.move_ready):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            h.update(repr(sorted(self.patterns.items())).encode())
            h.update(repr(self.seq_ids).encode())
            h.update(np.ascontiguousarray(self.new_of_entry, dtype=np.int64).tobytes())
            h.update(repr(sorted(self.destinations.items(), key=lambda kv: repr(kv[0]))).encode())
            h.update(repr(self.cached).encode())
            h.update(np.ascontiguousarray(self.cached_new_block, dtype=np.int64).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def summary(self) -> str:
        parked = int((self.move_park >= 0).sum())
        cached = f", {len(self.cached)} cached blocks kept" if self.cached else ""
        return (f"kv: {self.num_moves} block moves ({self.layout.engine} {self.layout.order}, {self.old_num_blocks} "
                f"-> {self.new_num_blocks} blocks per rank{cached}), {self.bytes_moved} bytes moved, "
                f"{len(self.rounds)} rounds per layer, {parked} moves parked in {self.park_slots} slots "
                f"({self.park_bytes} bytes)")


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
        resolved = self.resolved = resolve_destinations(req, old, new_degree)
        self.destinations = resolved.seq_label
        # Flatten every block table into entries (entry e belongs to sequence entry_seq[e]), then one entry per
        # surviving cached block (entry_seq = len(sequences) + its index in resolved.cached).
        seq_ids = [seq_id for _, seq_id, _ in req.sequences]
        self.seq_ids = seq_ids
        self.seq_inst = np.array([inst for inst, _, _ in req.sequences], dtype=np.int64)
        self.seq_lens = np.array([len(t) for _, _, t in req.sequences], dtype=np.int64)
        cached = resolved.cached
        n_entries = int(self.seq_lens.sum())
        self.num_seq_entries = n_entries
        entry_count = n_entries + len(cached)
        blocks = np.fromiter(itertools.chain(itertools.chain.from_iterable(t for _, _, t in req.sequences),
                                             (b for _, _, b, _ in cached)), dtype=np.int64, count=entry_count)
        entry_seq = np.concatenate((np.repeat(np.arange(len(seq_ids)), self.seq_lens),
                                    len(seq_ids) + np.arange(len(cached)))).astype(np.int64)
        item_inst = np.concatenate((self.seq_inst, np.array([i for i, _, _, _ in cached], dtype=np.int64)))
        item_dest = np.array([self.destinations[sid] for sid in seq_ids] + [d for _, _, _, d in cached],
                             dtype=np.int64)
        item_name = seq_ids + [f"cached block {key!r}" for _, key, _, _ in cached]
        bad_block = np.flatnonzero((blocks < L.reserved_blocks) | (blocks >= self.n_old))
        if bad_block.size:
            k = int(entry_seq[bad_block[0]])
            bad = sorted({int(x) for x in blocks[bad_block[entry_seq[bad_block] == k]]})[:5]
            what = f"sequence {item_name[k]!r}" if k < len(seq_ids) else item_name[k]
            raise ConfigError(f"{what} of instance {int(item_inst[k])}: block ids {bad} are outside "
                              f"[{L.reserved_blocks}, {self.n_old})")
        # Unique moves (old block, old instance, new instance), sorted in that order: time order. The (old, new
        # instance) pairs that occur are numbered in that order first, so the keys span blocks x pairs.
        n_dest = self.num_new_instances
        pair_codes, item_pair = np.unique(item_inst * n_dest + item_dest, return_inverse=True)
        n_pairs = max(pair_codes.size, 1)
        key = blocks * n_pairs + item_pair.reshape(-1)[entry_seq]
        mark = np.zeros(self.n_old * n_pairs, dtype=bool)
        mark[key] = True
        moves = np.flatnonzero(mark)              # sorted unique keys, without a sort
        self.entry_move = (np.cumsum(mark) - 1)[key]
        self.mb, move_pair = np.divmod(moves, n_pairs)
        self.mi, self.md = np.divmod(pair_codes[move_pair], n_dest)
        # Every pair's moves in time order, found once (planning.kv_rounds and kv_program walk them per pair).
        by_pair = np.argsort(move_pair.astype(np.int16 if n_pairs < (1 << 15) else np.int64), kind="stable")
        bounds = np.searchsorted(move_pair[by_pair], np.arange(n_pairs + 1))
        self.pair_moves = {divmod(int(c), n_dest): by_pair[bounds[k]:bounds[k + 1]]
                           for k, c in enumerate(pair_codes.tolist())}
        need = np.bincount(self.md, minlength=self.num_new_instances)
        avail = self.n_new - L.reserved_blocks
        for d in range(self.num_new_instances):
            if need[d] > avail:
                raise CapacityError(
                    f"new instance {d} needs {int(need[d])} KV blocks but a rank's pool holds only {avail} at degree "
                    f"{new_degree} ({self.new_buffer_bytes} bytes per buffer, {L.block_bytes(new_degree)} bytes per "
                    f"block "
                    f"per layer{', ' + str(L.reserved_blocks) + ' reserved' if L.reserved_blocks else ''})")
        self.pair_counts = {pair: int(m.size) for pair, m in self.pair_moves.items() if m.size}

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
    def plan(self, new: TPConfig, scratch_bytes: int) -> KVPlan:
        L, old = self.req.layout, self.old
        world, t0, t1 = old.world_size, old.degree, new.degree
        new_ranks = new.instances()
        live = np.zeros((old.num_instances, self.n_old), dtype=bool)
        live[self.mi, self.mb] = True
        # A new block's ready time counts every old instance whose ranks take part in its new instance.
        overlaps = old_block_overlaps(L, self.n_old, self.n_new, t0, t1)
        ready = [ready_times(live[sorted({old.slots[g][0] for g in new_ranks[d]})].any(axis=0), overlaps, self.n_new)
                 for d in range(self.num_new_instances)]
        new_block = assign_new_blocks(L, self.n_new, self.md, ready, self._caller_block_ids())
        move_ready = np.stack(ready)[self.md, new_block] if self.md.size else np.zeros(0, dtype=np.int64)
        write_time = np.maximum(self.mb, move_ready)
        park, num_park_slots = park_slots(self.mb, write_time, self.md)
        patterns = build_patterns(self.pair_counts, L, old, new)
        need, sent, received = traffic(patterns, L, self.pair_moves, self.mb, self.n_old, world)
        park_bytes = num_park_slots * L.block_bytes(t1)
        rounds, staging_need = cut_rounds(need, scratch_bytes - park_bytes, park_bytes, scratch_bytes)
        return KVPlan(L, t0, t1, self.n_old, self.n_new, self.mi, self.mb, self.md, new_block, write_time, park,
                      move_ready, patterns, rounds, num_park_slots, self.seq_ids,
                      new_block[self.entry_move[:self.num_seq_entries]],
                      self.seq_lens, dict(self.destinations), sent * L.num_layers, received * L.num_layers,
                      staging_need, world, self.seq_inst, self.mb[self.entry_move[:self.num_seq_entries]],
                      self.req.buffer_bytes, self.new_buffer_bytes, list(self.resolved.cached),
                      new_block[self.entry_move[self.num_seq_entries:]], list(self.req.cached),
                      pair_moves=self.pair_moves)

    def _caller_block_ids(self) -> Dict[int, int]:
        """move -> new block id the caller chose (KVRequest.new_block_tables), checked."""
        L = self.req.layout
        fixed: Dict[int, int] = {}
        if not self.req.new_block_tables:
            return fixed
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
        return fixed
