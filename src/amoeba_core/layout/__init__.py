"""Layout math: how each tensor kind is cut into TP shards (no communication, no state)."""
from .families import MODEL_TYPES, model_param_specs
from .llama import llama_param_specs, model_dims
from .mla import mla_param_specs
from .moe import moe_param_specs
from .quant import fp8_block_specs
from .qwen3 import qwen3_param_specs
from .shard import real_segments, shard, unshard
from .specs import (COLUMN, KINDS, MERGED_COLUMN, QKV, REPLICATED, ROW, VOCAB, VOCAB_PADDING, ParamSpec, Section,
                    column, kv_heads, merged_column, qkv, replicated, row, vocab)
from .overlap import Piece, shard_pieces

__all__ = ["llama_param_specs", "model_dims", "shard", "unshard", "real_segments", "ParamSpec", "Section", "Piece", "shard_pieces", "KINDS",
           "REPLICATED", "COLUMN", "ROW", "MERGED_COLUMN", "QKV", "VOCAB", "VOCAB_PADDING", "replicated", "column",
           "row", "merged_column", "qkv", "kv_heads", "vocab", "model_param_specs", "MODEL_TYPES",
           "qwen3_param_specs", "moe_param_specs", "mla_param_specs", "fp8_block_specs"]
