"""Models, prompts and checks for the reference-engine tests (module level so they pickle)."""
import random

import torch

# hidden 64, 8 query heads of 8 dims; 4 KV heads: TP4 keeps one KV head per rank.
LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
             num_hidden_layers=2, vocab_size=300, rope_theta=10000.0, rms_norm_eps=1e-6)
# 2 KV heads: TP4 replicates each KV head on two ranks.
GQA2 = dict(LLAMA, num_key_value_heads=2)
# Qwen2-style: q/k/v biases, tied embeddings, another rope_theta.
QWEN2 = dict(LLAMA, model_type="qwen2", tie_word_embeddings=True, rope_theta=1_000_000.0)
# Llama with attention_bias: q/k/v and o_proj biases (o_proj's is added once per instance).
LLAMA_BIAS = dict(LLAMA, attention_bias=True)

WAVE = [(4, 1), (2, 2), (1, 4), (2, 2), (4, 1)]  # merges, then splits


def prompts(n=5, lengths=(3, 7, 12, 20, 5, 16, 9), vocab=300, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over a whole logits row set."""
    return float((a - b).abs().max() / b.abs().max())


def check_transitions(results, n_transitions):
    """Every rank recorded every transition and verified its weights and KV bit for bit."""
    for rank, r in enumerate(results):
        assert len(r["transitions"]) == n_transitions, rank
        for t in r["transitions"]:
            assert t["verified"], (rank, t["from"], t["to"], t["bad_weights"][:3], t["bad_kv"][:3])
