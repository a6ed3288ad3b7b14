"""KV planning, part 4: one rank's program for the KV cache, round by round, the same for every layer.

A *part* is one head range of one moving block that this rank reads (as sender or for a local re-placement) or
receives. Each round [lo, hi) of consumption time:

  before the exchange   pack every part this rank reads into scratch (local parts, then sends by peer), except local
                        parts whose new block was free before the round began (ready < lo): those are copied
                        straight from the old block into the new one, once (no byte anyone still reads lies there)
  exchange              one message per peer each way: a contiguous scratch range, peers in ascending order
  after the exchange    write parked blocks whose new block became ready in this round, then unpack this round's
                        arrivals and local parts: into the new block when it is ready (write time < hi), else into
                        its park slot

With pulls (a same-host transport) nothing is packed for a peer: the receiver reads each incoming part straight from
the sender's old block, into its new block when that block was free before the round began (ready < lo), into its
park slot when it is not written this round, and into scratch staging otherwise (unpacked after the exchange,
once the rank's readers are done). Local parts are handled as above.

Scratch layout: the park area (plan.kv.park_bytes: park slot p holds components in regions nc*p .. nc*p + nc-1,
laid out like a new block) first, then the round's staging. Boxes are byte offsets within one layer's buffers, so
the program is built once and applied to every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from ..execution.copy import make_boxes
from .kv_rounds import source_choice
from .program import Copy, Message, Pull, Round


@dataclass
class KVProgram:
    """rounds: applied in order to every layer (layer-invariant); round_hi: consumption-time end of each round
    (damage reports); scratch_bytes: park area + the largest round's staging; direct_bytes: bytes per layer moved
    old -> new in one copy; staged_bytes: bytes per layer packed through scratch; local_bytes: bytes per layer that
    stay on this rank (one-copy or staged); host_bytes: the program's arrays."""

    rounds: List[Round] = field(default_factory=list)
    round_hi: List[int] = field(default_factory=list)
    scratch_bytes: int = 0
    direct_bytes: int = 0
    staged_bytes: int = 0
    local_bytes: int = 0
    host_bytes: int = 0


class _Geometry:
    """Byte offsets of head ranges of blocks in one pool geometry (a degree and a block count)."""

    def __init__(self, layout, degree: int, num_blocks: int):
        self.L, self.num_blocks = layout, num_blocks
        self.heads = layout.local_heads(degree)
        self.head_bytes = layout.head_dim * layout.itemsize
        self.region = layout.region_bytes(degree)

    def offsets(self, c: int, blocks, head_off, region_index=None):
        """(start offsets, count, stride) for component c of `blocks`' heads [head_off, +n): NHD heads of a block
        are block_size strided runs, HND heads one run."""
        idx = self.L.region_index(c, blocks, self.num_blocks) if region_index is None else region_index
        base = idx * self.region
        if self.L.order == "NHD":
            return base + head_off * self.head_bytes, self.L.block_size, self.heads * self.head_bytes
        return base + head_off * self.L.block_size * self.head_bytes, 1, 0

    def run_bytes(self, nheads: np.ndarray) -> np.ndarray:
        return nheads * self.head_bytes if self.L.order == "NHD" else nheads * self.head_bytes * self.L.block_size


def _parts(kvp, me: int) -> dict:
    """This rank's parts as arrays in move (time) order: move, src, dst, old/new head offset, nheads."""
    groups = []  # (moves, src, dst, old head off, new head off, nheads)
    for (i, d), pieces in sorted(kvp.patterns.items()):
        moves = np.flatnonzero((kvp.move_instance == i) & (kvp.move_dest == d))
        blocks = kvp.move_block[moves]
        for pc in pieces:
            choice = source_choice(blocks, pc)
            for k, (src, off) in enumerate(pc.sources):
                if me in (src, pc.dst):
                    groups.append((moves[choice == k], src, pc.dst, off, pc.new_off, pc.nheads))
    sizes = [g[0].size for g in groups]
    move = np.concatenate([g[0] for g in groups]) if groups else np.zeros(0, dtype=np.int64)
    # By move (= time order), stably: two ranks exchanging parts list them in the same construction order, so
    # their messages agree part for part. Columns are taken one by one (a row gather is far slower).
    order = np.argsort(move, kind="stable")
    out = {"move": move[order]}
    for j, name in enumerate(("src", "dst", "old_off", "new_off", "nheads"), start=1):
        out[name] = np.repeat(np.array([g[j] for g in groups], dtype=np.int64), sizes)[order]
    out["time"] = kvp.move_block[out["move"]]
    return out


def _packed_offsets(sizes: np.ndarray, base: int):
    """Offsets of consecutive buffers of `sizes` bytes from `base`, and the end offset."""
    starts = base + np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
    return starts, base + int(sizes.sum())


def _messages(peers: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> List[Message]:
    """One scratch range per peer (its parts lie contiguously), peers ascending."""
    out = []
    for peer in np.unique(peers).tolist():
        m = peers == peer
        start, end = int(offsets[m].min()), int((offsets[m] + sizes[m]).max())
        out.append(Message(peer, "scratch", start, end - start))
    return out


def _parked_ready(parked, parked_time, kvp, lo, hi) -> np.ndarray:
    """Moves parked in an earlier round whose new block is written in round [lo, hi) (parked: this instance's
    parked moves by write time)."""
    ready = parked[np.searchsorted(parked_time, lo):np.searchsorted(parked_time, hi)]
    return ready[kvp.move_block[ready] < lo]


def _pulls(pulled, staged, staged_off, parts, kvp, old, new, buffer_of, lo) -> List[Pull]:
    """One round's pulls, per peer and component: `pulled` parts from the peer's old block to their new block
    (free before the round: ready < lo) or park slot, `staged` parts to scratch at `staged_off` (packed like
    messages: components one after the other)."""
    L, nc = kvp.layout, kvp.layout.num_components
    move, src = parts["move"], parts["src"]
    part_bytes = parts["nheads"] * L.block_size * L.head_dim * L.itemsize
    out = []
    for peer in np.unique(np.concatenate([src[pulled], src[staged]])).tolist():
        p = pulled[src[pulled] == peer]
        direct = p[kvp.move_ready[move[p]] < lo]
        park = p[kvp.move_ready[move[p]] >= lo]
        m = src[staged] == peer
        s_idx, s_off = staged[m], staged_off[m]
        for c in range(nc):
            boxes = []
            for idx, kind in ((direct, "block"), (park, "park")):
                if not idx.size:
                    continue
                run = old.run_bytes(parts["nheads"][idx])
                s, count, s_stride = old.offsets(c, kvp.move_block[move[idx]], parts["old_off"][idx])
                if kind == "block":
                    d, _, d_stride = new.offsets(c, kvp.move_new_block[move[idx]], parts["new_off"][idx])
                    out.append(Pull(peer, buffer_of[c], buffer_of[c], make_boxes(s, d, run, count, s_stride,
                                                                                  d_stride)))
                else:
                    slot_region = nc * kvp.move_park[move[idx]] + c
                    d, _, d_stride = new.offsets(c, None, parts["new_off"][idx], region_index=slot_region)
                    boxes.append(make_boxes(s, d, run, count, s_stride, d_stride))
            if s_idx.size:
                run = old.run_bytes(parts["nheads"][s_idx])
                s, count, s_stride = old.offsets(c, kvp.move_block[move[s_idx]], parts["old_off"][s_idx])
                boxes.append(make_boxes(s, s_off + c * part_bytes[s_idx], run, count, s_stride, run))
            if boxes:
                out.append(Pull(peer, buffer_of[c], "scratch", np.concatenate(boxes)))
    return out


def build_kv_program(plan, rank: int, pull: bool = False) -> KVProgram:
    """Rank `rank`'s KV program for RetpPlan `plan` (plan.kv must be set). pull: incoming parts are read from the
    senders' memory (Round.pulls) instead of exchanged as messages (see the module docstring)."""
    kvp = plan.kv
    L = kvp.layout
    nc = L.num_components
    buffer_of = [f"kv:{c if L.num_buffers == 2 else 0}" for c in range(nc)]
    parts = _parts(kvp, rank)
    old = _Geometry(L, kvp.old_degree, kvp.old_num_blocks)
    new = _Geometry(L, kvp.new_degree, kvp.new_num_blocks)
    part_bytes = parts["nheads"] * L.block_size * L.head_dim * L.itemsize  # one component
    my_instance = plan.new.slots[rank][0]
    # Parked moves of this rank's new instance in order of write time: each round writes a contiguous stretch.
    parked = np.flatnonzero((kvp.move_dest == my_instance) & (kvp.move_park >= 0))
    parked = parked[np.argsort(kvp.move_write_time[parked], kind="stable")]
    parked_time = kvp.move_write_time[parked]
    program = KVProgram(scratch_bytes=kvp.park_bytes)
    src, dst, move = parts["src"], parts["dst"], parts["move"]
    for lo, hi in kvp.rounds:
        idx = np.arange(np.searchsorted(parts["time"], lo), np.searchsorted(parts["time"], hi))
        is_local = (src[idx] == rank) & (dst[idx] == rank)
        program.local_bytes += int(nc * part_bytes[idx[is_local]].sum())
        is_one_copy = is_local & (kvp.move_ready[move[idx]] < lo)
        one_copy = idx[is_one_copy]
        out_idx = idx[(src[idx] == rank) & ~is_one_copy]
        out_peer = np.where(dst[out_idx] == rank, -1, dst[out_idx])  # -1: stays on this rank
        order = np.argsort(out_peer, kind="stable")
        out_idx, out_peer = out_idx[order], out_peer[order]
        in_idx = idx[(dst[idx] == rank) & (src[idx] != rank)]
        in_idx = in_idx[np.argsort(src[in_idx], kind="stable")]
        rnd = Round()
        pulled = None
        if pull:
            # Lent parts are read by their receivers; of the incoming parts only those whose new block is written
            # this round but was not free before it are staged; the others are pulled to their place.
            lent = out_peer >= 0
            rnd.readers = np.unique(out_peer[lent]).tolist()
            rnd.lent_bytes = int(nc * part_bytes[out_idx[lent]].sum())
            out_idx, out_peer = out_idx[~lent], out_peer[~lent]
            # A park slot emptied this round (after the exchange) cannot take a pull before it: staged too.
            emptied = kvp.move_park[_parked_ready(parked, parked_time, kvp, lo, hi)]
            mv = move[in_idx]
            to_place = (kvp.move_ready[mv] < lo) | \
                ((kvp.move_write_time[mv] >= hi) & ~np.isin(kvp.move_park[mv], emptied))
            pulled, in_idx = in_idx[to_place], in_idx[~to_place]
        off_out, end = _packed_offsets(nc * part_bytes[out_idx], kvp.park_bytes)
        off_in, end = _packed_offsets(nc * part_bytes[in_idx], end)
        program.scratch_bytes = max(program.scratch_bytes, end)
        # Before the exchange: one-copy local moves, then packing.
        if one_copy.size:
            run = old.run_bytes(parts["nheads"][one_copy])
            for c in range(nc):
                s, count, s_stride = old.offsets(c, kvp.move_block[move[one_copy]], parts["old_off"][one_copy])
                d, _, d_stride = new.offsets(c, kvp.move_new_block[move[one_copy]], parts["new_off"][one_copy])
                rnd.before.append(Copy(buffer_of[c], buffer_of[c], make_boxes(s, d, run, count, s_stride, d_stride)))
            program.direct_bytes += int(nc * part_bytes[one_copy].sum())
        if out_idx.size:
            run = old.run_bytes(parts["nheads"][out_idx])
            for c in range(nc):
                s, count, stride = old.offsets(c, kvp.move_block[move[out_idx]], parts["old_off"][out_idx])
                packed = off_out + c * part_bytes[out_idx]
                rnd.before.append(Copy(buffer_of[c], "scratch", make_boxes(s, packed, run, count, stride, run)))
        sending = out_peer >= 0
        if pull:
            rnd.pulls = _pulls(pulled, in_idx, off_in, parts, kvp, old, new, buffer_of, lo)
        else:
            rnd.sends = _messages(out_peer[sending], off_out[sending], nc * part_bytes[out_idx[sending]])
            rnd.recvs = _messages(src[in_idx], off_in, nc * part_bytes[in_idx])
        # After the exchange: parked blocks now ready, then arrivals and local parts.
        ready_now = _parked_ready(parked, parked_time, kvp, lo, hi)
        for c in range(nc):
            if ready_now.size:
                s = (nc * kvp.move_park[ready_now] + c) * new.region
                d = L.region_index(c, kvp.move_new_block[ready_now], new.num_blocks) * new.region
                rnd.after.append(Copy("scratch", buffer_of[c], make_boxes(s, d, new.region)))
        unpack = np.concatenate([out_idx[~sending], in_idx])
        unpack_off = np.concatenate([off_out[~sending], off_in])
        if unpack.size:
            direct = kvp.move_write_time[move[unpack]] < hi
            run = new.run_bytes(parts["nheads"][unpack])
            for c in range(nc):
                packed = unpack_off + c * part_bytes[unpack]
                if direct.any():
                    d, count, stride = new.offsets(c, kvp.move_new_block[move[unpack[direct]]],
                                                   parts["new_off"][unpack[direct]])
                    rnd.after.append(Copy("scratch", buffer_of[c],
                                          make_boxes(packed[direct], d, run[direct], count, run[direct], stride)))
                if (~direct).any():
                    p = ~direct
                    slot_region = nc * kvp.move_park[move[unpack[p]]] + c
                    d, count, stride = new.offsets(c, None, parts["new_off"][unpack[p]], region_index=slot_region)
                    rnd.after.append(Copy("scratch", "scratch", make_boxes(packed[p], d, run[p], count, run[p],
                                                                             stride)))
        program.staged_bytes += int(nc * part_bytes[out_idx].sum() + nc * part_bytes[in_idx].sum())
        if pulled is not None:
            program.direct_bytes += int(nc * part_bytes[pulled].sum())
        program.rounds.append(rnd)
        program.round_hi.append(hi)
    program.host_bytes = sum(c.boxes.nbytes for r in program.rounds for c in r.before + r.after) + \
        sum(a.nbytes for a in parts.values())
    return program
