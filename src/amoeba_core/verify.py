"""Independent checks: deterministic test data and the minimum movable bytes by exhaustive search.

Nothing here uses the planner. The minimum is computed from shard() of index tensors (which element of the full
tensor lands where), so it checks the planner's interval arithmetic and its placement choice from the outside.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import zlib
from typing import Dict, Sequence

import numpy as np
import torch

from .layout.shard import shard
from .layout.specs import ParamSpec


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def full_tensor(spec: ParamSpec, seed: int = 0) -> torch.Tensor:
    """Deterministic full tensor of a spec: a pure function of (seed, name); 1-byte integer types get random
    integers, floating types N(0, 0.02^2) rounded to the dtype (float8 included)."""
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    dt = spec.torch_dtype
    if dt.is_floating_point:
        return (torch.randn(spec.shape, generator=g) * 0.02).to(dt)
    info = torch.iinfo(dt)
    return torch.randint(max(info.min, -(2 ** 31)), min(info.max, 2 ** 31 - 1), spec.shape, generator=g,
                         dtype=torch.int64).to(dt)


def full_weights(specs: Sequence[ParamSpec], seed: int = 0) -> Dict[str, torch.Tensor]:
    return {s.name: full_tensor(s, seed) for s in specs}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and float8 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@functools.lru_cache(maxsize=1024)
def held_elements(spec: ParamSpec, tp_rank: int, degree: int) -> np.ndarray:
    """Sorted flat indices (into the full checkpoint tensor) of the real elements a shard holds (padding excluded).
    Cached (read-only arrays): an exhaustive check over several transitions of one model asks for each shard once."""
    spec64 = dataclasses.replace(spec, dtype="int64")
    index = torch.arange(1, int(np.prod(spec.shape)) + 1, dtype=torch.int64).reshape(spec.shape)
    values = shard(index, spec64, tp_rank, degree).reshape(-1).numpy()
    out = np.unique(values[values > 0]) - 1
    out.flags.writeable = False
    return out


def weight_overlap_bytes(specs: Sequence[ParamSpec], old_degree: int, new_degree: int) -> np.ndarray:
    """(old_degree, new_degree) int64: bytes of new TP rank r' that old TP rank r holds, summed over specs."""
    out = np.zeros((old_degree, new_degree), dtype=np.int64)
    for spec in specs:
        if not spec.is_sharded:
            continue
        old = [held_elements(spec, r, old_degree) for r in range(old_degree)]
        new = [held_elements(spec, r, new_degree) for r in range(new_degree)]
        for r in range(old_degree):
            for rn in range(new_degree):
                out[r, rn] += np.intersect1d(old[r], new[rn], assume_unique=True).size * spec.itemsize
    return out


def weight_need_bytes(specs: Sequence[ParamSpec], new_degree: int) -> np.ndarray:
    """(new_degree,) int64: real (non-padding) bytes the new shard of each TP rank holds, sharded specs only."""
    return np.array([sum(held_elements(s, r, new_degree).size * s.itemsize for s in specs if s.is_sharded)
                     for r in range(new_degree)], dtype=np.int64)


def min_bytes_exhaustive(gain: np.ndarray, need: np.ndarray, allowed=None) -> int:
    """min over every assignment of group ranks to new slots of sum(need) - retained bytes.

    gain: (world, world) bytes group rank g keeps if it takes slot s; need: (world,) bytes slot s must hold.
    allowed: optional (world, world) bool, rank g may take slot s (assignments using another cell are skipped).
    Brute force over all world! permutations (world <= 8).
    """
    world = gain.shape[0]
    if world > 8:
        raise ValueError(f"exhaustive search over {world}! placements is too slow; use world <= 8")
    perms = np.array(list(itertools.permutations(range(world))), dtype=np.int64)
    retained = gain[np.arange(world)[None, :], perms].sum(axis=1)
    if allowed is not None:
        ok = np.asarray(allowed, dtype=bool)[np.arange(world)[None, :], perms].all(axis=1)
        if not ok.any():
            raise ValueError("no assignment is allowed")
        retained = retained[ok]
    return int(need.sum() - retained.max())


def weight_min_bytes(specs: Sequence[ParamSpec], old_slots, new_degree: int) -> int:
    """Minimum weight bytes any placement must move from old configuration `old_slots` ((instance, tp) per rank,
    degree len(...)/instances) to `new_degree`, by exhaustive search."""
    world = len(old_slots)
    old_degree = world // (max(i for i, _ in old_slots) + 1)
    overlap = weight_overlap_bytes(specs, old_degree, new_degree)
    need_tp = weight_need_bytes(specs, new_degree)
    slots = [(s // new_degree, s % new_degree) for s in range(world)]
    gain = np.array([[overlap[old_slots[g][1], tp] for _, tp in slots] for g in range(world)], dtype=np.int64)
    need = np.array([need_tp[tp] for _, tp in slots], dtype=np.int64)
    return min_bytes_exhaustive(gain, need)


# ---- KV cache -------------------------------------------------------------------------------------------------
def kv_block_values(layout, layer: int, instance: int, block: int, heads) -> torch.Tensor:
    """Expected content of one block of one layer: (num_components, block_size, len(heads), head_dim) in the
    layout's dtype (components K, V; MLA: the latent alone), a pure function of (layer, old instance, old block id,
    global head, component, token, dim)."""
    h = torch.arange(heads[0], heads[1]).view(1, 1, -1, 1)
    c = torch.arange(layout.num_components).view(-1, 1, 1, 1)
    t = torch.arange(layout.block_size).view(1, -1, 1, 1)
    x = torch.arange(layout.head_dim).view(1, 1, 1, -1)
    key = (layer * 7 + instance * 1_000_003 + block * 7919 + h * 104_729 + c * 31 + t * 17 + x * 3) % 251
    dt = getattr(torch, layout.dtype)
    if layout.itemsize == 1:
        return key.to(torch.uint8).view(dt)
    return key.to(dt)


def kv_block_view(layout, layer_tensor, block: int) -> torch.Tensor:
    """Logical (num_components, block_size, H_local, head_dim) view of one block of one layer's tensor(s)."""
    if layout.engine == "vllm_flash_attn":
        return layer_tensor[:, block]
    if layout.engine == "vllm_flashinfer":
        return layer_tensor[block]
    if layout.engine == "vllm_mla":
        return layer_tensor[block][None, :, None, :]  # (1, block_size, 1, latent)
    k, v = layer_tensor
    s = slice(block * layout.block_size, (block + 1) * layout.block_size)
    return torch.stack([k[s], v[s]])


def kv_fill(layout, layers, instance: int, blocks, heads, seed: int = 0) -> None:
    """Write the expected content of `blocks` (this rank's heads) into a pool; everything else gets noise."""
    for li, layer in enumerate(layers):
        for t in (layer if layout.engine == "sglang" else (layer,)):
            flat = t.transpose(-3, -2) if layout.order == "HND" else t
            noise = torch.randint(0, 256, (flat.numel() * layout.itemsize,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(seed + li))
            flat.reshape(-1).view(torch.uint8).copy_(noise)
        for b in blocks:
            want = kv_block_values(layout, li, instance, b, heads)
            if layout.engine == "sglang":
                s = slice(b * layout.block_size, (b + 1) * layout.block_size)
                layer[0][s].copy_(want[0])
                layer[1][s].copy_(want[1])
            else:
                kv_block_view(layout, layer, b).copy_(want)


def kv_check(layout, layers, tables_new: dict, origins: dict, heads) -> list:
    """Compare every live block of every sequence of this rank's new instance with its expected bytes.

    tables_new: seq -> new block table (this rank's new instance); origins: seq -> [(instance, block)] per
    position, the key the block's content was created with (kv_fill / kv_block_values). Returns the mismatches
    as (seq, position, layer); empty when every block matches bit for bit.
    """
    bad = []
    for seq, new_table in tables_new.items():
        for pos, ((inst, b), j) in enumerate(zip(origins[seq], new_table)):
            for li, layer in enumerate(layers):
                want = kv_block_values(layout, li, inst, b, heads)
                if not same_bytes(kv_block_view(layout, layer, j), want):
                    bad.append((seq, pos, li))
    return bad


def kv_min_bytes(layout, old_slots, new_degree: int, sequences: dict, destinations: dict, allowed=None) -> int:
    """Minimum KV bytes any placement must move, by exhaustive search (world <= 8).

    sequences: seq -> (old instance, old block table); destinations: seq -> new instance (a cached block that
    survives in a new instance is a one-block "sequence" here); allowed: optional (world, world) bool, group rank
    g may take new slot s (slot s = instance s // new_degree, TP rank s % new_degree). Counts whole blocks:
    one (old instance, block, new instance) triple is one move however many sequences share it. Uses sets of
    (block, head) pairs, independent of the planner's arithmetic. An MLA cache ("vllm_mla") is one latent head
    that every rank of an instance holds whole (stated here directly, not taken from the layout's head split).
    """
    world = len(old_slots)
    old_degree = world // (max(i for i, _ in old_slots) + 1)
    moves = {(inst, b, destinations[s]) for s, (inst, table) in sequences.items() for b in table}
    per_head = layout.num_components * layout.block_size * layout.head_dim * layout.itemsize * layout.num_layers

    def heads(tp, degree):
        if layout.engine == "vllm_mla":
            return {0}
        a, b = layout.head_range(tp, degree)
        return set(range(a, b))

    need = np.zeros(world, dtype=np.int64)
    gain = np.zeros((world, world), dtype=np.int64)
    for s in range(world):
        inst_new, tp_new = s // new_degree, s % new_degree
        wanted = {(i, b, h) for (i, b, d) in moves if d == inst_new for h in heads(tp_new, new_degree)}
        need[s] = len(wanted) * per_head
        for g, (inst_old, tp_old) in enumerate(old_slots):
            held = heads(tp_old, old_degree)
            gain[g, s] = sum(1 for (i, b, h) in wanted if i == inst_old and h in held) * per_head
    return min_bytes_exhaustive(gain, need, allowed)


def random_sequences(num_instances: int, num_blocks: int, fill: float, seed: int, reserved: int = 0,
                     share: float = 0.3, max_len: int = 6) -> dict:
    """Per old instance: seq_id -> block table over a shuffled (fragmented) pool, with shared prefixes.

    Each instance uses round(fill * usable blocks) distinct blocks in tables of 1..max_len fresh blocks; with
    probability `share` a table starts with a prefix of an earlier table of the same instance. Sequence ids are
    unique across instances.
    """
    rng = random.Random(seed)
    out, next_id = {}, 0
    for inst in range(num_instances):
        ids = list(range(reserved, num_blocks))
        rng.shuffle(ids)
        free = ids[:round(fill * len(ids))]
        seqs, k = {}, 0
        while k < len(free):
            n = rng.randint(1, max_len)
            table = free[k:k + n]
            k += n
            if seqs and rng.random() < share:
                prev = rng.choice(list(seqs.values()))
                table = prev[:rng.randint(1, len(prev))] + table
            seqs[next_id] = table
            next_id += 1
        out[inst] = seqs
    return out
