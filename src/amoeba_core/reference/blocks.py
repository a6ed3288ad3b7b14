"""The reference engine's block manager: one instance's KV blocks, its sequences' block tables and a prefix cache.

Prefix caching works like vLLM's automatic prefix caching, simplified: every full block of a prompt gets a content
hash chained over the prompt's tokens up to the end of that block (hash_prompt_blocks), and the index maps hash ->
block id. A new sequence whose prompt starts with indexed blocks shares them (reference counts) and computes only
the rest. A block whose last sequence finishes stays indexed and evictable (least recently released first) until
the free list runs dry. The index is what an engine hands to retp as KVCache(cached_blocks=...): after a merge or a
split, KVResult.cached_blocks is the new instance's index and the cached bytes have moved with it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Dict, Hashable, List, Optional, Sequence

from ..errors import CapacityError


def hash_prompt_blocks(tokens: Sequence[int], block_size: int) -> List[str]:
    """Content hash of every full block of `tokens`: hash k covers tokens [0, (k + 1) * block_size) (a chain, so
    equal hashes mean equal prefixes, hence equal K/V)."""
    out, h = [], hashlib.sha256()
    for k in range(len(tokens) // block_size):
        h.update(repr(list(tokens[k * block_size:(k + 1) * block_size])).encode())
        out.append(h.copy().hexdigest()[:32])
    return out


class BlockManager:
    """Blocks [reserved, num_blocks) of one instance (the same on every rank of it).

    tables: seq_id -> block table; index: content hash -> block (prefix cache); ref: block -> sequences using it;
    evictable: indexed blocks no sequence uses, least recently released first; free: the rest.
    """

    def __init__(self, num_blocks: int, block_size: int, reserved: int = 0, prefix_caching: bool = False,
                 tables: Optional[Dict[Hashable, List[int]]] = None, index: Optional[Dict[str, int]] = None):
        self.block_size, self.reserved, self.prefix_caching = block_size, reserved, prefix_caching
        self.hits_tokens = 0  # prompt tokens served from the prefix cache
        self.reset(num_blocks, tables or {}, index or {})

    def reset(self, num_blocks: int, tables: Dict[Hashable, List[int]], index: Dict[str, int]) -> None:
        """Adopt a new pool size, tables and prefix-cache index (after retp, or after a failed one)."""
        self.num_blocks = num_blocks
        self.tables = {s: list(t) for s, t in tables.items()}
        self.index = dict(index) if self.prefix_caching else {}
        self.hash_of = {b: h for h, b in self.index.items()}
        self.ref: Dict[int, int] = {}
        for table in self.tables.values():
            for b in table:
                self.ref[b] = self.ref.get(b, 0) + 1
        self.evictable = OrderedDict((b, None) for b in sorted(self.hash_of) if b not in self.ref)
        self.free = [b for b in range(self.reserved, num_blocks) if b not in self.ref and b not in self.hash_of]

    @property
    def capacity(self) -> int:
        return self.num_blocks - self.reserved

    def available(self) -> int:
        """Blocks a sequence could get now: free, or cached and evictable."""
        return len(self.free) + len(self.evictable)

    # ---- prefix cache ------------------------------------------------------------------------------------------
    def cached_prefix(self, tokens: Sequence[int]) -> List[int]:
        """Indexed blocks the prompt `tokens` starts with (at most (len - 1) // block_size: the last token is always
        computed, its logits pick the next token)."""
        if not self.prefix_caching:
            return []
        out = []
        for h in hash_prompt_blocks(tokens[:len(tokens) - 1], self.block_size):
            b = self.index.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def pinned_evictable(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` an admission would take off the evictable list."""
        return sum(1 for b in blocks if b in self.evictable)

    def register(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Index the full blocks of prompt `tokens` that sequence `seq_id` now holds (after its prefill)."""
        if not self.prefix_caching:
            return
        table = self.tables[seq_id]
        for h, b in zip(hash_prompt_blocks(tokens, self.block_size), table):
            if h not in self.index and b not in self.hash_of:
                self.index[h] = b
                self.hash_of[b] = h

    # ---- tables ------------------------------------------------------------------------------------------------
    def start(self, seq_id: Hashable, prefix: Sequence[int]) -> None:
        """A new table for `seq_id` that begins with the cached blocks `prefix`."""
        self.tables[seq_id] = []
        for b in prefix:
            self.evictable.pop(b, None)
            self.ref[b] = self.ref.get(b, 0) + 1
            self.tables[seq_id].append(b)
        self.hits_tokens += len(prefix) * self.block_size

    def grow(self, seq_id: Hashable, tokens: int, rank: int = 0) -> List[int]:
        """The table of `seq_id`, extended to hold `tokens` tokens (evicting cached blocks when nothing is free)."""
        table = self.tables.setdefault(seq_id, [])
        need = -(-tokens // self.block_size) - len(table)
        if need > self.available():
            raise CapacityError(f"rank {rank}: sequence {seq_id} needs {need} more KV blocks, {self.available()} "
                                f"free of {self.num_blocks}; raise num_blocks")
        for _ in range(max(0, need)):
            if not self.free:
                b, _ = self.evictable.popitem(last=False)
                del self.index[self.hash_of.pop(b)]
                self.free.append(b)
            b = self.free.pop(0)
            self.ref[b] = 1
            table.append(b)
        return table

    def release(self, seq_id: Hashable) -> None:
        """Sequence `seq_id` finished or was preempted: its blocks go back (indexed ones stay cached)."""
        for b in self.tables.pop(seq_id):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                del self.ref[b]
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
