"""Layout math: how each tensor kind is cut into TP shards (no communication, no state)."""
from .llama import llama_param_specs, model_dims
from .shard import real_segments, shard, unshard
from .specs import (COLUMN, KINDS, MERGED_COLUMN, QKV, REPLICATED, ROW, VOCAB, VOCAB_PADDING, ParamSpec, Section,
                    column, kv_heads, merged_column, qkv, replicated, row, vocab)
from .overlap import Piece, shard_pieces

__all__ = ["llama_param_specs", "model_dims", "shard", "unshard", "real_segments", "ParamSpec", "Section", "Piece", "shard_pieces", "KINDS",
           "REPLICATED", "COLUMN", "ROW", "MERGED_COLUMN", "QKV", "VOCAB", "VOCAB_PADDING", "replicated", "column",
           "row", "merged_column", "qkv", "kv_heads", "vocab"]
