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

from ..execution.copy import Terms, make_boxes
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
        # Bytes from a block's region of component c to that of c + 1 in one buffer (one-buffer layouts, whose
        # region index is affine in the component: flash_attn c * N + b, flashinfer 2 * b + c).
        self.component_stride = (layout.region_index(1, 0, num_blocks) - layout.region_index(0, 0, num_blocks)) \
            * self.region

    def head_start(self, c: int, head_off, blocks=None, slots=None) -> Terms:
        """Start offsets of component c of head ranges [head_off, +n) of `blocks`, or of park `slots` (scratch
        regions nc * slot + c, laid out like a block), as Terms; each argument a (values, index) pair, head_off
        None for whole regions."""
        L, N = self.L, self.num_blocks
        head_bytes = self.head_bytes if L.order == "NHD" else L.block_size * self.head_bytes
        if slots is None:  # region index affine in the block: flash_attn c * N + b, flashinfer 2 * b + c, else b
            constant = L.region_index(c, 0, N) * self.region
            per_block = (L.region_index(0, 1, N) - L.region_index(0, 0, N)) * self.region
            at = blocks
        else:
            constant, per_block, at = c * self.region, L.num_components * self.region, slots
        terms = ((per_block, *at),) + (((head_bytes, *head_off),) if head_off is not None else ())
        return Terms(constant, terms)

    @property
    def runs(self):
        """(runs per head range, stride between them): NHD heads of a block are block_size strided runs, HND
        heads one run."""
        return (self.L.block_size, self.heads * self.head_bytes) if self.L.order == "NHD" else (1, 0)

    def run_bytes(self, nheads: np.ndarray) -> np.ndarray:
        return nheads * self.head_bytes if self.L.order == "NHD" else nheads * self.head_bytes * self.L.block_size


class _Parts:
    """This rank's parts in move (time) order: move, time (= old block id) and group per part; every part of a
    group has the same sender, receiver and head ranges (group tables src, dst, old_off, new_off, nheads), read
    per part with column(name, sel)."""

    def __init__(self, kvp, me: int):
        groups = []  # (moves, src, dst, old head off, new head off, nheads)
        for (i, d), pieces in sorted(kvp.patterns.items()):
            moves = blocks = None
            for pc in pieces:
                if not (pc.dst == me or any(src == me for src, _ in pc.sources)):
                    continue
                if moves is None:
                    moves = kvp.pair_moves[(i, d)]
                    blocks = kvp.move_block[moves]
                if len(pc.sources) == 1:
                    (src, off), = pc.sources
                    groups.append((moves, src, pc.dst, off, pc.new_off, pc.nheads))
                    continue
                choice = source_choice(blocks, pc)
                for k, (src, off) in enumerate(pc.sources):
                    if me in (src, pc.dst):
                        groups.append((moves[choice == k], src, pc.dst, off, pc.new_off, pc.nheads))
        sizes = [g[0].size for g in groups]
        move = np.concatenate([g[0] for g in groups]) if groups else np.zeros(0, dtype=np.int64)
        # By move (= time order), stably: two ranks exchanging parts list them in the same construction order, so
        # their messages agree part for part.
        order = np.argsort(move, kind="stable")
        self.move = move[order]
        self.time = kvp.move_block[self.move]
        self.group = np.repeat(np.arange(len(groups), dtype=np.int64), sizes)[order]
        self.tables = {name: np.array([g[j] for g in groups], dtype=np.int64)
                       for j, name in enumerate(("src", "dst", "old_off", "new_off", "nheads"), start=1)}
        self.src, self.dst = self.column("src"), self.column("dst")

    def column(self, name: str, sel=None) -> np.ndarray:
        return self.tables[name][self.group if sel is None else self.group[sel]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.move, self.time, self.group, self.src, self.dst))


def _component_groups(layout):
    """(buffer, first component, components) that one Copy covers: a one-buffer layout moves every component of a
    part with one box (its level 1 steps from component to component), SGLang's K and V are separate buffers."""
    if layout.num_buffers == 1:
        return [("kv:0", 0, layout.num_components)]
    return [(f"kv:{c}", c, 1) for c in range(layout.num_components)]


def _boxes(src, dst, run, count, src_stride, dst_stride, components, src_component, dst_component) -> np.ndarray:
    """make_boxes(...) repeated over `components` components (level 1) at the given byte strides (scalars or per
    box)."""
    if components == 1:
        return make_boxes(src, dst, run, count, src_stride, dst_stride)
    return make_boxes(src, dst, run, count, src_stride, dst_stride, components, src_component, dst_component)


def _round_bounds(round_of: np.ndarray, num_rounds: int) -> np.ndarray:
    """(num_rounds + 1,) bounds: elements [bounds[k], bounds[k + 1]) of an array sorted by round are round k's."""
    return np.searchsorted(round_of, np.arange(num_rounds + 1))


def _offsets_in_rounds(sizes: np.ndarray, round_of: np.ndarray, base: np.ndarray):
    """Buffers of `sizes` bytes laid out one after the other from base[k] in each round k (elements sorted by
    round): their offsets, and the end offset of each round."""
    ends = np.cumsum(sizes)
    before = np.concatenate(([0], ends))[_round_bounds(round_of, base.size)]  # bytes before each round's first
    return base[round_of] + (ends - sizes) - before[round_of], base + np.diff(before)


def _sorted_by(keys: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """idx reordered by keys, stably (ties keep the time order)."""
    return idx[np.argsort(keys, kind="stable")]


def build_kv_program(plan, rank: int, pull: bool = False) -> KVProgram:
    """Rank `rank`'s KV program for RetpPlan `plan` (plan.kv must be set). pull: incoming parts are read from the
    senders' memory (Round.pulls) instead of exchanged as messages (see the module docstring).

    Built in whole-array passes over the rank's parts (every round at once), then cut into rounds: each Copy's
    boxes are a slice of one array per kind of copy. On one-buffer layouts a box moves every component of a part."""
    kvp = plan.kv
    L = kvp.layout
    nc, world = L.num_components, kvp.world_size
    groups = _component_groups(L)
    parts = _Parts(kvp, rank)
    old = _Geometry(L, kvp.old_degree, kvp.old_num_blocks)
    new = _Geometry(L, kvp.new_degree, kvp.new_num_blocks)
    move, src, dst = parts.move, parts.src, parts.dst
    part_bytes_of = parts.tables["nheads"] * L.block_size * L.head_dim * L.itemsize  # per group, one component
    size = (nc * part_bytes_of)[parts.group]  # bytes of each part, every component
    num_rounds = len(kvp.rounds)
    round_lo = np.array([lo for lo, _ in kvp.rounds], dtype=np.int64)
    round_hi = np.array([hi for _, hi in kvp.rounds], dtype=np.int64)
    # Round of each part (times are sorted; every part's time lies in a round).
    ends = np.concatenate(([0], np.searchsorted(parts.time, round_hi), [parts.time.size]))
    round_of = np.repeat(np.arange(num_rounds + 1), np.diff(ends))
    lo, hi = round_lo[round_of], round_hi[round_of]
    ready, write = kvp.move_ready[move], kvp.move_write_time[move]

    local = (src == rank) & (dst == rank)
    one_copy = local & (ready < lo)
    reads = (src == rank) & ~one_copy             # packed into scratch (sends, local re-placements)
    peer_out = np.where(dst == rank, -1, dst)     # -1: stays on this rank
    incoming = (dst == rank) & (src != rank)
    # Parked moves of this rank's new instance, by write time; each is unparked in the round its new block is
    # written, when it was read in an earlier round.
    my_instance = plan.new.slots[rank][0]
    parked = np.flatnonzero((kvp.move_dest == my_instance) & (kvp.move_park >= 0))
    parked = parked[np.argsort(kvp.move_write_time[parked], kind="stable")]
    parked_round = np.searchsorted(round_hi, kvp.move_write_time[parked], side="right")
    parked, parked_round = parked[parked_round < num_rounds], parked_round[parked_round < num_rounds]
    unparks = kvp.move_block[parked] < round_lo[parked_round]
    unparked, unpark_round = parked[unparks], parked_round[unparks]

    program = KVProgram(scratch_bytes=kvp.park_bytes)
    rounds = [Round() for _ in range(num_rounds)]
    pulled = np.zeros(0, dtype=np.int64)
    if pull:
        # Lent parts are read by their receivers; of the incoming parts only those whose new block is written in
        # their round but was not free before it are staged; the others are pulled to their place. A park slot
        # emptied in a round (after the exchange) cannot take a pull before it: staged too.
        lent = np.flatnonzero(reads & (peer_out >= 0))
        reads[lent] = False
        for k in np.unique(round_of[lent] * world + peer_out[lent]).tolist():
            rounds[k // world].readers.append(k % world)
        lent_bounds = np.concatenate(([0], np.cumsum(size[lent])))[_round_bounds(round_of[lent], num_rounds)]
        for k, nbytes in enumerate(np.diff(lent_bounds).tolist()):
            rounds[k].lent_bytes = nbytes
        slots = max(kvp.park_slots, 1)
        emptied = np.unique(unpark_round * slots + kvp.move_park[unparked])
        park_of = kvp.move_park[move]
        in_emptied = np.isin(np.where(park_of >= 0, round_of * slots + park_of, -1), emptied)
        to_place = incoming & ((ready < lo) | ((write >= hi) & ~in_emptied))
        pulled = np.flatnonzero(to_place)
        incoming &= ~to_place

    # Scratch: the park area, then per round the packed reads by peer (this rank's own first), then the staged
    # arrivals by sender.
    packed = np.flatnonzero(reads)
    packed = _sorted_by(round_of[packed] * (world + 1) + peer_out[packed] + 1, packed)
    packed_off, packed_end = _offsets_in_rounds(size[packed], round_of[packed],
                                                np.full(num_rounds, kvp.park_bytes, dtype=np.int64))
    staged = np.flatnonzero(incoming)
    staged = _sorted_by(round_of[staged] * world + src[staged], staged)
    staged_off, staged_end = _offsets_in_rounds(size[staged], round_of[staged], packed_end)
    program.scratch_bytes = max(kvp.park_bytes, int(staged_end.max(initial=0)))

    # Box fields as Terms over the parts' group tables and the plan's per-move arrays (see execution.copy.Terms).
    run_of = old.run_bytes(parts.tables["nheads"])  # per group; the same at both degrees
    count, old_stride = old.runs
    _, new_stride = new.runs

    class Pick:
        """Selected parts (indices sel) with their groups and moves, gathered once."""

        def __init__(self, sel):
            self.sel, self.group, self.move = sel, parts.group[sel], move[sel]

    def per_group(table, p):
        return Terms(0, ((1, table, p.group),))

    def old_start(p, c):
        return old.head_start(c, (parts.tables["old_off"], p.group), blocks=(parts.time, p.sel))

    def new_start(p, c):
        return new.head_start(c, (parts.tables["new_off"], p.group), blocks=(kvp.move_new_block, p.move))

    def park_start(p, c):
        return new.head_start(c, (parts.tables["new_off"], p.group), slots=(kvp.move_park, p.move))

    def scratch_start(p, offsets, c):
        return Terms(0, ((1, offsets, None), (c, part_bytes_of, p.group)))

    def add(kind, sel_round, make):
        """Append to every round's list `kind` one Copy per component group of the elements in that round;
        make(buffer, c, components) -> (src buffer, dst buffer, boxes of every element)."""
        bounds = _round_bounds(sel_round, num_rounds)
        used = np.flatnonzero(np.diff(bounds)).tolist()
        if not used:
            return
        for buf, c, k in groups:
            src_buf, dst_buf, boxes = make(buf, c, k)
            for r in used:
                getattr(rounds[r], kind).append(Copy(src_buf, dst_buf, boxes[bounds[r]:bounds[r + 1]]))

    # Before the exchange: one-copy local moves, then packing.
    one = np.flatnonzero(one_copy)
    one_pick, packed_pick = Pick(one), Pick(packed)

    def one_copy_boxes(buf, c, k):
        p = one_pick
        return buf, buf, _boxes(old_start(p, c), new_start(p, c), per_group(run_of, p), count, old_stride,
                                new_stride, k, old.component_stride, new.component_stride)

    def pack_boxes(buf, c, k):
        p = packed_pick
        return buf, "scratch", _boxes(old_start(p, c), scratch_start(p, packed_off, c), per_group(run_of, p), count,
                                      old_stride, per_group(run_of, p), k, old.component_stride,
                                      per_group(part_bytes_of, p))

    add("before", round_of[one], one_copy_boxes)
    add("before", round_of[packed], pack_boxes)
    program.direct_bytes = int(size[one].sum()) + int(size[pulled].sum())
    program.staged_bytes = int(size[packed].sum()) + int(size[staged].sum())
    program.local_bytes = int(size[local].sum())

    # The exchange: one message per peer each way (a contiguous scratch range), peers ascending; or the pulls.
    def messages(kind, sel, offsets, peers):
        keys = round_of[sel] * world + peers
        if not keys.size:
            return
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        last = np.concatenate((first[1:], [keys.size])) - 1
        ends = offsets[last] + size[sel[last]]
        for key, start, end in zip(keys[first].tolist(), offsets[first].tolist(), ends.tolist()):
            getattr(rounds[key // world], kind).append(Message(key % world, "scratch", start, end - start))

    if not pull:
        sending = peer_out[packed] >= 0
        messages("sends", packed[sending], packed_off[sending], peer_out[packed[sending]])
        messages("recvs", staged, staged_off, src[staged])
    else:
        free = ready[pulled] < lo[pulled]
        to_block = _sorted_by(round_of[pulled[free]] * world + src[pulled[free]], pulled[free])
        to_park = _sorted_by(round_of[pulled[~free]] * world + src[pulled[~free]], pulled[~free])

        block_pick, park_pick, staged_pick = Pick(to_block), Pick(to_park), Pick(staged)

        def pulled_boxes(p, c, k, into_block):
            dst_start = (new_start if into_block else park_start)(p, c)
            return _boxes(old_start(p, c), dst_start, per_group(run_of, p), count, old_stride, new_stride, k,
                          old.component_stride, new.component_stride if into_block else new.region)

        def staged_boxes(c, k):
            p = staged_pick
            return _boxes(old_start(p, c), scratch_start(p, staged_off, c), per_group(run_of, p), count,
                          old_stride, per_group(run_of, p), k, old.component_stride, per_group(part_bytes_of, p))

        _add_pulls(rounds, groups, world, [(to_block, 0, lambda c, k: pulled_boxes(block_pick, c, k, True)),
                                           (to_park, 1, lambda c, k: pulled_boxes(park_pick, c, k, False)),
                                           (staged, 1, staged_boxes)], round_of, src)

    # After the exchange: parked blocks now ready, then arrivals and local parts (into the new block when it is
    # written this round, else into the park slot).
    def unpark_boxes(buf, c, k):
        return "scratch", buf, _boxes(new.head_start(c, None, slots=(kvp.move_park, unparked)),
                                      new.head_start(c, None, blocks=(kvp.move_new_block, unparked)), new.region, 1,
                                      0, 0, k, new.region, new.component_stride)

    add("after", unpark_round, unpark_boxes)
    local_staged = peer_out[packed] < 0
    unpack = np.concatenate((packed[local_staged], staged))
    unpack_off = np.concatenate((packed_off[local_staged], staged_off))
    direct = write[unpack] < hi[unpack]
    for into_block in (True, False):
        sel, off = unpack[direct == into_block], unpack_off[direct == into_block]
        order = np.argsort(round_of[sel], kind="stable")
        sel, off = sel[order], off[order]

        def unpack_boxes(buf, c, k, p=Pick(sel), off=off, into_block=into_block):
            boxes = _boxes(scratch_start(p, off, c), (new_start if into_block else park_start)(p, c),
                           per_group(run_of, p), count, per_group(run_of, p), new_stride, k,
                           per_group(part_bytes_of, p), new.component_stride if into_block else new.region)
            return "scratch", buf if into_block else "scratch", boxes

        add("after", round_of[sel], unpack_boxes)

    program.rounds = rounds
    program.round_hi = round_hi.tolist()
    program.host_bytes = sum(c.boxes.nbytes for r in rounds for c in r.before + r.after + r.pulls) + \
        parts.nbytes
    return program


def _add_pulls(rounds, groups, world, kinds, round_of, src):
    """Each round's pulls, per peer (ascending), then direct (0) before scratch (1), per component group. kinds:
    (parts sorted by (round, sender), 0 into kv buffers | 1 into scratch, boxes(c, components)); the scratch pulls
    of one (round, peer) concatenate its kinds in list order (park slots, then staging)."""
    entries = {}  # (round, peer, kind, group index) -> (src buffer, dst buffer, [boxes])
    for sel, kind, make in kinds:
        if not sel.size:
            continue
        keys = round_of[sel] * world + src[sel]
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        last = np.concatenate((first[1:], [keys.size]))
        for g, (buf, c, k) in enumerate(groups):
            boxes = make(c, k)
            for key, a, b in zip(keys[first].tolist(), first.tolist(), last.tolist()):
                entry = entries.setdefault((key // world, key % world, kind, g),
                                           (buf, buf if kind == 0 else "scratch", []))
                entry[2].append(boxes[a:b])
    for (r, peer, _, _), (src_buf, dst_buf, parts) in sorted(entries.items()):
        rounds[r].pulls.append(Pull(peer, src_buf, dst_buf, parts[0] if len(parts) == 1 else np.concatenate(parts)))
