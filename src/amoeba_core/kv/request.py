"""What an engine hands to retp about its KV cache (KVCache, per rank) and the global view the planner uses
(KVRequest, identical on every rank after the ranks exchange their instances' block tables)."""
from __future__ import annotations

import functools
import hashlib
import operator
import pickle
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, SpecMismatchError
from ..layout.kv import KVLayout
from .destinations import normalize


@dataclass
class KVCache:
    """One rank's paged KV cache, as passed to retp.

    layout:      KVLayout (same on every rank)
    The pool's memory, in one of three forms:
      layers:    per layer, the rank's KV tensor in the layout's logical shape (a (k, v) pair for sglang); all
                 layers have the same number of blocks. retp reuses their storage in place, but only the bytes
                 they view: when a degree change leaves a tail of the buffers unused (the block count is rounded
                 down), pass the next call `buffers=KVResult.buffers` to have every byte again
      buffers:   per layer the raw physical buffers (layout.num_buffers flat uint8 tensors of equal size), with
                 num_blocks the block count the engine's views use now (default: all the buffers hold)
      pool:      an amoeba_core.elastic.ElasticKVPool: retp resizes it, handing the weight memory a merge frees
                 to the KV cache and taking it back in a split (README "Elastic KV memory"); the caller must not
                 hold views of the pool beyond what the new size keeps
    sequences:   the live sequences of this rank's instance: seq_id -> block table (list of block ids). Blocks
                 shared by several sequences (a common prefix) appear in several tables. Sequence ids must be
                 unique across the whole group. One rank per instance is enough (its scheduler's rank): the others
                 pass sequences=None and receive the tables through retp; ranks that do pass them must pass the
                 same tables (and the same destinations, new tables and cached blocks).
    destinations: optional seq_id -> destination: a new instance index (a label: what shares a label ends in one
                 instance, the placement picks its ranks), or a constraint (kv.destinations: WithSequence,
                 OnRanks, WithRanksOf) the placement honours. Default: merges keep every sequence of an old
                 instance together; splits balance blocks across the new instances carved out of the old one
    new_block_tables: optional seq_id -> the new block table the caller wants (default: chosen by the library)
    cached_blocks: optional key -> block id: blocks that must survive without a sequence (a prefix cache; key e.g.
                 the block's content hash, unique within the instance). A cached block moves once per new instance
                 it goes to, like a shared prefix block. Default destination: every new instance that a live
                 sequence holding the block goes to (no extra move); a block no live sequence holds goes, with all
                 such blocks of its old instance (prefix chains stay together), to the new instance carved out of
                 the old one that holds the fewest blocks. When two old instances bring the same key into one new
                 instance, one copy survives (one a live sequence moves there anyway, else the lowest old
                 instance's). KVResult.cached_blocks / block_map give the new ids.
    cached_destinations: optional key -> destination of a cached block (as in destinations; WithSequence(x)
                 keeps it with sequence x)
    """

    layout: KVLayout
    layers: Optional[List] = None
    sequences: Optional[Dict[Hashable, Sequence[int]]] = field(default_factory=dict)
    destinations: Optional[Dict[Hashable, object]] = None
    new_block_tables: Optional[Dict[Hashable, Sequence[int]]] = None
    buffers: Optional[List[List[torch.Tensor]]] = None
    num_blocks: Optional[int] = None
    pool: Optional[object] = None
    cached_blocks: Optional[Dict[Hashable, int]] = None
    cached_destinations: Optional[Dict[Hashable, object]] = None

    @property
    def provides_tables(self) -> bool:
        """Does this rank pass its instance's tables (sequences not None)?"""
        return self.sequences is not None

    def _form(self) -> str:
        given = [name for name in ("layers", "buffers", "pool") if getattr(self, name) is not None]
        if len(given) != 1:
            raise SpecMismatchError(f"give the KV cache's memory as exactly one of layers, buffers or pool; got "
                                    f"{given or 'none'}")
        return given[0]

    def physical_buffers(self) -> List[List[torch.Tensor]]:
        """Per layer, the flat uint8 physical buffers retp relays in place."""
        form = self._form()
        if form == "pool":
            return self.pool.buffers()
        parts = self.layers if form == "layers" else self.buffers
        if len(parts) != self.layout.num_layers:
            raise SpecMismatchError(f"KV cache has {len(parts)} layers, layout says {self.layout.num_layers}")
        if form == "layers":
            return [self.layout.buffers(layer) for layer in self.layers]
        return [list(bufs) for bufs in self.buffers]

    def _tensors(self, layer) -> list:
        return list(layer) if self.layout.engine == "sglang" else [layer]

    def current_blocks(self, degree: int) -> int:
        """Blocks per rank the cache holds now, at its current degree."""
        if self.num_blocks is not None:
            return int(self.num_blocks)
        if self._form() != "layers":
            return self.layout.num_blocks_for(int(self.physical_buffers()[0][0].numel()), degree)
        if not self.layers:
            raise SpecMismatchError(f"KV cache has no layers, layout says {self.layout.num_layers}")
        first = self._tensors(self.layers[0])[0]
        shape = tuple(getattr(first, "shape", ()))
        if len(shape) != len(self.layout.logical_shape(1, degree)):
            raise SpecMismatchError(f"KV layer 0: a tensor of shape {shape} is not a {self.layout.engine} pool "
                                    f"(one block at degree {degree} is {self.layout.logical_shape(1, degree)})")
        if self.layout.engine == "vllm_flash_attn":
            return shape[1]
        if self.layout.engine in ("vllm_flashinfer", "vllm_mla"):
            return shape[0]
        return shape[0] // self.layout.block_size

    @property
    def device(self) -> torch.device:
        if self._form() == "pool":
            return torch.device(self.pool.device)
        return self.physical_buffers()[0][0].device

    def check(self, degree: int) -> None:
        """Raise SpecMismatchError unless the memory has the layout's shape, dtype and storage at `degree`, all on
        one device; ConfigError for a malformed block table (an id repeated within one table)."""
        form = self._form()
        if form == "layers":
            if len(self.layers) != self.layout.num_layers:
                raise SpecMismatchError(f"KV cache has {len(self.layers)} layers, layout says "
                                        f"{self.layout.num_layers}")
            want = self.layout.logical_shape(self.current_blocks(degree), degree)
            dt = getattr(torch, self.layout.dtype)
            device = self.device
            for li, layer in enumerate(self.layers):
                tensors = self._tensors(layer)
                if len(tensors) != self.layout.num_buffers:
                    raise SpecMismatchError(f"KV layer {li}: {self.layout.engine} layers hold "
                                            f"{self.layout.num_buffers} tensor(s), got {len(tensors)}")
                for t in tensors:
                    if not isinstance(t, torch.Tensor):
                        raise SpecMismatchError(f"KV layer {li}: expected a torch.Tensor, got {type(t).__name__}")
                    if tuple(t.shape) != want or t.dtype != dt:
                        raise SpecMismatchError(f"KV layer {li}: tensor has shape {tuple(t.shape)} and dtype "
                                                f"{t.dtype}; the layout at degree {degree} needs {want} and {dt}")
                    if t.device != device:
                        raise SpecMismatchError(f"KV layer {li}: tensor is on {t.device}, layer 0 is on {device}")
        buffers = self.physical_buffers()
        size, device = buffers[0][0].numel(), buffers[0][0].device
        for li, bufs in enumerate(buffers):
            if len(bufs) != self.layout.num_buffers:
                raise SpecMismatchError(f"KV layer {li}: {self.layout.engine} needs {self.layout.num_buffers} "
                                        f"buffer(s) per layer, got {len(bufs)}")
            for b in bufs:
                if b.dtype != torch.uint8 or b.dim() != 1 or not b.is_contiguous():
                    raise SpecMismatchError(f"KV layer {li}: buffers must be contiguous 1-D uint8 tensors, got "
                                            f"{b.dtype} of shape {tuple(b.shape)} and strides {b.stride()}")
                if b.numel() != size or b.device != device:
                    raise SpecMismatchError(f"KV layer {li}: a buffer of {b.numel()} bytes on {b.device}; layer 0's "
                                            f"first is {size} bytes on {device}")
        blocks, capacity = self.current_blocks(degree), self.layout.num_blocks_for(size, degree)
        if not 0 <= blocks <= capacity:
            raise SpecMismatchError(f"KV cache: num_blocks {blocks} at degree {degree}, but its buffers of {size} "
                                    f"bytes hold {capacity}")
        if not self.provides_tables:
            given = [name for name in ("destinations", "new_block_tables", "cached_blocks", "cached_destinations")
                     if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"this rank passes {given} but sequences=None: give an instance's tables, "
                                  f"destinations and cached blocks together, on the rank(s) that hold them")
            return
        for seq_id, table in self.sequences.items():
            ids = [int(b) for b in table]
            if len(set(ids)) != len(ids):
                dup = sorted({b for b in ids if ids.count(b) > 1})
                raise ConfigError(f"sequence {seq_id!r}: block table {ids[:16]}{'...' if len(ids) > 16 else ''} "
                                  f"holds block ids {dup[:5]} more than once")
        unknown = sorted(set(self.cached_destinations or {}) - set(self.cached_blocks or {}), key=repr)
        if unknown:
            raise ConfigError(f"cached_destinations names keys {unknown[:5]} that are not in cached_blocks")

    def local_summary(self, degree: int) -> dict:
        """What this rank contributes to the global KVRequest (exchanged through the control path): the pool's
        geometry, and (if it provides them) its instance's tables with their digest. "tables" and "tables_digest"
        are None on a rank that passes sequences=None; a rank that does provide them may drop "tables" before
        publishing when another rank of its instance sends them: the digest still proves they agree."""
        tables = digest = None
        if self.provides_tables:
            tables = {"sequences": [(k, tuple(int(b) for b in v)) for k, v in self.sequences.items()],
                      "destinations": {k: normalize(v, f"sequence {k!r}")
                                       for k, v in (self.destinations or {}).items()},
                      "new_block_tables": {k: tuple(int(b) for b in v)
                                           for k, v in (self.new_block_tables or {}).items()},
                      "cached_blocks": [(k, _block_id(v, k)) for k, v in (self.cached_blocks or {}).items()],
                      "cached_destinations": {k: normalize(v, f"cached block {k!r}")
                                              for k, v in (self.cached_destinations or {}).items()}}
            by_key = lambda kv: repr(kv[0])  # noqa: E731 - keys of any hashable type, rendered the same everywhere
            canonical = [sorted(tables[k], key=by_key) for k in ("sequences", "cached_blocks")] + \
                        [sorted(tables[k].items(), key=by_key)
                         for k in ("destinations", "new_block_tables", "cached_destinations")]
            digest = hashlib.sha256(pickle.dumps(canonical)).hexdigest()
        return {"layout": self.layout, "num_blocks": self.current_blocks(degree),
                "buffer_bytes": int(self.physical_buffers()[0][0].numel()),
                "tables_digest": digest, "tables": tables}


def _block_id(value, key) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"cached block {key!r}: block id {value!r} is not an integer") from None


@dataclass(frozen=True)
class KVRequest:
    """Global KV description for the planner (pure data, identical on every rank).

    layout; num_blocks: blocks per rank at the old degree; buffer_bytes: bytes of each physical buffer;
    sequences: ((old_instance, seq_id, block table), ...); destinations: seq_id -> destination (partial; an int
    label or a kv.destinations constraint); new_block_tables: seq_id -> caller-chosen new table (partial);
    new_buffer_bytes: the buffers' bytes when the KV cache moves at the new degree (an elastic pool resized
    around the move; None: buffer_bytes); cached: ((old_instance, key, block id), ...) blocks that survive without
    a sequence; cached_destinations: (old_instance, key) -> destination (partial).
    """

    layout: KVLayout
    num_blocks: int
    buffer_bytes: int
    sequences: Tuple[Tuple[int, Hashable, Tuple[int, ...]], ...]
    destinations: Dict[Hashable, object] = field(default_factory=dict)
    new_block_tables: Dict[Hashable, Tuple[int, ...]] = field(default_factory=dict)
    new_buffer_bytes: Optional[int] = None
    cached: Tuple[Tuple[int, Hashable, int], ...] = ()
    cached_destinations: Dict[Tuple[int, Hashable], object] = field(default_factory=dict)

    @staticmethod
    def table_sources(summaries: Sequence[dict], instance_of_rank: Sequence[int]) -> Dict[int, List[int]]:
        """instance -> the group ranks that provide its tables (a digest), in rank order."""
        out: Dict[int, List[int]] = {inst: [] for inst in instance_of_rank}
        for r, s in enumerate(summaries):
            if s is not None and s.get("tables_digest") is not None:
                out[instance_of_rank[r]].append(r)
        return out

    @classmethod
    def from_summaries(cls, summaries: Sequence[dict], instance_of_rank: Sequence[int]) -> "KVRequest":
        """Build from every rank's local_summary() (index = group rank). Every instance needs at least one rank
        that provides its tables; ranks that provide them must agree (their digests are compared; the tables
        themselves are taken from the first rank that sent them)."""
        first = summaries[0]
        for r, s in enumerate(summaries):
            for key in ("layout", "num_blocks", "buffer_bytes"):
                if s[key] != first[key]:
                    raise ConfigError(f"KV {key} differs between ranks: rank 0 has {first[key]}, rank {r} has "
                                      f"{s[key]}")
        sources = cls.table_sources(summaries, instance_of_rank)
        nobody = sorted(inst for inst, ranks in sources.items() if not ranks)
        if nobody:
            ranks = [[r for r, i in enumerate(instance_of_rank) if i == inst] for inst in nobody[:3]]
            raise ConfigError(f"no rank of instances {nobody} passes its KV tables (group ranks {ranks}...): pass "
                              f"KVCache(sequences=...) on at least one rank of every instance (sequences={{}} when "
                              f"it holds none), sequences=None on the others")
        by_instance: Dict[int, dict] = {}
        for inst, ranks in sorted(sources.items()):
            ref = ranks[0]
            for r in ranks[1:]:
                if summaries[r]["tables_digest"] != summaries[ref]["tables_digest"]:
                    raise ConfigError(f"ranks of instance {inst} pass different KV sequences, destinations, new "
                                      f"block tables or cached blocks (rank {r} differs from rank {ref})")
            sent = [summaries[r]["tables"] for r in ranks if summaries[r].get("tables") is not None]
            if not sent:
                raise ConfigError(f"no rank of instance {inst} sent its KV tables (providers: ranks {ranks})")
            by_instance[inst] = sent[0]
        seqs, dests, tables, seen, given_by = [], {}, {}, {}, {}
        cached, cached_dests = [], {}
        for inst in sorted(by_instance):
            s = by_instance[inst]
            for seq_id, table in s["sequences"]:
                if seq_id in seen:
                    raise ConfigError(f"sequence id {seq_id!r} appears in instances {seen[seq_id]} and {inst}; "
                                      f"ids must be unique across the group")
                seen[seq_id] = inst
                seqs.append((inst, seq_id, table))
            for key, mine, out in (("destination", s["destinations"], dests),
                                   ("new block table", s["new_block_tables"], tables)):
                for seq_id, value in mine.items():
                    if seq_id in out and out[seq_id] != value:
                        raise ConfigError(f"sequence {seq_id!r}: instances {given_by[key, seq_id]} and {inst} give "
                                          f"different {key}s ({out[seq_id]} and {value})")
                    out[seq_id] = value
                    given_by.setdefault((key, seq_id), inst)
            cached += [(inst, key, block) for key, block in s.get("cached_blocks", ())]
            cached_dests.update(((inst, key), d) for key, d in s.get("cached_destinations", {}).items())
        return cls(first["layout"], first["num_blocks"], first["buffer_bytes"], tuple(seqs), dests, tables,
                   cached=tuple(cached), cached_destinations=cached_dests)


@dataclass
class KVResult:
    """This rank's KV cache after retp.

    layers: per layer, the new tensor(s): views of the same storage in the layout's shape at the new degree
    buffers: per layer the physical buffers (all their bytes: pass them, with num_blocks, to the next retp)
    num_blocks: blocks per rank now; block_tables: seq_id -> new block table, for the sequences of this rank's new
    instance; destinations: seq_id -> new instance, for every sequence of the group.
    cached_blocks: key -> new block id of every cached block (KVCache.cached_blocks) that this rank's new instance
    holds now: the new instance's prefix-cache index. block_map: old instance -> {old block id: new block id} for
    every block (of a sequence or cached) that this rank's new instance holds now, to rewrite any other per-block
    state the engine keeps.
    capacity: old_blocks, new_blocks (per rank), no_handoff_blocks (what the same bytes hold at the new degree),
    tokens per instance for each ((blocks - reserved) * block_size), old/new buffer bytes and the bytes mapped or
    unmapped per rank (elastic pools)
    """

    layers: List
    num_blocks: int
    block_tables: Dict[Hashable, List[int]]
    destinations: Dict[Hashable, int]
    buffers: List[List[torch.Tensor]] = field(default_factory=list)
    capacity: Dict[str, int] = field(default_factory=dict)
    cached_blocks: Dict[Hashable, int] = field(default_factory=dict)
    moves: Optional[Tuple[object, int]] = field(default=None, repr=False)  # (KVPlan, new instance) for block_map

    @functools.cached_property
    def block_map(self) -> Dict[int, Dict[int, int]]:
        """old instance -> {old block id: new block id} (built on first use: one entry per block moved here)."""
        if self.moves is None:
            return {}
        kv_plan, instance = self.moves
        return kv_plan.block_map(instance)
