"""Cutting a full checkpoint tensor into the shard an engine loads at a given TP degree."""
from __future__ import annotations

import torch

from ..errors import SpecMismatchError
from .specs import ParamSpec


def check_full(full: torch.Tensor, spec: ParamSpec) -> None:
    if tuple(full.shape) != tuple(spec.shape) or full.dtype != spec.torch_dtype:
        raise SpecMismatchError(f"{spec.name}: full tensor has shape {tuple(full.shape)} and dtype {full.dtype}, "
                                f"spec says {tuple(spec.shape)} and {spec.torch_dtype}")


def shard(full: torch.Tensor, spec: ParamSpec, tp_rank: int, degree: int) -> torch.Tensor:
    """The shard TP rank `tp_rank` of `degree` holds: a new contiguous tensor of shape spec.shard_shape(...).

    full: the checkpoint tensor, shape spec.shape, dtype spec.dtype (any device). Padding rows are zeros.
    """
    check_full(full, spec)
    if not spec.is_sharded:
        spec.check_degree(degree)
        return full.clone().contiguous()
    out = torch.zeros(spec.shard_shape(tp_rank, degree), dtype=full.dtype, device=full.device)
    pos = 0
    pads = spec.pad_ranges()
    for start, stop in spec.shard_ranges(tp_rank, degree):
        # Cut [start, stop) into data and padding: padding rows stay zero.
        real_stop = stop
        for ps, pe in pads:
            if ps < stop and start < pe:
                real_stop = min(real_stop, ps)
        if real_stop > start:
            src = full.narrow(spec.split_dim, spec.unpadded_position(start), real_stop - start)
            out.narrow(spec.split_dim, pos, real_stop - start).copy_(src)
        pos += stop - start
    return out
