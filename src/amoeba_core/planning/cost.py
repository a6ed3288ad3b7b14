"""Cost model: how long a transformation takes, predicted from its plan's bytes and this machine's measured speeds.

Per rank, from its programs (planning.weight_program / kv_program, the work the executor will do):

  link     max(bytes sent, bytes received) / link_bytes_per_s      messages of every round (both directions at once);
           + bytes received straight into a new shard / fresh_link_bytes_per_s (first touch during the receive)
  local    bytes copied on the rank / copy_bytes_per_s             packing, unpacking, retained stretches, in-place
           + runs copied * run_s                                   compaction, one-copy KV moves, right-sizing
                                                                  copies; run_s: the cost of each strided run
           + bytes page-moved / page_move_bytes_per_s              compaction runs whose whole pages the CPU
                                                                  executor remaps instead of copying them
  fresh    bytes of new allocations not received into              the first touch of new shards (page faults on a
           / fresh_bytes_per_s                                     host, allocator growth on a device)
  rounds   exchanges * round_s + copy calls * copy_call_s          fixed costs of each exchange and each copy call
  seconds  link + local + fresh + rounds

The prediction adds up the phases (weights, then KV), each as long as its slowest rank (every exchange waits for
the peers), + call_s (the fixed cost of one retp call: agreement, preparation) + kv_move_s per KV block move of the
plan (validating the block tables, planning and preparing the KV programs: host work that grows with the cache).
calibrate() measures the speeds on the group itself, under the same contention as the real call (every rank busy at
once), so that a 2-core host running four ranks gets the figures it will actually see; local copies are timed on
buffers several times the size of a last-level cache, as the hundreds of MiB of a real compaction are.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..execution.copy import box_bytes, box_runs


@dataclass(frozen=True)
class Bandwidths:
    """link_bytes_per_s: point-to-point bytes per second per rank and direction, every rank exchanging at once;
    copy_bytes_per_s: local copy through the byte engine; round_s: fixed seconds per exchange round; call_s: fixed
    seconds per retp call (agreement, planning of an empty model, preparation); fresh_bytes_per_s: the extra cost
    of writing freshly allocated memory for the first time; fresh_link_bytes_per_s: receiving into it instead of a
    touched buffer (extra cost); run_s: the extra cost of each run of a strided copy; copy_call_s: the fixed cost of
    one call into the byte engine; page_move_bytes_per_s: an in-place compaction's runs moved by remapping their
    pages (execution.copy.compact_in_place; 0: not available, such runs are copied); kv_move_s: host seconds per
    KV block move of a call (tables, planning, programs, every rank at once)."""

    link_bytes_per_s: float
    copy_bytes_per_s: float
    round_s: float = 0.0
    call_s: float = 0.0
    fresh_bytes_per_s: float = float("inf")
    fresh_link_bytes_per_s: float = float("inf")
    run_s: float = 0.0
    copy_call_s: float = 0.0
    page_move_bytes_per_s: float = 0.0
    kv_move_s: float = 0.0


@dataclass
class RankCost:
    rank: int
    bytes_sent: int
    bytes_received: int
    bytes_copied: int
    exchanges: int
    bytes_allocated: int = 0
    runs_copied: int = 0
    bytes_received_fresh: int = 0
    copy_calls: int = 0
    bytes_page_moved: int = 0
    seconds: float = 0.0


@dataclass
class Estimate:
    """seconds: predicted wall time of the call; ranks: each rank's RankCost (both phases)."""

    seconds: float
    ranks: List[RankCost] = field(default_factory=list)

    def summary(self) -> str:
        slow = max(self.ranks, key=lambda r: r.seconds)
        return (f"predicted {self.seconds * 1e3:.1f} ms (slowest rank {slow.rank}: {slow.bytes_sent} B sent, "
                f"{slow.bytes_received} B received, {slow.bytes_copied} B copied, {slow.exchanges} exchanges)")


def _copied(copies) -> int:
    return sum(c.nbytes for c in copies)


def _runs(copies) -> int:
    return sum(box_runs(c.boxes) for c in copies)


def _compaction_bytes(keep: np.ndarray):
    """(bytes copied, bytes page-moved) of an in-place compaction on CPU: runs that stay in place cost nothing;
    the whole pages of long runs are remapped (the rule of _C.remap_boxes_ordered), the rest is copied."""
    from ..execution.copy import REMAP_MIN_BYTES, expand_runs
    runs = expand_runs(keep)
    runs = runs[runs[:, 0] != runs[:, 1]]
    if not len(runs):
        return 0, 0
    src, dst, n = runs[:, 0], runs[:, 1], runs[:, 2]
    order = np.argsort(src, kind="stable")
    disjoint = bool(np.all(src[order][1:] >= (src + n)[order][:-1]))
    distance = np.abs(src - dst)
    movable = (n >= REMAP_MIN_BYTES) & (distance >= n) & (distance % _PAGE == 0) if disjoint else np.zeros(len(n), bool)
    pages = np.where(movable, np.maximum(n - _PAGE, 0) // _PAGE * _PAGE, 0)  # at most a page of ends is copied
    return int(n.sum() - pages.sum()), int(pages.sum())


_PAGE = 4096


def _phase_cost(rank: int, rounds, layers: int = 1, ops=(), release=()) -> RankCost:
    """The work of one phase (the weight rounds, or the KV rounds repeated over `layers`) on one rank."""
    c = RankCost(rank, 0, 0, 0, 0)
    for op in ops:
        if op.keep is not None and op.kind == "compact":
            copied, moved = _compaction_bytes(op.keep)
            c.bytes_copied += copied
            c.bytes_page_moved += moved
        elif op.keep is not None and op.kind == "alloc":
            c.bytes_copied += box_bytes(op.keep)
        c.bytes_allocated += op.new_nbytes if op.kind == "alloc" else 0
        c.copy_calls += 1
    for op in release:
        c.bytes_copied += op.new_nbytes
        c.bytes_allocated += op.new_nbytes
    for rnd in rounds:
        c.bytes_sent += rnd.send_bytes * layers
        c.bytes_received += rnd.recv_bytes * layers
        c.bytes_received_fresh += sum(m.nbytes for m in rnd.recvs if m.buffer.startswith("new:")) * layers
        c.bytes_copied += (_copied(rnd.before) + _copied(rnd.after)) * layers
        c.runs_copied += (_runs(rnd.before) + _runs(rnd.after)) * layers
        c.copy_calls += (len(rnd.before) + len(rnd.after)) * layers
        c.exchanges += bool(rnd.sends or rnd.recvs) * layers
    c.bytes_allocated = max(0, c.bytes_allocated - c.bytes_received_fresh)
    return c


def rank_costs(plan, rank: int, release_storage: bool = False) -> List[RankCost]:
    """The work rank `rank` does in `plan`, per phase (weights, then KV), from its programs."""
    from .kv_program import build_kv_program
    from .weight_program import build_weight_program
    weights = build_weight_program(plan, rank)
    ops = weights.prologue + [op for wr in weights.rounds for op in wr.finish]
    out = [_phase_cost(rank, [wr.round for wr in weights.rounds], 1, ops,
                       weights.release if release_storage else ())]
    if plan.kv is not None:
        out.append(_phase_cost(rank, build_kv_program(plan, rank).rounds, plan.kv.layout.num_layers))
    return out


def _seconds(c: RankCost, bw: Bandwidths) -> float:
    return (max(c.bytes_sent, c.bytes_received) / bw.link_bytes_per_s
            + c.bytes_received_fresh / bw.fresh_link_bytes_per_s
            + c.bytes_copied / bw.copy_bytes_per_s + c.runs_copied * bw.run_s
            + c.bytes_page_moved / (bw.page_move_bytes_per_s or bw.copy_bytes_per_s)
            + c.bytes_allocated / bw.fresh_bytes_per_s + c.exchanges * bw.round_s + c.copy_calls * bw.copy_call_s)


def estimate(plan, bandwidths: Bandwidths, ranks: Optional[List[int]] = None,
             release_storage: bool = False) -> Estimate:
    """Predicted seconds of `plan` under `bandwidths`: each phase (weights, KV) lasts as long as its slowest rank
    (exchanges tie the ranks together), plus call_s. `ranks` restricts the ranks considered (default: all)."""
    per_rank = {r: rank_costs(plan, r, release_storage) for r in (range(plan.world_size) if ranks is None else ranks)}
    total = bandwidths.call_s + (bandwidths.kv_move_s * plan.kv.num_moves if plan.kv is not None else 0.0)
    for phase in range(len(next(iter(per_rank.values())))):
        slowest = 0.0
        for costs in per_rank.values():
            costs[phase].seconds = _seconds(costs[phase], bandwidths)
            slowest = max(slowest, costs[phase].seconds)
        total += slowest
    summed = []
    for r, costs in per_rank.items():
        c = RankCost(r, *(sum(getattr(x, f) for x in costs) for f in
                          ("bytes_sent", "bytes_received", "bytes_copied", "exchanges", "bytes_allocated",
                           "runs_copied", "bytes_received_fresh", "copy_calls", "bytes_page_moved", "seconds")))
        summed.append(c)
    return Estimate(total, summed)


def calibrate(group=None, device="cpu", nbytes: int = 32 << 20, repeats: int = 3, kv_blocks: int = 1024) -> Bandwidths:
    """Measure this group's speeds (collective: call on every rank; the result is the same on every rank).

    link: every rank sends nbytes to the next rank and receives from the previous one at once (a ring), median
    of `repeats`, slowest rank; copy: a copy of 4 * nbytes through the byte engine on every rank at once (beyond a
    last-level cache: a copy that stays in the cache runs twice as fast as the real ones); fresh: a copy of nbytes
    into a newly allocated buffer, minus the copy; fresh link: the ring into a new buffer, minus the ring; run: a
    copy of 512-byte runs (a KV head's slice of a block row), minus its bytes at the copy speed, per run; page move:
    an in-place compaction of 4 * nbytes whose pages are remapped (CPU); round: 20 one-byte ring exchanges; call: a
    retp call that moves nothing (no tensors, same degree); KV move: a merge of every rank into one instance and the
    split back with a KV cache of kv_blocks blocks per rank (tiny heads: the bytes are negligible), minus two
    calls, per planned block move."""
    import torch
    import torch.distributed as dist

    from ..api import retp
    from ..config import TPConfig
    from ..execution.copy import compact_in_place, copy_boxes, make_boxes
    from ..transport.torch_dist import TorchDistTransport
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    transport = TorchDistTransport(group, stage_via_host=torch.device(device).type == "cuda" and
                                   dist.get_backend(group) != "nccl")
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def ring(n):
        if world > 1:
            transport.exchange([((rank + 1) % world, send[:n])], [((rank - 1) % world, recv[:n])])

    def timed(fn):
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    ring(nbytes)  # warm up the pairs
    link = statistics.median(timed(lambda: ring(nbytes)) for _ in range(repeats))
    big = 4 * nbytes
    big_src = torch.ones(big, dtype=torch.uint8, device=device)
    big_dst = torch.ones(big, dtype=torch.uint8, device=device)
    big_boxes = make_boxes(0, 0, big)
    copy = statistics.median(timed(lambda: copy_boxes(big_dst, big_src, big_boxes)) for _ in range(repeats)) * \
        nbytes / big  # seconds per nbytes
    boxes = make_boxes(0, 0, nbytes)

    def fresh_copy():
        copy_boxes(torch.empty(nbytes, dtype=torch.uint8, device=device), send, boxes)

    def fresh_ring():
        fresh_recv = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if world > 1:
            transport.exchange([((rank + 1) % world, send)], [((rank - 1) % world, fresh_recv)])

    fresh = max(1e-9, statistics.median(timed(fresh_copy) for _ in range(repeats)) - copy)
    fresh_link = max(1e-9, statistics.median(timed(fresh_ring) for _ in range(repeats)) - link)
    run_bytes = 512
    num_runs = big // (2 * run_bytes)
    strided = make_boxes(0, 0, run_bytes, num_runs, 2 * run_bytes, run_bytes)  # every other run, packed
    runs_t = statistics.median(timed(lambda: copy_boxes(big_dst, big_src, strided)) for _ in range(repeats))
    run_s = max(0.0, runs_t - num_runs * run_bytes / (nbytes / copy)) / num_runs
    page_move = 0.0
    if torch.device(device).type == "cpu":  # one long run moved down by its length, back and forth
        half = big // 2
        moves = [make_boxes(half, 0, half), make_boxes(0, half, half)]
        scratch = torch.empty(0, dtype=torch.uint8)
        page_t = statistics.median(timed(lambda i=i: compact_in_place(big_src, moves[i % 2], scratch))
                                   for i in range(repeats))
        page_move = half / max(page_t, 1e-9)
    big_src = big_dst = None  # free the two large buffers before the calls below
    one = make_boxes(0, 0, 1)
    copy_call = statistics.median(timed(lambda: [copy_boxes(recv, send, one) for _ in range(100)])
                                  for _ in range(repeats)) / 100
    rounds = statistics.median(timed(lambda: [ring(1) for _ in range(20)]) for _ in range(repeats)) / 20
    config = TPConfig.contiguous(world, 1)
    call = statistics.median(timed(lambda: retp(group, 1, config=config, specs=[], weights={},
                                                measure_memory=False)) for _ in range(repeats))
    kv_move = 0.0
    if world > 1 and kv_blocks > 0:
        from ..kv import KVCache
        from ..layout.kv import KVLayout
        from ..verify import random_sequences
        layout = KVLayout("vllm_flash_attn", "NHD", 1, world, 8, 16, "float32")
        tables = random_sequences(world, kv_blocks, 0.45, seed=0)[rank]
        moves = []

        def merge_and_split():
            res = retp(group, world, config=config, specs=[], weights={}, measure_memory=False,
                       kv=KVCache(layout, layout.allocate(kv_blocks, 1, device), tables))
            back = retp(group, 1, config=res.config, specs=[], weights={}, measure_memory=False,
                        kv=KVCache(layout, res.kv.layers, res.kv.block_tables))
            moves.append(res.plan.kv.num_moves + back.plan.kv.num_moves)

        pair = statistics.median(timed(merge_and_split) for _ in range(repeats))
        kv_move = max(0.0, pair - 2 * call) / max(1, moves[-1])
    figures = torch.tensor([link, copy, rounds, call, fresh, fresh_link, run_s, copy_call,
                            1.0 / page_move if page_move else 0.0, kv_move], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)  # the slowest rank's view, agreed by all
    link, copy, rounds, call, fresh, fresh_link, run_s, copy_call, page_s, kv_move = figures.tolist()
    return Bandwidths(nbytes / max(link, 1e-9) if world > 1 else float("inf"), nbytes / max(copy, 1e-9), rounds,
                      call, nbytes / fresh, nbytes / fresh_link if world > 1 else float("inf"), run_s, copy_call,
                      1.0 / page_s if page_s else 0.0, kv_move)
