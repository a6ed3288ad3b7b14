"""Rank-side pieces of bench/retp_bench.py: cheap deterministic model state, per-pair byte counts of a retp plan,
and the alternatives retp is compared with (floor, naive, dcp, restart).

Everything here runs inside RankPool workers (one process per rank) and is device-agnostic: tensors live on
`device` ("cpu" with gloo, "cuda" with NCCL).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from amoeba_core.layout import shard, unshard
from amoeba_core.verify import kv_block_values


# ---- memory accounting -------------------------------------------------------------------------------------
class Tracker:
    """Bytes a baseline holds on top of the old and new state (same rule as retp's ExtraMemoryTracker: a new
    tensor alive beside its old one counts until the old one is released; staging buffers count while alive)."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.current += int(n)
        self.peak = max(self.peak, self.current)

    def sub(self, n: int) -> None:
        self.current -= int(n)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def rss_reset() -> int:
    """Reset the RSS high-water mark (VmHWM) to the current RSS; return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def rss_peak() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- deterministic model state -----------------------------------------------------------------------------
class FullModel:
    """Full (checkpoint) tensors as a pure function of the spec name: a fixed pool of N(0, 0.02) values (same on
    every rank) tiled from an offset given by crc32(name). Building a tensor costs one memcpy, so the starting
    state of every repetition is rebuilt from scratch cheaply, and shard() of these tensors is the ground truth."""

    def __init__(self, dtype: torch.dtype, device, pool_elems: int = 1 << 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(pool_elems, generator=g) * 0.02).to(dtype).to(device)
        self.device = device

    def full(self, spec) -> torch.Tensor:
        n = int(np.prod(spec.shape))
        out = torch.empty(n, dtype=spec.torch_dtype, device=self.device)
        p = self.pool.numel()
        src, pos = zlib.crc32(spec.name.encode()) % p, 0
        while pos < n:
            k = min(n - pos, p - src)
            out[pos:pos + k].copy_(self.pool[src:src + k])
            pos, src = pos + k, 0
        return out.view(spec.shape)

    def shard(self, spec, tp: int, degree: int) -> torch.Tensor:
        full = self.full(spec)
        if spec.shard_shape(tp, degree) == tuple(spec.shape):
            return full
        return shard(full, spec, tp, degree)


def build_weights(model: FullModel, specs, tp: int, degree: int) -> Dict[str, torch.Tensor]:
    return {s.name: model.shard(s, tp, degree) for s in specs}


def build_kv(layout, num_blocks: int, degree: int, tp: int, instance: int, tables: dict, device):
    """A pool of num_blocks blocks at `degree` whose live blocks hold kv_block_values (verify.kv_check checks
    them); free blocks are zeros."""
    layers = layout.allocate(num_blocks, degree, device=device)
    heads = layout.head_range(tp, degree)
    live = sorted({b for t in tables.values() for b in t})
    for li, layer in enumerate(layers):
        for b in live:  # vllm_flash_attn logical layout (2, N, bs, H, d); other engines via verify.kv_block_view
            from amoeba_core.verify import kv_block_view
            kv_block_view(layout, layer, b).copy_(kv_block_values(layout, li, instance, b, heads))
    return layers


def weights_ok(model: FullModel, specs, weights, tp: int, degree: int, sample: int = 0) -> List[str]:
    """Names of tensors that differ from shard() of the full tensor (bit for bit)."""
    bad = []
    for s in specs:
        want = model.shard(s, tp, degree)
        got = weights[s.name]
        if got.shape != want.shape or not torch.equal(got.reshape(-1).view(torch.uint8),
                                                      want.reshape(-1).view(torch.uint8)):
            bad.append(s.name)
        del want
    return bad


# ---- process groups ----------------------------------------------------------------------------------------
_GROUPS: Dict[tuple, object] = {}


def instance_groups(config) -> Dict[tuple, object]:
    """Process groups of every instance of `config` (collective: every rank calls it with the same config)."""
    for ranks in config.instances():
        key = tuple(ranks)
        if len(ranks) > 1 and key not in _GROUPS:
            _GROUPS[key] = dist.new_group(sorted(ranks))
    return {tuple(r): _GROUPS.get(tuple(r)) for r in config.instances()}


def gather_in_instance(t: torch.Tensor, config, rank: int) -> List[torch.Tensor]:
    """all_gather of `t` within rank's instance; returns the parts indexed by TP rank."""
    inst = config.slot(rank).instance
    ranks = config.instances()[inst]
    if len(ranks) == 1:
        return [t]
    group = _GROUPS[tuple(ranks)]
    order = sorted(ranks)  # group rank order of new_group
    parts = [torch.empty_like(t) for _ in ranks]
    dist.all_gather(parts, t.contiguous(), group=group)
    return [parts[order.index(g)] for g in ranks]


# ---- per-pair bytes of a retp plan (for the floor) ---------------------------------------------------------
def plan_pair_bytes(plan) -> np.ndarray:
    """(world, world) bytes src -> dst that the plan moves (weights and KV), the KV part checked against the plan's
    per-rank counts."""
    out = plan.pair_bytes()
    if plan.kv is not None:
        from amoeba_core.planning.kv_rounds import pair_bytes
        kv = pair_bytes(plan.kv)
        if not (np.array_equal(kv.sum(1), plan.kv.sent) and np.array_equal(kv.sum(0), plan.kv.received)):
            raise AssertionError(f"KV pair bytes {kv.sum(1)} / {kv.sum(0)} do not match the plan's "
                                 f"{plan.kv.sent} / {plan.kv.received}")
    return out


# ---- floor: the transport alone ----------------------------------------------------------------------------
def floor_buffers(pairs: np.ndarray, rank: int, device, local_bytes: int = 0):
    """Buffers for the floor: one send / receive buffer per peer of the plan's pair bytes, and a source and a
    destination of the bytes this rank must relocate locally."""
    sends = {p: torch.empty(int(n), dtype=torch.uint8, device=device) for p, n in enumerate(pairs[rank]) if n}
    recvs = {p: torch.empty(int(n), dtype=torch.uint8, device=device) for p, n in enumerate(pairs[:, rank]) if n}
    # Local relocations land in memory the rank already holds (retp compacts in place or copies into a shard
    # whose first touch the received bytes already pay for): the destination is touched, untimed.
    local = [torch.zeros(int(local_bytes), dtype=torch.uint8, device=device),
             torch.zeros(int(local_bytes), dtype=torch.uint8, device=device)] if local_bytes else []
    for t in sends.values():
        t.zero_()  # the bytes being sent exist already (touched, untimed); what arrives lands in new memory
    return sends, recvs, local


def floor_exchange(sends, recvs, local=()) -> None:
    """The floor: every cross-rank byte in one message per peer, every local relocation as one copy."""
    ops = [dist.P2POp(dist.isend, t, p) for p, t in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, t, p) for p, t in sorted(recvs.items())]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    if local:
        local[1].copy_(local[0])


def floor_samehost_buffers(pairs: np.ndarray, rank: int, local_bytes: int, directory: str, tag: str):
    """Buffers for the same-host floor: every rank writes what it sends into one shared file (peer p's bytes at
    offset pairs[rank, :p].sum()), maps every peer's file, and gets a fresh destination per peer it receives from.
    Everything is touched untimed (the sender's bytes exist already); returns (sources, destinations, local,
    cleanup)."""
    world = pairs.shape[0]
    mine = f"{directory}/floor_{tag}_{rank}"
    out = torch.from_file(mine, shared=True, size=max(1, int(pairs[rank].sum())), dtype=torch.uint8)
    out.fill_(1)
    dist.barrier()  # every file exists and is written
    sources, dests = {}, {}
    for p in range(world):
        n = int(pairs[p, rank])
        if not n:
            continue
        theirs = torch.from_file(f"{directory}/floor_{tag}_{p}", shared=True, size=max(1, int(pairs[p].sum())),
                                 dtype=torch.uint8)
        start = int(pairs[p, :rank].sum())
        sources[p] = theirs[start:start + n]
        sources[p].max()  # map the pages now, not in the timed copy
        dests[p] = torch.empty(n, dtype=torch.uint8)
    local = [torch.zeros(int(local_bytes), dtype=torch.uint8), torch.zeros(int(local_bytes), dtype=torch.uint8)] \
        if local_bytes else []  # touched, as in floor_buffers

    def cleanup():
        dist.barrier()
        os.remove(mine)

    return sources, dests, local, cleanup


def floor_samehost_copy(sources, dests, local=()) -> None:
    """The same-host floor: every received byte copied once from the peer's shared mapping, every local
    relocation once."""
    for p, src in sources.items():
        dests[p].copy_(src)
    if local:
        local[1].copy_(local[0])


# ---- naive: gather full tensors, slice with shard(), copy the KV cache into a second pool ------------------
def naive_weights(rank, specs, weights, old, new, mem: Tracker) -> int:
    """Per tensor: all_gather the old shards within the old instance, rebuild the full tensor, shard() it for the
    new slot, release the old shard. Returns bytes received."""
    o, n = old.slot(rank), new.slot(rank)
    received = 0
    for spec in specs:
        cur = weights[spec.name]
        want = spec.shard_shape(n.tp_rank, n.degree)
        if not spec.is_sharded or o.degree == 1:
            full = cur                        # this rank already holds the full tensor
        else:
            parts = gather_in_instance(cur, old, rank)
            mem.add(sum(nbytes(p) for p in parts))
            received += (len(parts) - 1) * nbytes(cur)
            full = unshard(parts, spec, o.degree)
            mem.add(nbytes(full))
            mem.sub(sum(nbytes(p) for p in parts))
            del parts
        if full is not cur and want == tuple(full.shape):
            new_t = full                      # new degree 1: the gathered full tensor is the new shard
        elif full is cur and want == tuple(cur.shape):
            new_t = cur                       # replicated, or degree 1 -> degree 1
        else:
            new_t = shard(full, spec, n.tp_rank, n.degree)
            mem.add(nbytes(new_t))
        if full is not cur and full is not new_t:
            mem.sub(nbytes(full))
        weights[spec.name] = new_t
        if new_t is not cur:
            mem.sub(nbytes(new_t))            # the old shard is released: the new one is steady state now
        del full, cur, new_t
    return received


def _kv_blocks(layout, layer, idx: torch.Tensor) -> torch.Tensor:
    """(2, n, bs, H_local, d) copy of blocks idx of one layer (vllm_flash_attn / flashinfer logical views)."""
    if layout.engine == "vllm_flash_attn":
        return layer.index_select(1, idx)
    if layout.engine == "vllm_flashinfer":
        return layer.index_select(0, idx).transpose(0, 1)
    raise NotImplementedError("the naive KV baseline covers the vLLM layouts")


def _kv_write(layout, layer, idx: torch.Tensor, data: torch.Tensor) -> None:
    if layout.engine == "vllm_flash_attn":
        layer[:, idx] = data
    else:
        layer[idx] = data.transpose(0, 1)


def naive_kv(rank, layout, layers, tables: dict, old, new, dests: dict, mem: Tracker, device):
    """The KV cache copied into a newly allocated pool at the new degree.

    1. every rank learns every instance's block tables (all_gather_object);
    2. the ranks of each old instance all_gather their heads of the instance's live blocks (all layers), so each
       holds every head of them;
    3. each new rank gets the full-head blocks of every sequence that moves to its new instance from one holder of
       the old instance (point-to-point, batched), keeps its head range, and writes them into a new pool of the same
       bytes (new block ids assigned in order); the old pool is released at the end.
    Returns (new layers, new block tables of this rank's new instance, bytes received)."""
    world = old.world_size
    gathered = [None] * world
    dist.all_gather_object(gathered, (old.slot(rank).instance, {s: list(t) for s, t in tables.items()}))
    all_tables = {}
    for inst, tb in gathered:
        all_tables[inst] = tb
    o, n = old.slot(rank), new.slot(rank)
    L = layout
    blocks_of = {i: sorted({b for t in tb.values() for b in t}) for i, tb in all_tables.items()}
    # moves: (old instance j, new instance I) -> sorted distinct old blocks
    moves: Dict[tuple, list] = {}
    for j, tb in all_tables.items():
        for s, t in tb.items():
            moves.setdefault((j, dests[s]), set()).update(t)
    moves = {k: sorted(v) for k, v in moves.items()}
    received = 0
    # 2. full-head live blocks of my old instance: (layers, 2, nB, bs, Hkv, d)
    mine_idx = torch.tensor(blocks_of.get(o.instance, []), dtype=torch.long, device=device)
    mine = torch.stack([_kv_blocks(L, layer, mine_idx) for layer in layers])
    mem.add(nbytes(mine))
    if o.degree > 1:
        parts = gather_in_instance(mine, old, rank)
        mem.add(sum(nbytes(p) for p in parts) - nbytes(mine))
        received += (len(parts) - 1) * nbytes(mine)
        shape = list(mine.shape)
        shape[-2] = L.num_kv_heads
        fullh = torch.empty(shape, dtype=mine.dtype, device=device)
        for tp, p in enumerate(parts):
            a, b = L.head_range(tp, o.degree)
            fullh[..., a:b, :] = p
        mem.add(nbytes(fullh))
        mem.sub(sum(nbytes(p) for p in parts))
        del parts, mine
    else:
        fullh = mine
    pos_of = {b: k for k, b in enumerate(blocks_of.get(o.instance, []))}
    old_inst = old.instances()

    def sender(j: int, g: int) -> int:
        if g in old_inst[j]:
            return g
        return old_inst[j][new.slot(g).tp_rank % old.degree]

    # 3. point-to-point: full-head blocks of (j -> new instance of g) from sender(j, g) to g
    sends, recvs = {}, {}
    for g in range(world):
        key = (o.instance, new.slot(g).instance)
        if g != rank and key in moves and sender(o.instance, g) == rank:
            idx = torch.tensor([pos_of[b] for b in moves[key]], dtype=torch.long, device=device)
            sends[g] = fullh.index_select(2, idx).contiguous()
            mem.add(nbytes(sends[g]))
    blk_shape = list(fullh.shape)
    for j in sorted(all_tables):
        key = (j, n.instance)
        if key in moves and rank not in old_inst[j]:
            src = sender(j, rank)
            blk_shape[2] = len(moves[key])
            recvs[j] = (src, torch.empty(blk_shape, dtype=fullh.dtype, device=device))
            mem.add(nbytes(recvs[j][1]))
    ops = [dist.P2POp(dist.isend, t, g) for g, t in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, t, src) for _, (src, t) in sorted(recvs.items())]
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    received += sum(nbytes(t) for _, t in recvs.values())
    for t in sends.values():
        mem.sub(nbytes(t))
    sends.clear()
    # new pool (same bytes per rank), new ids in order of (old instance, sequence, position)
    buffer_bytes = int(L.buffers(layers[0])[0].numel())
    n_new = L.num_blocks_for(buffer_bytes, n.degree)
    new_layers = L.allocate(n_new, n.degree, device=device)
    mem.add(buffer_bytes * L.num_buffers * L.num_layers)
    new_id, new_tables, nxt = {}, {}, L.reserved_blocks
    for j in sorted(all_tables):
        for s in sorted(all_tables[j], key=repr):
            if dests[s] != n.instance:
                continue
            for b in all_tables[j][s]:
                if (j, b) not in new_id:
                    new_id[(j, b)] = nxt
                    nxt += 1
            new_tables[s] = [new_id[(j, b)] for b in all_tables[j][s]]
    if nxt > n_new:
        raise RuntimeError(f"naive KV: {nxt} blocks do not fit the new pool of {n_new}")
    h0, h1 = L.head_range(n.tp_rank, n.degree)
    for j in sorted(all_tables):
        key = (j, n.instance)
        if key not in moves:
            continue
        if rank in old_inst[j]:
            idx = torch.tensor([pos_of[b] for b in moves[key]], dtype=torch.long, device=device)
            data = fullh.index_select(2, idx)
        else:
            data = recvs[j][1]
        dst = torch.tensor([new_id[(j, b)] for b in moves[key]], dtype=torch.long, device=device)
        for li, layer in enumerate(new_layers):
            _kv_write(L, layer, dst, data[li, :, :, :, h0:h1])
        del data
    for _, t in recvs.values():
        mem.sub(nbytes(t))
    mem.sub(nbytes(fullh))
    del fullh, recvs
    return new_layers, new_tables, received


# ---- dcp: torch.distributed.checkpoint with DTensors on a (instances, degree) mesh ----------------------------
_MESHES: Dict[tuple, object] = {}


def mesh_of(config, device):
    """DeviceMesh (instances, degree) whose [i, tp] entry is the rank of slot (i, tp) (collective, cached)."""
    from torch.distributed.device_mesh import DeviceMesh
    key = (tuple(tuple(r) for r in config.instances()), torch.device(device).type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(torch.device(device).type, torch.tensor(config.instances()))
    return _MESHES[key]


def dcp_state_dict(specs, weights, config, rank, device) -> dict:
    """One DTensor per (parameter, section): placements [Replicate() over instances, Shard(split_dim) over the
    instance]; the local tensors are views of the fused shards (so a load writes the fused shard in place)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    mesh = mesh_of(config, device)
    slot = config.slot(rank)
    sd = {}
    for spec in specs:
        t = weights[spec.name]
        if not spec.is_sharded:
            sd[spec.name] = DTensor.from_local(t, mesh, [Replicate(), Replicate()], run_check=False,
                                               shape=t.shape, stride=t.stride())
            continue
        pos = 0
        for sec, (start, stop) in zip(spec.sections, spec.shard_ranges(slot.tp_rank, slot.degree)):
            if sec.kind == "kv_heads" and slot.degree > sec.num_units:
                raise NotImplementedError("dcp baseline: replicated KV heads (degree > KV heads) are not a Shard")
            local = t.narrow(spec.split_dim, pos, stop - start)
            pos += stop - start
            shape = list(spec.shape)
            shape[spec.split_dim] = sec.full_size
            stride = [1] * len(shape)
            for d in range(len(shape) - 2, -1, -1):
                stride[d] = stride[d + 1] * shape[d + 1]
            sd[f"{spec.name}.{sec.name}"] = DTensor.from_local(local, mesh, [Replicate(), Shard(spec.split_dim)],
                                                               run_check=False, shape=tuple(shape),
                                                               stride=tuple(stride))
    return sd


def dcp_reshard(rank, specs, weights, old, new, path: str, device, mem: Tracker) -> int:
    """Save the old shards with dcp.save to `path` (tmpfs), release them, allocate the new fused shards and
    dcp.load into views of them (DCP reshards: each rank reads the chunks overlapping its new sections).
    Returns bytes read from the checkpoint by this rank."""
    import torch.distributed.checkpoint as dcp
    sd = dcp_state_dict(specs, weights, old, rank, device)
    dcp.save(sd, checkpoint_id=path)
    del sd
    weights.clear()      # the old shards are released once saved (a restart-free DCP reshard)
    slot = new.slot(rank)
    for spec in specs:
        weights[spec.name] = torch.empty(spec.shard_shape(slot.tp_rank, slot.degree), dtype=spec.torch_dtype,
                                         device=device)
    sd = dcp_state_dict(specs, weights, new, rank, device)
    dcp.load(sd, checkpoint_id=path)
    del sd
    return sum(nbytes(t) for t in weights.values())


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


# ---- restart: safetensors checkpoint + prefill with the reference engine ----------------------------------
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
              torch.int8: "I8", torch.uint8: "U8"}


def write_safetensors(path: str, model: FullModel, specs) -> int:
    """Stream the full model to a .safetensors file one tensor at a time (low memory); returns its size."""
    header, off = {}, 0
    for s in specs:
        n = int(np.prod(s.shape)) * s.itemsize
        header[s.name] = {"dtype": _ST_DTYPES[s.torch_dtype], "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = model.full(s).cpu().contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
            del t
    return os.path.getsize(path)


def restart_load(path: str, specs, tp: int, degree: int, device) -> Dict[str, torch.Tensor]:
    """What a restarted engine does: open the checkpoint, read every tensor, cut its shard with shard()."""
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for s in specs:
            full = f.get_tensor(s.name)
            if s.shard_shape(tp, degree) == tuple(s.shape):
                # get_tensor may return a view of the mmap'ed file: copy, as loading into device memory does
                out[s.name] = full.to(device, copy=True)
            else:
                out[s.name] = shard(full, s, tp, degree).to(device)
            del full
    return out


def cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
