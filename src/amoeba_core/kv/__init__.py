"""Paged KV cache: layouts, the per-rank cache handed to retp, planning and in-place execution."""
from ..layout.kv import ENGINES, ORDERS, KVLayout
from .request import KVCache, KVRequest, KVResult

__all__ = ["KVLayout", "KVCache", "KVRequest", "KVResult", "ENGINES", "ORDERS"]
