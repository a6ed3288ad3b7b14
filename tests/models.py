"""Small model configs used across tests (HF-style dicts)."""

# GQA: 8 query heads, 2 KV heads -> degrees 4 and 8 replicate KV heads; vocab 1000 is not a multiple of 64.
GQA = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
           num_hidden_layers=2, vocab_size=1000)
# Qwen2-style: q/k/v biases, tied embeddings.
QWEN2 = dict(GQA, model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=4)
# 12 heads and intermediate 100: degree 8 divides neither (must raise), 1, 2, 4 work.
UNEVEN = dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4, intermediate_size=100,
              num_hidden_layers=1, vocab_size=1000)
# vocabulary a multiple of 64 and KV heads >= 4: 1xTP4 -> 2xTP2 moves exactly a quarter of the sharded bytes into each rank.
EVEN_VOCAB = dict(GQA, vocab_size=1024, num_key_value_heads=4)
