"""What an engine hands to retp about its KV cache (KVCache, per rank) and the global view the planner uses
(KVRequest, identical on every rank after the ranks exchange their instances' block tables)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, SpecMismatchError
from .layout import KVLayout


@dataclass
class KVCache:
    """One rank's paged KV cache, as passed to retp.

    layout:      KVLayout (same on every rank)
    layers:      per layer, the rank's KV tensor in the layout's logical shape (a (k, v) pair for sglang); all
                 layers have the same number of blocks. Their storage is reused in place by retp.
    sequences:   the live sequences of this rank's instance: seq_id -> block table (list of block ids). Blocks
                 shared by several sequences (a common prefix) appear in several tables. Sequence ids must be
                 unique across the whole group. Every rank of an instance passes the same tables.
    destinations: optional seq_id -> new instance index (default: merges keep every sequence together; splits
                 balance blocks across the new instances carved out of the old one)
    new_block_tables: optional seq_id -> the new block table the caller wants (default: chosen by the library)
    """

    layout: KVLayout
    layers: List
    sequences: Dict[Hashable, Sequence[int]]
    destinations: Optional[Dict[Hashable, int]] = None
    new_block_tables: Optional[Dict[Hashable, Sequence[int]]] = None

    def buffers(self) -> List[List[torch.Tensor]]:
        """Per layer, the flat uint8 physical buffers."""
        if len(self.layers) != self.layout.num_layers:
            raise SpecMismatchError(f"KV cache has {len(self.layers)} layers, layout says {self.layout.num_layers}")
        return [self.layout.buffers(layer) for layer in self.layers]

    def num_blocks(self, degree: int) -> int:
        layer = self.layers[0]
        t = layer[0] if self.layout.engine == "sglang" else layer
        shape = tuple(t.shape)
        if self.layout.engine == "vllm_flash_attn":
            return shape[1]
        if self.layout.engine in ("vllm_flashinfer", "vllm_mla"):
            return shape[0]
        return shape[0] // self.layout.block_size

    def check(self, degree: int) -> None:
        """Raise SpecMismatchError unless every layer has the layout's shape, dtype and storage at `degree`."""
        n = self.num_blocks(degree)
        want = self.layout.logical_shape(n, degree)
        dt = getattr(torch, self.layout.dtype)
        for li, layer in enumerate(self.layers if len(self.layers) == self.layout.num_layers else []):
            for t in (layer if self.layout.engine == "sglang" else (layer,)):
                if tuple(t.shape) != want or t.dtype != dt:
                    raise SpecMismatchError(f"KV layer {li}: tensor has shape {tuple(t.shape)} and dtype {t.dtype}; "
                                            f"the layout at degree {degree} needs {want} and {dt}")
        self.buffers()

    def local_summary(self, degree: int) -> dict:
        """What this rank contributes to the global KVRequest (exchanged with all_gather_object)."""
        return {"layout": self.layout, "num_blocks": self.num_blocks(degree),
                "buffer_bytes": int(self.buffers()[0][0].numel()),
                "sequences": [(k, tuple(int(b) for b in v)) for k, v in self.sequences.items()],
                "destinations": dict(self.destinations or {}),
                "new_block_tables": {k: tuple(int(b) for b in v) for k, v in (self.new_block_tables or {}).items()}}


@dataclass(frozen=True)
class KVRequest:
    """Global KV description for the planner (pure data, identical on every rank).

    layout; num_blocks: blocks per rank at the old degree; buffer_bytes: bytes of each physical buffer;
    sequences: ((old_instance, seq_id, block table), ...); destinations: seq_id -> new instance (partial);
    new_block_tables: seq_id -> caller-chosen new table (partial).
    """

    layout: KVLayout
    num_blocks: int
    buffer_bytes: int
    sequences: Tuple[Tuple[int, Hashable, Tuple[int, ...]], ...]
    destinations: Dict[Hashable, int] = field(default_factory=dict)
    new_block_tables: Dict[Hashable, Tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_summaries(cls, summaries: Sequence[dict], instance_of_rank: Sequence[int]) -> "KVRequest":
        """Build from every rank's local_summary() (index = group rank); ranks of one instance must agree."""
        first = summaries[0]
        for r, s in enumerate(summaries):
            for key in ("layout", "num_blocks", "buffer_bytes"):
                if s[key] != first[key]:
                    raise ConfigError(f"KV {key} differs between ranks: rank 0 has {first[key]}, rank {r} has "
                                      f"{s[key]}")
        by_instance: Dict[int, dict] = {}
        for r, s in enumerate(summaries):
            inst = instance_of_rank[r]
            if inst in by_instance:
                ref = by_instance[inst]
                for key in ("sequences", "destinations", "new_block_tables"):
                    if s[key] != ref[key]:
                        raise ConfigError(f"ranks of instance {inst} pass different KV {key} (rank {r} differs)")
            else:
                by_instance[inst] = s
        seqs, dests, tables, seen = [], {}, {}, {}
        for inst in sorted(by_instance):
            s = by_instance[inst]
            for seq_id, table in s["sequences"]:
                if seq_id in seen:
                    raise ConfigError(f"sequence id {seq_id!r} appears in instances {seen[seq_id]} and {inst}; "
                                      f"ids must be unique across the group")
                seen[seq_id] = inst
                seqs.append((inst, seq_id, table))
            dests.update(s["destinations"])
            tables.update(s["new_block_tables"])
        return cls(first["layout"], first["num_blocks"], first["buffer_bytes"], tuple(seqs), dests, tables)


@dataclass
class KVResult:
    """This rank's KV cache after retp.

    layers: per layer, the new tensor(s): views of the same storage in the layout's shape at the new degree
    num_blocks: blocks per rank now; block_tables: seq_id -> new block table, for the sequences of this rank's new
    instance; destinations: seq_id -> new instance, for every sequence of the group.
    """

    layers: List
    num_blocks: int
    block_tables: Dict[Hashable, List[int]]
    destinations: Dict[Hashable, int]
