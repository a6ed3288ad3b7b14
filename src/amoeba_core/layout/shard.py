"""Cutting a full checkpoint tensor into the shard an engine loads at a given TP degree."""
from __future__ import annotations

import torch

from ..errors import SpecMismatchError
from .specs import ParamSpec


def check_full(full: torch.Tensor, spec: ParamSpec) -> None:
    if tuple(full.shape) != tuple(spec.shape) or full.dtype != spec.torch_dtype:
        raise SpecMismatchError(f"{spec.name}: full tensor has shape {tuple(full.shape)} and dtype {full.dtype}, "
                                f"spec says {tuple(spec.shape)} and {spec.torch_dtype}")


def real_segments(spec: ParamSpec, tp_rank: int, degree: int):
    """[(shard_pos, full_pos, length)] along the split dim: the non-padding stretches of a shard and where they sit
    in the checkpoint tensor. Padding rows (zeros) are the shard positions no segment covers."""
    out, pos = [], 0
    pads = spec.pad_ranges()
    for start, stop in spec.shard_ranges(tp_rank, degree):
        real_stop = stop  # padding sits at the end of its section: cut it off
        for ps, pe in pads:
            if ps < stop and start < pe:
                real_stop = min(real_stop, ps)
        if real_stop > start:
            out.append((pos, spec.unpadded_position(start), real_stop - start))
        pos += stop - start
    return out


def shard(full: torch.Tensor, spec: ParamSpec, tp_rank: int, degree: int) -> torch.Tensor:
    """The shard TP rank `tp_rank` of `degree` holds: a new contiguous tensor of shape spec.shard_shape(...).

    full: the checkpoint tensor, shape spec.shape, dtype spec.dtype (any device). Padding rows are zeros.
    """
    check_full(full, spec)
    if not spec.is_sharded:
        spec.check_degree(degree)
        return full.clone().contiguous()
    out = torch.zeros(spec.shard_shape(tp_rank, degree), dtype=full.dtype, device=full.device)
    for pos, full_pos, length in real_segments(spec, tp_rank, degree):
        out.narrow(spec.split_dim, pos, length).copy_(full.narrow(spec.split_dim, full_pos, length))
    return out


def unshard(parts, spec: ParamSpec, degree: int) -> torch.Tensor:
    """The checkpoint tensor rebuilt from the shards of TP ranks 0..degree-1 (inverse of shard())."""
    if not spec.is_sharded:
        return parts[0].clone()
    full = torch.empty(spec.shape, dtype=parts[0].dtype, device=parts[0].device)
    for tp, part in enumerate(parts):
        for pos, full_pos, length in real_segments(spec, tp, degree):
            full.narrow(spec.split_dim, full_pos, length).copy_(part.narrow(spec.split_dim, pos, length))
    return full
