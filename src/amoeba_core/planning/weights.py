"""Planning the weight part of a transformation: what each rank keeps, receives, sends and zero-fills."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

from ..config import TPConfig
from ..layout.overlap import shard_pieces
from ..layout.specs import ParamSpec

# How a rank obtains its new shard of one tensor.
SAME = "same"        # the old tensor is the new one (replicated, or same degree and TP rank)
VIEW = "view"        # a contiguous part of the old storage: returned as a view, nothing copied
COMPACT = "compact"  # every needed byte is local: moved within the old storage, then viewed
ALLOC = "alloc"      # receives bytes or grows: a new tensor is allocated, the old one released when done


@dataclass(frozen=True)
class LocalMove:
    """Retained stretch of split-dim elements: old shard [old_start, +length) -> new shard [new_start, +length)."""

    old_start: int
    new_start: int
    length: int


class Transfer(NamedTuple):
    """Split-dim elements [old_start, +length) of rank `src`'s old shard of tensor `tensor`, outer indices
    [outer_start, outer_stop), go to [new_start, +length) of rank `dst`'s new shard."""

    tensor: int
    src: int
    dst: int
    old_start: int
    new_start: int
    length: int
    outer_start: int
    outer_stop: int
    nbytes: int
    direct: bool = False  # one contiguous byte range in both shards: sent and received in place, never staged


TRANSFER_FIELDS = Transfer._fields


class Transfers:
    """Weight transfers as a table: an (N, 10) int64 array with Transfer's fields as columns, in round order.
    Columns are attributes (`table.dst` is an array); slicing gives a Transfers; iterating gives Transfer records.
    A table, not N objects, because a 64-rank plan has tens of thousands of transfers."""

    def __init__(self, data: np.ndarray = None):
        self.data = np.zeros((0, len(TRANSFER_FIELDS)), dtype=np.int64) if data is None else data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> "Transfers":
        if not isinstance(index, slice):
            raise TypeError("Transfers supports slices; iterate for records")
        return Transfers(self.data[index])

    def __iter__(self):
        for row in self.data.tolist():
            yield Transfer(*row[:-1], bool(row[-1]))

    def __getattr__(self, name: str) -> np.ndarray:
        if name in TRANSFER_FIELDS:
            return self.data[:, TRANSFER_FIELDS.index(name)]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"Transfers({len(self)} rows)"


@dataclass
class TensorPlan:
    """Plan of one parameter. Lengths are in elements of the split dim; row_bytes = bytes of one split-dim
    element for one outer index (inner * itemsize)."""

    index: int
    spec: ParamSpec
    old_len: int
    new_len: int
    outer: int
    row_bytes: int
    mode: Dict[int, str] = field(default_factory=dict)           # group rank -> SAME/VIEW/COMPACT/ALLOC
    keep: Dict[int, Tuple[LocalMove, ...]] = field(default_factory=dict)
    zero: Dict[int, Tuple[Tuple[int, int], ...]] = field(default_factory=dict)  # (new_start, length)

    @property
    def new_nbytes(self) -> int:
        return self.outer * self.new_len * self.row_bytes

    @property
    def old_nbytes(self) -> int:
        return self.outer * self.old_len * self.row_bytes


def weight_gain(specs, old_degree: int, new_degree: int) -> np.ndarray:
    """(old_degree, new_degree) int64: bytes of real (non-padding) data of new TP rank r' held by old TP rank r."""
    gain = np.zeros((old_degree, new_degree), dtype=np.int64)
    count: Dict[tuple, int] = {}  # tensors of one structure (every layer of a model) count once, times their number
    first: Dict[tuple, ParamSpec] = {}
    for spec in specs:
        if spec.is_sharded:
            key = (spec.sections, spec.outer, spec.inner, spec.itemsize)
            count[key] = count.get(key, 0) + 1
            first.setdefault(key, spec)
    for key, spec in first.items():
        elem = spec.outer * spec.inner * spec.itemsize * count[key]
        for rn in range(new_degree):
            for p in shard_pieces(spec, old_degree, rn, new_degree):
                if not p.padding:
                    for ro, _ in p.holders:
                        gain[ro, rn] += p.length * elem
    return gain


def plan_weights(specs, old: TPConfig, new: TPConfig):
    """Per-tensor plans and the unchunked transfers (a Transfers table in spec order).

    Tensors with the same structure (sections, outer, inner, itemsize: every layer of a model) share one template;
    where a piece has several holders (replicas), the u-th tensor of a template rotates its senders by u.
    """
    world = old.world_size
    by_old_tp: List[List[int]] = [[] for _ in range(old.degree)]
    for g in range(world):
        by_old_tp[old.slots[g][1]].append(g)
    tensors, templates, users = [], {}, {}
    for k, spec in enumerate(specs):
        if not spec.is_sharded:
            tp = TensorPlan(k, spec, 1, 1, 1, spec.inner * spec.itemsize)
            tp.mode = {g: SAME for g in range(world)}
            tensors.append(tp)
            continue
        key = (spec.sections, spec.outer, spec.inner, spec.itemsize)
        if key not in templates:
            templates[key] = _template(spec, old, new, by_old_tp)
            users[key] = []
        template = templates[key]
        users[key].append(k)
        tensors.append(TensorPlan(k, spec, template.old_len, template.new_len, spec.outer,
                                  spec.inner * spec.itemsize, template.mode, template.keep, template.zero))
    parts = []
    for key, template in templates.items():
        if not template.receives:
            continue
        ks = np.array(users[key], dtype=np.int64)                 # the template's tensors, u = 0, 1, ...
        dst, new_start, length, nbytes = (np.array([r[i] for r in template.receives], dtype=np.int64)
                                          for i in range(4))
        width = max(len(r[4]) for r in template.receives)
        cand_src = np.array([[c[0] for c in r[4]] + [0] * (width - len(r[4])) for r in template.receives])
        cand_off = np.array([[c[1] for c in r[4]] + [0] * (width - len(r[4])) for r in template.receives])
        cand_len = np.array([len(r[4]) for r in template.receives], dtype=np.int64)
        u = np.arange(ks.size)[:, None]                              # (tensors, receives)
        choice = u % cand_len[None, :]
        rows = np.arange(len(template.receives))[None, :]
        spec = specs[int(ks[0])]
        direct = (spec.outer == 1) | ((length == template.old_len) & (length == template.new_len))
        table = np.empty((ks.size, len(template.receives), len(TRANSFER_FIELDS)), dtype=np.int64)
        table[..., 0] = ks[:, None]
        table[..., 1] = cand_src[rows, choice]
        table[..., 2] = dst
        table[..., 3] = cand_off[rows, choice]
        table[..., 4] = new_start
        table[..., 5] = length
        table[..., 6] = 0
        table[..., 7] = spec.outer
        table[..., 8] = nbytes
        table[..., 9] = direct
        parts.append(table.reshape(-1, len(TRANSFER_FIELDS)))
    if not parts:
        return tensors, Transfers()
    data = np.concatenate(parts)
    return tensors, Transfers(data[np.argsort(data[:, 0], kind="stable")])


@dataclass
class _Template:
    old_len: int
    new_len: int
    mode: Dict[int, str]
    keep: Dict[int, Tuple[LocalMove, ...]]
    zero: Dict[int, Tuple[Tuple[int, int], ...]]
    receives: list  # (dst, new_start, length, nbytes, candidates [(src, src offset)] best first)


def _template(spec: ParamSpec, old: TPConfig, new: TPConfig, by_old_tp) -> _Template:
    old_len = spec.shard_shape(0, old.degree)[spec.split_dim]
    new_len = spec.shard_shape(0, new.degree)[spec.split_dim]
    row_bytes = spec.inner * spec.itemsize
    t = _Template(old_len, new_len, {}, {}, {}, [])
    probe = TensorPlan(-1, spec, old_len, new_len, spec.outer, row_bytes)
    load = np.zeros(old.world_size, dtype=np.int64)
    for g in range(old.world_size):
        r_old, r_new = old.slots[g][1], new.slots[g][1]
        keep, zero, receives = [], [], False
        for p in shard_pieces(spec, old.degree, r_new, new.degree):
            mine = [off for r, off in p.holders if r == r_old]
            if mine and keep and keep[-1].old_start + keep[-1].length == mine[0] \
                    and keep[-1].new_start + keep[-1].length == p.new_start:  # contiguous with the last: extend
                keep[-1] = LocalMove(keep[-1].old_start, keep[-1].new_start, keep[-1].length + p.length)
            elif mine:
                keep.append(LocalMove(mine[0], p.new_start, p.length))
            elif p.padding:
                zero.append((p.new_start, p.length))
            else:
                receives = True
                nbytes = spec.outer * p.length * row_bytes
                candidates = sorted(((h, off) for r, off in p.holders for h in by_old_tp[r]),
                                    key=lambda c: (load[c[0]], c[0]))
                load[candidates[0][0]] += nbytes
                t.receives.append((g, p.new_start, p.length, nbytes, candidates))
        t.keep[g], t.zero[g] = tuple(keep), tuple(zero)
        t.mode[g] = _mode(probe, keep, zero, receives)
    return t


def _mode(tp: TensorPlan, keep, zero, receives: bool) -> str:
    if receives or tp.new_len > tp.old_len:
        return ALLOC
    if not zero and len(keep) == 1 and keep[0].length == tp.new_len:
        if keep[0].old_start == 0 and tp.new_len == tp.old_len:
            return SAME
        if tp.outer == 1:
            return VIEW
    # In-place compaction is safe when every move goes to a lower or equal address, in increasing order.
    ordered = all(a.old_start + a.length <= b.old_start for a, b in zip(keep, keep[1:]))
    if ordered and all(m.new_start <= m.old_start for m in keep):
        return COMPACT
    return ALLOC
