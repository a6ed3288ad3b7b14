"""Paged KV cache: layouts, the per-rank cache handed to retp, destinations, planning and in-place execution."""
from ..layout.kv import ENGINES, ORDERS, KVLayout
from .destinations import OnRanks, WithRanksOf, WithSequence
from .request import KVCache, KVRequest, KVResult

__all__ = ["KVLayout", "KVCache", "KVRequest", "KVResult", "ENGINES", "ORDERS", "WithSequence", "OnRanks",
           "WithRanksOf"]
