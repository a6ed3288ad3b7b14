"""Executing the KV part of a RetpPlan on one rank: per layer, rounds of read -> exchange -> write, in place."""
from __future__ import annotations


import numpy as np
import torch

from .. import failpoints
from ..execution.copy import copy_boxes, make_boxes
from .planner import KVPlan
from .request import KVCache


class _Parts:
    """This rank's parts (one head range of one block moving src -> dst), sorted by (move, piece)."""

    def __init__(self, kvp: KVPlan, me: int):
        rows = []  # (move, piece order, src, dst, old head off, new head off, nheads)
        for (i, d), pieces in sorted(kvp.patterns.items()):
            moves = np.flatnonzero((kvp.move_instance == i) & (kvp.move_dest == d))
            blocks = kvp.move_block[moves]
            for order, pc in enumerate(pieces):
                if pc.local:
                    if pc.dst == me:
                        rows.append(_rows(moves, order, me, me, pc.sources[0][1], pc))
                    continue
                choice = (blocks + pc.dst_tp) % len(pc.sources)
                for k, (src, off) in enumerate(pc.sources):
                    if me in (src, pc.dst):
                        rows.append(_rows(moves[choice == k], order, src, pc.dst, off, pc))
        table = np.concatenate(rows) if rows else np.zeros((0, 7), dtype=np.int64)
        table = table[np.lexsort((table[:, 1], table[:, 0]))]
        self.move, self.src, self.dst = table[:, 0], table[:, 2], table[:, 3]
        self.old_off, self.new_off, self.nheads = table[:, 4], table[:, 5], table[:, 6]
        self.time = kvp.move_block[self.move]

    def span(self, lo: int, hi: int) -> slice:
        return slice(int(np.searchsorted(self.time, lo)), int(np.searchsorted(self.time, hi)))


def _rows(moves, order, src, dst, old_off, pc):
    n = moves.size
    out = np.empty((n, 7), dtype=np.int64)
    out[:, 0] = moves
    out[:, 1:] = [order, src, dst, old_off, pc.new_off, pc.nheads]
    return out


class _Geometry:
    """Byte boxes for head ranges of blocks in one pool geometry (a degree and a block count)."""

    def __init__(self, layout, degree: int, num_blocks: int):
        self.L, self.num_blocks = layout, num_blocks
        self.heads = layout.local_heads(degree)
        self.head_bytes = layout.head_dim * layout.itemsize
        self.region = layout.region_bytes(degree)

    def offsets(self, c: int, blocks: np.ndarray, head_off: np.ndarray, region_index=None):
        """(start offset, run bytes, count, stride) arrays for component c of `blocks`' heads [head_off, +n)."""
        idx = self.L.region_index(c, blocks, self.num_blocks) if region_index is None else region_index
        base = idx * self.region
        if self.L.order == "NHD":
            return base + head_off * self.head_bytes, self.L.block_size, self.heads * self.head_bytes
        return base + head_off * self.L.block_size * self.head_bytes, 1, 0

    def run_bytes(self, nheads: np.ndarray) -> np.ndarray:
        return nheads * self.head_bytes if self.L.order == "NHD" else nheads * self.head_bytes * self.L.block_size


class KVExecutor:
    """Moves this rank's KV cache per plan.kv, in place: per layer, rounds of read -> exchange -> write.

    Scratch layout: the park area (plan.kv.park_bytes) first, then one round's staging: this rank's reads (local
    parts, then sends by peer), then its receives by peer. prepare() computes everything that is the same for every
    layer (which parts each round reads, sends and receives, and where they sit in scratch) so that an allocation
    failure happens before anything moves; run() then only copies and exchanges.
    """

    def __init__(self, plan, rank: int, kv: KVCache, transport, scratch: torch.Tensor, progress, memory):
        self.plan, self.kvp, self.rank, self.kv = plan, plan.kv, rank, kv
        self.transport, self.scratch, self.progress, self.memory = transport, scratch, progress, memory
        self.rounds = []
        self.scratch_used = 0

    def prepare(self) -> None:
        kvp, me = self.kvp, self.rank
        L = kvp.layout
        self.parts = parts = _Parts(kvp, me)
        self.old = _Geometry(L, kvp.old_degree, kvp.old_num_blocks)
        self.new = _Geometry(L, kvp.new_degree, kvp.new_num_blocks)
        self.part_bytes = parts.nheads * L.block_size * L.head_dim * L.itemsize  # one component
        self.nc = nc = L.num_components  # a part's components are packed one after the other
        self.my_new_instance = self.plan.new.slots[me][0]
        table_bytes = parts.move.nbytes * 7
        for lo, hi in kvp.rounds:
            sp = parts.span(lo, hi)
            idx = np.arange(sp.start, sp.stop)
            out_idx = idx[parts.src[idx] == me]
            out_peer = np.where(parts.dst[out_idx] == me, -1, parts.dst[out_idx])  # -1: stays on this rank
            order = np.argsort(out_peer, kind="stable")
            out_idx, out_peer = out_idx[order], out_peer[order]
            in_idx = idx[(parts.dst[idx] == me) & (parts.src[idx] != me)]
            in_idx = in_idx[np.argsort(parts.src[in_idx], kind="stable")]
            off_out, end = _packed_offsets(nc * self.part_bytes[out_idx], kvp.park_bytes)
            off_in, end = _packed_offsets(nc * self.part_bytes[in_idx], end)
            self.scratch_used = max(self.scratch_used, end)
            self.rounds.append((lo, hi, out_idx, out_peer, in_idx, off_out, off_in))
            table_bytes += sum(a.nbytes for a in (out_idx, out_peer, in_idx, off_out, off_in))
        self.table_bytes = table_bytes
        self.memory.add(table_bytes)

    def staging_bytes(self):
        """(send, receive) bytes of this rank's largest round (what host staging must hold)."""
        out_max = in_max = 0
        for _, _, out_idx, out_peer, in_idx, _, _ in self.rounds:
            out_max = max(out_max, int(self.nc * self.part_bytes[out_idx[out_peer >= 0]].sum()))
            in_max = max(in_max, int(self.nc * self.part_bytes[in_idx].sum()))
        return out_max, in_max

    def run(self) -> None:
        kvp, parts, scratch, nc = self.kvp, self.parts, self.scratch, self.nc
        layers = self.kv.physical_buffers()
        for bufs in layers:
            buf_of = (lambda c: bufs[c]) if kvp.layout.num_buffers == 2 else (lambda c: bufs[0])
            for lo, hi, out_idx, out_peer, in_idx, off_out, off_in in self.rounds:
                failpoints.hit("move.kv")
                self.progress.kv_round_started()
                # Read phase: every byte this round consumes goes to scratch before anything is written.
                _pack(parts, out_idx, off_out, self.old, kvp, buf_of, scratch, self.part_bytes)
                sends = _messages(scratch, out_peer, off_out, nc * self.part_bytes[out_idx])
                sends.pop(-1, None)
                recvs = _messages(scratch, parts.src[in_idx], off_in, nc * self.part_bytes[in_idx])
                self.transport.exchange(list(sends.items()), list(recvs.items()))
                # Write phase: parked moves whose blocks became ready, then this round's arrivals.
                _write_parked(kvp, self.new, buf_of, scratch, self.my_new_instance, lo, hi)
                local = out_peer == -1
                _unpack(parts, np.concatenate([out_idx[local], in_idx]), np.concatenate([off_out[local], off_in]),
                        self.new, kvp, buf_of, scratch, self.part_bytes, hi)
            self.progress.kv_layer_done()
        self.progress.kv_done = True
        self.memory.sub(self.table_bytes)


def _packed_offsets(sizes: np.ndarray, base: int):
    """Offsets of consecutive buffers of `sizes` bytes from `base`, and the end offset."""
    starts = base + np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
    return starts, base + int(sizes.sum())


def _messages(scratch: torch.Tensor, peers: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> dict:
    """{peer: scratch slice} covering each peer's parts (laid out contiguously, peers in ascending order)."""
    out = {}
    for peer in np.unique(peers).tolist():
        m = peers == peer
        out[peer] = scratch[int(offsets[m].min()):int((offsets[m] + sizes[m]).max())]
    return out


def _pack(parts, idx, offsets, geo, kvp, buf_of, scratch, part_bytes):
    if idx.size == 0:
        return
    blocks = kvp.move_block[parts.move[idx]]
    run = geo.run_bytes(parts.nheads[idx])
    for c in range(geo.L.num_components):
        start, count, stride = geo.offsets(c, blocks, parts.old_off[idx])
        packed = offsets + c * part_bytes[idx]
        copy_boxes(scratch, buf_of(c), make_boxes(start, packed, run, count, stride, run))


def _unpack(parts, idx, offsets, geo, kvp, buf_of, scratch, part_bytes, hi):
    if idx.size == 0:
        return
    moves = parts.move[idx]
    direct = kvp.move_write_time[moves] < hi
    run = geo.run_bytes(parts.nheads[idx])
    nc = geo.L.num_components
    for c in range(nc):
        packed = offsets + c * part_bytes[idx]
        # Blocks that are ready: straight into the pool.
        d = direct
        if d.any():
            start, count, stride = geo.offsets(c, kvp.move_new_block[moves[d]], parts.new_off[idx[d]])
            copy_boxes(buf_of(c), scratch, make_boxes(packed[d], start, run[d], count, run[d], stride))
        # Blocks that are not: into their park slot, laid out like a new block (regions nc*p ... nc*p + nc-1).
        p = ~direct
        if p.any():
            slot_region = nc * kvp.move_park[moves[p]] + c
            start, count, stride = geo.offsets(c, None, parts.new_off[idx[p]], region_index=slot_region)
            copy_boxes(scratch, scratch, make_boxes(packed[p], start, run[p], count, run[p], stride))


def _write_parked(kvp, geo, buf_of, scratch, my_instance, lo, hi):
    """Copy parked blocks whose new block is ready in this round (parked in an earlier round) into the pool."""
    sel = np.flatnonzero((kvp.move_dest == my_instance) & (kvp.move_park >= 0) & (kvp.move_write_time >= lo)
                         & (kvp.move_write_time < hi) & (kvp.move_block < lo))
    if sel.size == 0:
        return
    nc = geo.L.num_components
    for c in range(nc):
        src = (nc * kvp.move_park[sel] + c) * geo.region  # the park area starts the scratch buffer
        dst = geo.L.region_index(c, kvp.move_new_block[sel], geo.num_blocks) * geo.region
        copy_boxes(buf_of(c), scratch, make_boxes(src, dst, geo.region))
