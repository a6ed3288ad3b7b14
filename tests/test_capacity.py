"""KV capacity per TP degree, with and without the memory handoff, against hand-computed figures."""
import pytest

from amoeba_core import llama_param_specs
from amoeba_core.capacity import (H100_80GB_MEMORY_BYTES, WeightsDoNotFitError, capacity_report, degree_capacity,
                                  kv_bytes_per_token_per_gpu, kv_tokens_for_pool, smallest_fitting_degree,
                                  weight_bytes_per_gpu)
from amoeba_core.errors import CapacityError, InvalidDegreeError
from amoeba_core.layout.kv import KVLayout

# Qwen2.5-32B (huggingface.co/Qwen/Qwen2.5-32B config.json)
QWEN32B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
           "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
           "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
            "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def qwen_layout(block_size=16, engine="vllm_flash_attn", reserved=0):
    return KVLayout(engine, "NHD", 64, 8, 128, block_size, "bfloat16", reserved_blocks=reserved)


def qwen32b_params_by_hand():
    """(sharded, replicated) parameter counts of Qwen2.5-32B, written out from the architecture."""
    h, inter, layers, vocab = 5120, 27648, 64, 152064
    qkv_rows = (40 + 2 * 8) * 128                      # q heads + k and v heads, head_dim 128
    per_layer = qkv_rows * h + qkv_rows + h * h + 2 * inter * h + inter * h   # qkv w+b, o, gate_up, down
    sharded = layers * per_layer + 2 * vocab * h       # + embed_tokens and lm_head (152064 = 2376 * 64: no padding)
    replicated = layers * 2 * h + h                    # two norms per layer + the final norm
    return sharded, replicated


def test_qwen32b_weights_and_kv_per_token_match_the_issue_figures():
    specs = llama_param_specs(QWEN32B)
    sharded, replicated = qwen32b_params_by_hand()
    assert weight_bytes_per_gpu(specs, 1) == 2 * (sharded + replicated) == 65_527_752_704   # "~65.5 GB at TP1"
    assert weight_bytes_per_gpu(specs, 4) == 2 * (sharded // 4 + replicated)
    layout = qwen_layout()
    assert kv_bytes_per_token_per_gpu(layout, 1) == 256 << 10                               # "256 KiB per token"
    assert kv_bytes_per_token_per_gpu(layout, 4) == 64 << 10
    assert kv_bytes_per_token_per_gpu(layout, 8) == 32 << 10


def test_issue10_worked_example_merge_4x1_to_1x4():
    """Issue 10: with ~9 GB of KV per GPU at TP1, 4xTP1 -> 1xTP4 holds ~0.14 M tokens without the handoff and
    ~0.9 M with the ~49 GB per GPU it frees handed to the pool (over 6x more)."""
    specs, layout = llama_param_specs(QWEN32B), qwen_layout()
    w1 = 65_527_752_704
    memory = int((w1 + 9e9) / 0.9) + 1                 # the memory that leaves 9 GB of pool at TP1, 90 % used
    tp1, tp4 = capacity_report(specs, layout, memory, 0.9, (1, 4))
    assert tp1.base_degree == 1 and tp1.kv_pool_bytes == pytest.approx(9e9, abs=2)
    assert tp4.freed_weight_bytes == w1 - weight_bytes_per_gpu(specs, 4) == pytest.approx(49.1e9, rel=1e-3)
    assert tp4.kv_tokens_per_instance_no_handoff == pytest.approx(0.137e6, rel=0.01)    # 36 GB / 256 KiB
    assert tp4.kv_tokens_per_instance == pytest.approx(0.887e6, rel=0.01)               # 4 x 58 GB / 256 KiB
    assert tp4.kv_tokens_per_instance / tp4.kv_tokens_per_instance_no_handoff > 6


@pytest.mark.parametrize("engine", ["vllm_flash_attn", "vllm_flashinfer", "sglang"])
def test_handoff_adds_the_freed_weight_bytes_as_tokens(engine):
    specs, layout = llama_param_specs(QWEN32B), qwen_layout(engine=engine)
    rows = capacity_report(specs, layout, H100_80GB_MEMORY_BYTES, 0.9)
    base = rows[0]
    assert [r.degree for r in rows] == [1, 2, 4, 8] and all(r.fits for r in rows)
    usable = int(H100_80GB_MEMORY_BYTES * 0.9)
    for r in rows:
        assert r.kv_pool_bytes == usable - r.weight_bytes
        assert r.kv_pool_bytes_no_handoff == base.kv_pool_bytes
        # without the handoff the same bytes hold d times the TP1 tokens (each rank keeps 1/d of the heads) ...
        assert abs(r.kv_tokens_per_instance_no_handoff - r.degree * base.kv_tokens_per_instance) <= r.degree * 16
        # ... and the handoff adds the freed weight bytes, at this degree's bytes per token (block rounding)
        extra = r.kv_tokens_per_instance - r.kv_tokens_per_instance_no_handoff
        assert abs(extra - r.freed_weight_bytes / r.kv_bytes_per_token) <= 2 * 16


def test_kv_heads_replicated_past_num_kv_heads_and_vocab_padding():
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True, "torch_dtype": "float32"}
    specs = llama_param_specs(cfg)
    layout = KVLayout("vllm_flash_attn", "HND", 3, 2, 8, 4, "float32")
    # 2 KV heads: at TP4 each rank holds one (replicated twice), the same bytes per token as at TP2
    assert kv_bytes_per_token_per_gpu(layout, 1) == 3 * 2 * 2 * 8 * 4
    assert kv_bytes_per_token_per_gpu(layout, 4) == kv_bytes_per_token_per_gpu(layout, 2) == 3 * 2 * 1 * 8 * 4
    # weights at TP4, by hand: vocab 100 padded to 128 -> 32 rows; qkv rows (8/4 q heads + 1 k + 1 v) * 8
    h, per_layer = 64, (2 + 1 + 1) * 8 * 64 + 64 * 16 + 2 * 24 * 64 + 64 * 24 + 2 * 64
    assert weight_bytes_per_gpu(specs, 4) == 4 * (32 * h + 3 * per_layer + h)
    with pytest.raises(InvalidDegreeError):
        weight_bytes_per_gpu(specs, 3)


def test_llama70b_does_not_fit_one_gpu():
    specs = llama_param_specs(LLAMA70B)
    layout = KVLayout("vllm_flash_attn", "NHD", 80, 8, 128, 16, "bfloat16")
    with pytest.raises(WeightsDoNotFitError, match="TP1") as err:
        degree_capacity(specs, layout, 1, H100_80GB_MEMORY_BYTES, 0.9)
    assert isinstance(err.value, CapacityError) and str(weight_bytes_per_gpu(specs, 1)) in str(err.value)
    rows = capacity_report(specs, layout, H100_80GB_MEMORY_BYTES, 0.9)
    assert [r.status for r in rows] == ["weights_do_not_fit", "ok", "ok", "ok"]
    assert rows[0].kv_tokens_per_instance == 0 and rows[0].kv_tokens_per_instance_no_handoff is None
    assert all(r.base_degree == 2 for r in rows[1:]) and smallest_fitting_degree(specs, layout,
                                                                                 H100_80GB_MEMORY_BYTES, 0.9) == 2
    assert rows[1].kv_tokens_per_instance == rows[1].kv_tokens_per_instance_no_handoff
    # an explicit base above a degree: that degree's weights would not fit beside the pool without the handoff
    tp2 = degree_capacity(specs, layout, 2, H100_80GB_MEMORY_BYTES, 0.9, base_degree=4)
    assert tp2.kv_tokens_per_instance_no_handoff is None and tp2.freed_weight_bytes < 0


def test_invalid_degree_and_reserved_blocks():
    specs = llama_param_specs(QWEN32B)
    rows = capacity_report(specs, qwen_layout(), H100_80GB_MEMORY_BYTES, 0.9, (1, 3))
    assert rows[1].status == "invalid_degree"                 # 40 query heads do not split over 3 ranks
    plain = capacity_report(specs, qwen_layout(), H100_80GB_MEMORY_BYTES, 0.9, (1,))[0]
    reserved = capacity_report(specs, qwen_layout(reserved=1), H100_80GB_MEMORY_BYTES, 0.9, (1,))[0]
    assert plain.kv_tokens_per_instance - reserved.kv_tokens_per_instance == 16
    assert kv_tokens_for_pool(qwen_layout(), 0, 1) == 0
    with pytest.raises(Exception, match="utilisation"):
        capacity_report(specs, qwen_layout(), H100_80GB_MEMORY_BYTES, 1.5)
