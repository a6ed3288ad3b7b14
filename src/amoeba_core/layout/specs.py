"""How each parameter of a model is sharded across TP ranks (vLLM conventions, ../shared/reference/conventions.md).

A sharded parameter is split along one dimension, `split_dim`. Along that dimension the full tensor is a
concatenation of *sections* (QKV has three: q, k, v; gate_up has two; most have one). Every rank's shard is the
concatenation, in section order, of its slice of each section. A section is cut only at multiples of its `unit`
(a head, a quantization block), so a shard never splits a unit.

Section kinds:
  "split"     units [r*n/t, (r+1)*n/t) of n units go to TP rank r of t; t must divide n.
  "kv_heads"  like "split" while t <= n; when t > n (t must be a multiple of n) every rank holds one unit,
              unit r // (t/n): each KV head is replicated on t/n consecutive ranks.
A section may be padded (vocab-parallel tables: rows padded with zeros to a multiple of 64, independent of t).
A section may carry a quantization `block` (block-quantized FP8: 128 rows or columns share one scale): a degree
whose shard boundaries inside the section are not multiples of the block is invalid (a shard never cuts a block);
only the section's end may close a partial last block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Tuple

import torch

from ..errors import InvalidDegreeError, SpecMismatchError

REPLICATED = "replicated"
COLUMN = "column"              # output dim split, bias split the same way
ROW = "row"                    # input dim split (last dim); bias kept whole (a replicated spec)
MERGED_COLUMN = "merged_column"  # [gate; up]: each sub-matrix split separately, then stacked
QKV = "qkv"                    # [q; k; v] with GQA, KV heads replicated when degree > num_kv_heads
VOCAB = "vocab"                # vocab-parallel embedding / LM head, vocabulary padded to a multiple of 64
KINDS = (REPLICATED, COLUMN, ROW, MERGED_COLUMN, QKV, VOCAB)

VOCAB_PADDING = 64


@dataclass(frozen=True)
class Section:
    """A stretch of the split dimension. `size` is in elements of that dimension, `padded_size` >= size."""

    name: str
    size: int
    unit: int = 1
    kind: str = "split"  # "split" or "kv_heads"
    padded_size: Optional[int] = None
    block: int = 1       # quantization block: shard boundaries inside the section must be multiples of it

    @property
    def full_size(self) -> int:
        return self.padded_size if self.padded_size is not None else self.size

    @property
    def num_units(self) -> int:
        return self.full_size // self.unit


@dataclass(frozen=True)
class ParamSpec:
    """One model parameter: full (checkpoint) shape, dtype and how it is sharded.

    name:      parameter name (HF or vLLM-fused, see llama_param_specs)
    shape:     full shape as stored in the checkpoint (unpadded)
    dtype:     torch dtype name, e.g. "bfloat16"
    kind:      one of KINDS (documentation and checks; the sections carry the math)
    split_dim: dimension that is split (None for replicated)
    sections:  sections of the split dimension, in order; their sizes add up to shape[split_dim]
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    kind: str
    split_dim: Optional[int] = None
    sections: Tuple[Section, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpecMismatchError(f"{self.name}: unknown kind {self.kind!r}, expected one of {KINDS}")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise SpecMismatchError(f"{self.name}: unknown dtype {self.dtype!r}")
        if self.kind == REPLICATED:
            if self.split_dim is not None or self.sections:
                raise SpecMismatchError(f"{self.name}: a replicated spec has no split_dim or sections")
            return
        if self.split_dim is None or not 0 <= self.split_dim < len(self.shape):
            raise SpecMismatchError(f"{self.name}: split_dim {self.split_dim} is not a dim of shape {self.shape}")
        total = sum(s.size for s in self.sections)
        if total != self.shape[self.split_dim]:
            raise SpecMismatchError(f"{self.name}: sections {[s.size for s in self.sections]} add up to {total}, "
                                    f"but shape[{self.split_dim}] = {self.shape[self.split_dim]}")
        for s in self.sections:
            if s.full_size % s.unit or s.full_size < s.size:
                raise SpecMismatchError(f"{self.name}: section {s.name} of {s.full_size} elements is not a "
                                        f"multiple of its unit {s.unit} (or smaller than its size {s.size})")
            if s.block < 1:
                raise SpecMismatchError(f"{self.name}: section {s.name} has quantization block {s.block} < 1")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def is_sharded(self) -> bool:
        return self.kind != REPLICATED

    @cached_property
    def outer(self) -> int:
        """Product of the dims before split_dim (1 when replicated)."""
        n = 1
        for d in self.shape[: self.split_dim or 0]:
            n *= d
        return n

    @cached_property
    def inner(self) -> int:
        """Product of the dims after split_dim (all elements when replicated)."""
        start = 0 if self.split_dim is None else self.split_dim + 1
        n = 1
        for d in self.shape[start:]:
            n *= d
        return n

    @property
    def padded_split_size(self) -> int:
        return sum(s.full_size for s in self.sections)

    def check_degree(self, degree: int) -> None:
        """Raise InvalidDegreeError unless every section can be split over `degree` ranks."""
        for s in self.sections:
            n = s.num_units
            if s.kind == "kv_heads" and degree > n:
                if degree % n:
                    raise InvalidDegreeError(
                        f"{self.name}: TP degree {degree} exceeds the {n} KV heads but is not a multiple of it")
            elif n % degree:
                what = f"{n} units of {s.unit}" if s.unit > 1 else f"{n} elements"
                raise InvalidDegreeError(
                    f"{self.name}: TP degree {degree} does not divide section {s.name!r} ({what})")
            if s.block > 1 and degree > 1:
                _check_blocks(self.name, s, degree)

    def shard_ranges(self, tp_rank: int, degree: int) -> list:
        """[(start, stop)] along the padded split dim, in shard order, that TP rank `tp_rank` of `degree` holds.

        Coordinates are in elements of the split dim of the full tensor with every section padded; positions
        >= a section's unpadded size are padding rows (zeros in every shard).
        """
        self.check_degree(degree)
        if not 0 <= tp_rank < degree:
            raise InvalidDegreeError(f"{self.name}: TP rank {tp_rank} is outside degree {degree}")
        return section_ranges(self.sections, tp_rank, degree)

    def pad_ranges(self) -> list:
        """[(start, stop)] of padding positions along the padded split dim."""
        return section_pads(self.sections)

    def unpadded_position(self, padded: int) -> int:
        """Map a padded split-dim coordinate that is not padding to the coordinate in the checkpoint tensor."""
        base_p = base_u = 0
        for s in self.sections:
            if padded < base_p + s.full_size:
                return base_u + (padded - base_p)
            base_p += s.full_size
            base_u += s.size
        raise IndexError(padded)

    def shard_shape(self, tp_rank: int, degree: int) -> Tuple[int, ...]:
        if not self.is_sharded:
            return tuple(self.shape)
        n = sum(b - a for a, b in self.shard_ranges(tp_rank, degree))
        shape = list(self.shape)
        shape[self.split_dim] = n
        return tuple(shape)

    def signature(self) -> str:
        """Canonical text used in plan digests."""
        secs = ",".join(f"{s.name}:{s.size}/{s.unit}/{s.kind}/{s.full_size}/{s.block}" for s in self.sections)
        return f"{self.name}|{self.shape}|{self.dtype}|{self.kind}|{self.split_dim}|{secs}"


def replicated(name: str, shape, dtype: str) -> ParamSpec:
    return ParamSpec(name, tuple(shape), dtype, REPLICATED)


def column(name: str, shape, dtype: str, unit: int = 1) -> ParamSpec:
    return ParamSpec(name, tuple(shape), dtype, COLUMN, 0, (Section("out", shape[0], unit),))


def row(name: str, shape, dtype: str, unit: int = 1) -> ParamSpec:
    dim = len(shape) - 1
    return ParamSpec(name, tuple(shape), dtype, ROW, dim, (Section("in", shape[dim], unit),))


def merged_column(name: str, shape, dtype: str, sizes, names=None, unit: int = 1) -> ParamSpec:
    names = names or [f"part{i}" for i in range(len(sizes))]
    return ParamSpec(name, tuple(shape), dtype, MERGED_COLUMN, 0,
                     tuple(Section(n, s, unit) for n, s in zip(names, sizes)))


def qkv(name: str, shape, dtype: str, num_heads: int, num_kv_heads: int, head_dim: int) -> ParamSpec:
    return ParamSpec(name, tuple(shape), dtype, QKV, 0, (
        Section("q", num_heads * head_dim, head_dim),
        Section("k", num_kv_heads * head_dim, head_dim, "kv_heads"),
        Section("v", num_kv_heads * head_dim, head_dim, "kv_heads"),
    ))


def kv_heads(name: str, shape, dtype: str, num_kv_heads: int, head_dim: int) -> ParamSpec:
    """An unfused k_proj / v_proj (weight or bias): column-parallel over KV heads, replicated past num_kv_heads."""
    return ParamSpec(name, tuple(shape), dtype, COLUMN, 0,
                     (Section("kv", num_kv_heads * head_dim, head_dim, "kv_heads"),))


def vocab(name: str, shape, dtype: str, padding: int = VOCAB_PADDING) -> ParamSpec:
    v = shape[0]
    padded = -(-v // padding) * padding
    return ParamSpec(name, tuple(shape), dtype, VOCAB, 0, (Section("vocab", v, 1, "split", padded),))


def section_ranges(sections, tp_rank: int, degree: int) -> list:
    """ParamSpec.shard_ranges without the checks (the degree must be valid for the sections)."""
    out, base = [], 0
    for s in sections:
        n = s.num_units
        if s.kind == "kv_heads" and degree > n:
            first, count = tp_rank // (degree // n), 1
        else:
            first, count = tp_rank * (n // degree), n // degree
        out.append((base + first * s.unit, base + (first + count) * s.unit))
        base += s.full_size
    return out


def _check_blocks(name: str, s: Section, degree: int) -> None:
    """Raise InvalidDegreeError if a shard boundary at `degree` falls inside a quantization block of section s."""
    for r in range(degree):
        start, stop = section_ranges((s,), r, degree)[0]
        for x in (start, stop):
            if x % s.block and x != s.size:
                raise InvalidDegreeError(
                    f"{name}: TP degree {degree} would cut a quantization block of {s.block} elements in section "
                    f"{s.name!r} ({s.size} elements): TP rank {r} holds [{start}, {stop})")


def section_pads(sections) -> list:
    """[(start, stop)] of padding positions along the padded split dim."""
    out, base = [], 0
    for s in sections:
        if s.full_size > s.size:
            out.append((base + s.size, base + s.full_size))
        base += s.full_size
    return out
