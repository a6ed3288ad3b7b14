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
the program is built once and applied to every layer; on one-buffer layouts one box moves every component of a part
(its level 1 steps from K to V). The program is built in whole-array passes over the rank's parts (every round at
once) and then cut into rounds; the extension computes the box fields (execution.copy.Terms).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import List

import numpy as np

from ..execution.copy import Terms, make_boxes
from .kv_rounds import source_choice
from .program import Copy, Message, Pull, Round, equal_runs


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
    group has the same sender, receiver and head ranges (group tables src, dst, old_off, new_off, nheads); src and
    dst per part."""

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
        self.src, self.dst = self.tables["src"][self.group], self.tables["dst"][self.group]

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


class _Pick:
    """Some of the rank's parts (indices `sel`, sorted by round) with their rounds, groups and moves, each gathered
    once, when first used."""

    def __init__(self, parts, round_of: np.ndarray, sel: np.ndarray):
        self.parts, self.sel, self.round = parts, sel, round_of[sel]

    @cached_property
    def group(self) -> np.ndarray:
        return self.parts.group[self.sel]

    @cached_property
    def move(self) -> np.ndarray:
        return self.parts.move[self.sel]


class _Ends:
    """Box fields of the two ends of a part's copy, as Terms over a _Pick (computed by the extension while it
    writes the boxes). An end is "old" (the old block), "new" (the new block), "park" (the move's park slot) or
    "scratch" (packed at per-part offsets, components one after the other)."""

    def __init__(self, kvp, parts, old: _Geometry, new: _Geometry):
        self.kvp, self.parts, self.old, self.new = kvp, parts, old, new
        L = kvp.layout
        nheads = parts.tables["nheads"]
        self.run = old.run_bytes(nheads)  # per group; the same at both degrees
        self.part_bytes = nheads * L.block_size * L.head_dim * L.itemsize  # per group, one component
        self.count, self.old_stride = old.runs
        self.new_stride = new.runs[1]

    def per_group(self, table, p: _Pick) -> Terms:
        return Terms(0, ((1, table, p.group),))

    def end(self, where: str, p: _Pick, c: int, offsets=None):
        """(start of component c, stride between a part's runs, stride between components) at end `where`."""
        tables, kvp = self.parts.tables, self.kvp
        if where == "old":
            start = self.old.head_start(c, (tables["old_off"], p.group), blocks=(self.parts.time, p.sel))
            return start, self.old_stride, self.old.component_stride
        if where == "new":
            start = self.new.head_start(c, (tables["new_off"], p.group), blocks=(kvp.move_new_block, p.move))
            return start, self.new_stride, self.new.component_stride
        if where == "park":
            start = self.new.head_start(c, (tables["new_off"], p.group), slots=(kvp.move_park, p.move))
            return start, self.new_stride, self.new.region
        start = Terms(0, ((1, offsets, None), (c, self.part_bytes, p.group)))
        run = self.per_group(self.run, p)
        return start, run, self.per_group(self.part_bytes, p)

    def boxes(self, p: _Pick, c: int, components: int, src: str, dst: str, offsets=None) -> np.ndarray:
        """Boxes copying component c (and the components - 1 after it) of every part of `p` from end `src` to
        end `dst` (offsets: the scratch end's)."""
        s, s_stride, s_component = self.end(src, p, c, offsets)
        d, d_stride, d_component = self.end(dst, p, c, offsets)
        return _boxes(s, d, self.per_group(self.run, p), self.count, s_stride, d_stride, components, s_component,
                      d_component)


def _append_per_round(rounds: List[Round], kind: str, round_of: np.ndarray, groups, make) -> None:
    """Append to each round's list `kind` one Copy per component group of the elements in that round (round_of:
    their rounds, sorted); make(buffer, c, components) -> (src buffer, dst buffer, boxes of every element)."""
    bounds = _round_bounds(round_of, len(rounds))
    used = np.flatnonzero(np.diff(bounds)).tolist()
    if not used:
        return
    for buf, c, k in groups:
        src_buf, dst_buf, boxes = make(buf, c, k)
        for r in used:
            getattr(rounds[r], kind).append(Copy(src_buf, dst_buf, boxes[bounds[r]:bounds[r + 1]]))


def _append_messages(rounds: List[Round], kind: str, p: _Pick, peers: np.ndarray, offsets: np.ndarray,
                     size: np.ndarray, world: int) -> None:
    """One message per (round, peer) of the parts `p` (sorted by round, then peer; their scratch ranges
    contiguous): the range from the first part's offset to the end of the last."""
    keys = p.round * world + peers
    if not keys.size:
        return
    first, stop = equal_runs(keys)
    last = stop - 1
    ends = offsets[last] + size[p.sel[last]]
    for key, start, end in zip(keys[first].tolist(), offsets[first].tolist(), ends.tolist()):
        getattr(rounds[key // world], kind).append(Message(key % world, "scratch", start, end - start))


def _append_pulls(rounds: List[Round], kinds, src: np.ndarray, groups, world: int) -> None:
    """Each round's pulls, per peer ascending, direct ones (into kv buffers) before those into scratch, per
    component group. kinds: (pick sorted by (round, sender), "kv" or "scratch", make(c, components) -> boxes); the
    scratch pulls of one (round, peer) concatenate its kinds in list order (park slots, then staging)."""
    entries = {}  # (round, peer, 0 kv | 1 scratch, group index) -> (src buffer, dst buffer, [boxes])
    for p, into, make in kinds:
        if not p.sel.size:
            continue
        keys = p.round * world + src[p.sel]
        first, last = equal_runs(keys)
        for g, (buf, c, k) in enumerate(groups):
            boxes = make(c, k)
            for key, a, b in zip(keys[first].tolist(), first.tolist(), last.tolist()):
                entry = entries.setdefault((key // world, key % world, into == "scratch", g),
                                           (buf, buf if into == "kv" else "scratch", []))
                entry[2].append(boxes[a:b])
    for (r, peer, _, _), (src_buf, dst_buf, parts) in sorted(entries.items()):
        rounds[r].pulls.append(Pull(peer, src_buf, dst_buf, parts[0] if len(parts) == 1 else np.concatenate(parts)))


def build_kv_program(plan, rank: int, pull: bool = False) -> KVProgram:
    """Rank `rank`'s KV program for RetpPlan `plan` (plan.kv must be set). pull: incoming parts are read from the
    senders' memory (Round.pulls) instead of exchanged as messages (see the module docstring).

    Built in whole-array passes over the rank's parts (every round at once), then cut into rounds: each Copy's
    boxes are a slice of one array per kind of copy. On one-buffer layouts a box moves every component of a part."""
    kvp = plan.kv
    L = kvp.layout
    world = kvp.world_size
    groups = _component_groups(L)
    parts = _Parts(kvp, rank)
    old = _Geometry(L, kvp.old_degree, kvp.old_num_blocks)
    new = _Geometry(L, kvp.new_degree, kvp.new_num_blocks)
    ends = _Ends(kvp, parts, old, new)
    move, src, dst = parts.move, parts.src, parts.dst
    size = (L.num_components * ends.part_bytes)[parts.group]  # bytes of each part, every component
    num_rounds = len(kvp.rounds)
    round_lo = np.array([lo for lo, _ in kvp.rounds], dtype=np.int64)
    round_hi = np.array([hi for _, hi in kvp.rounds], dtype=np.int64)
    # Round of each part (times are sorted; every part's time lies in a round).
    first = np.concatenate(([0], np.searchsorted(parts.time, round_hi), [parts.time.size]))
    round_of = np.repeat(np.arange(num_rounds + 1), np.diff(first))
    lo, hi = round_lo[round_of], round_hi[round_of]
    ready, write = kvp.move_ready[move], kvp.move_write_time[move]

    def pick(sel):
        return _Pick(parts, round_of, sel)

    def sorted_pick(keys, sel):  # ties keep the time order
        return pick(sel[np.argsort(keys, kind="stable")])

    # What happens to each part.
    local = (src == rank) & (dst == rank)
    one_copy = local & (ready < lo)               # old block -> free new block, once
    reads = (src == rank) & ~one_copy             # packed into scratch (sends, local re-placements)
    peer_out = np.where(dst == rank, -1, dst)     # -1: stays on this rank
    incoming = (dst == rank) & (src != rank)
    # Parked moves of this rank's new instance, by write time; each is unparked in the round its new block is
    # written, when it was read in an earlier round.
    parked = np.flatnonzero((kvp.move_dest == plan.new.slots[rank][0]) & (kvp.move_park >= 0))
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
    reads = np.flatnonzero(reads)
    packed = sorted_pick(round_of[reads] * (world + 1) + peer_out[reads] + 1, reads)
    packed_off, packed_end = _offsets_in_rounds(size[packed.sel], packed.round,
                                                np.full(num_rounds, kvp.park_bytes, dtype=np.int64))
    incoming = np.flatnonzero(incoming)
    staged = sorted_pick(round_of[incoming] * world + src[incoming], incoming)
    staged_off, staged_end = _offsets_in_rounds(size[staged.sel], staged.round, packed_end)
    program.scratch_bytes = max(kvp.park_bytes, int(staged_end.max(initial=0)))

    # Before the exchange: one-copy local moves, then packing.
    one = pick(np.flatnonzero(one_copy))
    _append_per_round(rounds, "before", one.round, groups,
                      lambda buf, c, k: (buf, buf, ends.boxes(one, c, k, "old", "new")))
    _append_per_round(rounds, "before", packed.round, groups,
                      lambda buf, c, k: (buf, "scratch", ends.boxes(packed, c, k, "old", "scratch", packed_off)))
    program.direct_bytes = int(size[one.sel].sum()) + int(size[pulled].sum())
    program.staged_bytes = int(size[packed.sel].sum()) + int(size[staged.sel].sum())
    program.local_bytes = int(size[local].sum())

    # The exchange: one message per peer each way (a contiguous scratch range), peers ascending; or the pulls.
    if not pull:
        sending = np.flatnonzero(peer_out[packed.sel] >= 0)
        sends = pick(packed.sel[sending])
        _append_messages(rounds, "sends", sends, peer_out[sends.sel], packed_off[sending], size, world)
        _append_messages(rounds, "recvs", staged, src[staged.sel], staged_off, size, world)
    else:
        free = ready[pulled] < lo[pulled]
        to_block = sorted_pick(round_of[pulled[free]] * world + src[pulled[free]], pulled[free])
        to_park = sorted_pick(round_of[pulled[~free]] * world + src[pulled[~free]], pulled[~free])
        _append_pulls(rounds, [(to_block, "kv", lambda c, k: ends.boxes(to_block, c, k, "old", "new")),
                               (to_park, "scratch", lambda c, k: ends.boxes(to_park, c, k, "old", "park")),
                               (staged, "scratch", lambda c, k: ends.boxes(staged, c, k, "old", "scratch",
                                                                           staged_off))],
                      src, groups, world)

    # After the exchange: parked blocks now ready, then arrivals and local parts (into the new block when it is
    # written this round, else into the park slot).
    def unpark_boxes(buf, c, k):
        return "scratch", buf, _boxes(new.head_start(c, None, slots=(kvp.move_park, unparked)),
                                      new.head_start(c, None, blocks=(kvp.move_new_block, unparked)), new.region, 1,
                                      0, 0, k, new.region, new.component_stride)

    _append_per_round(rounds, "after", unpark_round, groups, unpark_boxes)
    local_staged = peer_out[packed.sel] < 0
    unpack = np.concatenate((packed.sel[local_staged], staged.sel))
    unpack_off = np.concatenate((packed_off[local_staged], staged_off))
    into_block = write[unpack] < hi[unpack]
    for dst_end in ("new", "park"):
        mine = into_block == (dst_end == "new")
        order = np.argsort(round_of[unpack[mine]], kind="stable")
        p, off = pick(unpack[mine][order]), unpack_off[mine][order]
        _append_per_round(rounds, "after", p.round, groups,
                          lambda buf, c, k, p=p, off=off, dst_end=dst_end:
                          ("scratch", buf if dst_end == "new" else "scratch",
                           ends.boxes(p, c, k, "scratch", dst_end, off)))

    program.rounds = rounds
    program.round_hi = round_hi.tolist()
    program.host_bytes = sum(c.boxes.nbytes for r in rounds for c in r.before + r.after + r.pulls) + \
        parts.nbytes
    return program
