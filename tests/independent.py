"""Expectations computed without amoeba_core's layout or KV code: what each TP rank must hold, written directly from
the engines' conventions (../shared/reference/conventions.md), and KV contents addressed through the engine-facing
logical tensors only. The fuzz suite checks the library against these."""
import random
import zlib

import torch

VOCAB_PAD = 64


# ---- model ---------------------------------------------------------------------------------------------------
def random_model(rng: random.Random, degrees=(1, 2, 4)) -> dict:
    """A random Llama-style HF config whose sizes every degree in `degrees` can shard (GQA with KV-head
    replication when a degree exceeds the KV heads; vocabulary not a multiple of 64)."""
    top = max(degrees)
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 4])
    while heads % top:
        heads *= 2
    head_dim = rng.choice([4, 8, 12])
    return dict(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, intermediate_size=top * rng.randint(2, 12), num_hidden_layers=rng.randint(1, 2),
                vocab_size=rng.randint(65, 300), tie_word_embeddings=rng.random() < 0.5,
                attention_bias=rng.random() < 0.5, model_type=rng.choice(["llama", "qwen2"]),
                torch_dtype=rng.choice(["float32", "bfloat16", "float16", "float8_e4m3fn", "int8"]))


def _random_tensor(shape, dtype, seed, name):
    g = torch.Generator().manual_seed((seed * 7919 + zlib.crc32(name.encode())) % (2 ** 62))
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size(),),
                        generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)  # arbitrary bit patterns: a bit-exact check sees every byte


def hf_weights(cfg: dict, seed: int) -> dict:
    """HF-named, unfused full tensors of the config (random bits in its dtype)."""
    dt = getattr(torch, cfg["torch_dtype"])
    h, hq, hkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg["attention_bias"]
    o_bias = cfg["attention_bias"] and cfg["model_type"] != "qwen2"
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (hq * d, h), p + "self_attn.k_proj.weight": (hkv * d, h),
                       p + "self_attn.v_proj.weight": (hkv * d, h), p + "self_attn.o_proj.weight": (h, hq * d),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (hq * d,), p + "self_attn.k_proj.bias": (hkv * d,),
                           p + "self_attn.v_proj.bias": (hkv * d,)})
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
    return {name: _random_tensor(shape, dt, seed, name) for name, shape in shapes.items()}


def fused_full(hf: dict) -> dict:
    """vLLM's fused checkpoint view: qkv_proj = cat(q, k, v), gate_up_proj = cat(gate, up), on dim 0."""
    out = {}
    for name, t in hf.items():
        if ".self_attn.q_proj." in name:
            k, v = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v])
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[name.replace("gate_proj", "up_proj")]])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t
    return out


def kv_heads_of(rank: int, degree: int, kv_heads: int):
    """Global KV heads [first, last) TP rank `rank` of `degree` holds (replicated when degree > kv_heads)."""
    if degree <= kv_heads:
        n = kv_heads // degree
        return rank * n, (rank + 1) * n
    j = rank // (degree // kv_heads)
    return j, j + 1


def _rows(t, start, stop):
    return t[start:stop]


def expected_shard(cfg: dict, hf: dict, fused_name: str, rank: int, degree: int) -> torch.Tensor:
    """What TP rank `rank` of `degree` must hold under vLLM's name `fused_name`, from the HF tensors (always a new
    tensor: retp rewrites the shards it is given in place)."""
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter = cfg["intermediate_size"]
    if ".qkv_proj." in fused_name:
        q, k, v = (hf[fused_name.replace("qkv_proj", x)] for x in ("q_proj", "k_proj", "v_proj"))
        nq = hq // degree
        a, b = kv_heads_of(rank, degree, hkv)
        return torch.cat([_rows(q, rank * nq * d, (rank + 1) * nq * d), _rows(k, a * d, b * d),
                          _rows(v, a * d, b * d)])
    if ".gate_up_proj." in fused_name:
        gate, up = hf[fused_name.replace("gate_up_proj", "gate_proj")], hf[fused_name.replace("gate_up_proj", "up_proj")]
        n = inter // degree
        return torch.cat([_rows(gate, rank * n, (rank + 1) * n), _rows(up, rank * n, (rank + 1) * n)])
    t = hf[fused_name]
    if fused_name.endswith("o_proj.weight"):
        n = hq * d // degree
        return t[:, rank * n:(rank + 1) * n].clone(memory_format=torch.contiguous_format)
    if fused_name.endswith("down_proj.weight"):
        n = inter // degree
        return t[:, rank * n:(rank + 1) * n].clone(memory_format=torch.contiguous_format)
    if fused_name in ("model.embed_tokens.weight", "lm_head.weight"):
        vocab = t.shape[0]
        padded = -(-vocab // VOCAB_PAD) * VOCAB_PAD
        full = torch.zeros((padded,) + tuple(t.shape[1:]), dtype=t.dtype)
        full[:vocab] = t
        n = padded // degree
        return full[rank * n:(rank + 1) * n].clone()
    return t.clone()  # norms and the o_proj bias: replicated


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


# ---- KV cache ------------------------------------------------------------------------------------------------
def kv_values(layer: int, instance: int, block: int, head: int, block_size: int, head_dim: int, dtype) -> torch.Tensor:
    """(2, block_size, head_dim): K and V of one global head of one block, a pure function of the arguments."""
    c = torch.arange(2).view(2, 1, 1)
    t = torch.arange(block_size).view(1, -1, 1)
    x = torch.arange(head_dim).view(1, 1, -1)
    key = (layer * 13 + instance * 101 + block * 7 + head * 29 + c * 3 + t * 5 + x) % 97 + 1
    return key.to(torch.uint8).view(dtype) if torch.empty((), dtype=dtype).element_size() == 1 else key.to(dtype)


def block_head(engine: str, layer_tensor, block: int, local_head: int, block_size: int):
    """(K, V) views, each (block_size, head_dim), of one block and one local head through the engine-facing
    tensor(s): vllm_flash_attn (2, N, B, H, d); vllm_flashinfer (N, 2, B, H, d); sglang k, v (N * B, H, d)."""
    if engine == "vllm_flash_attn":
        return layer_tensor[0, block, :, local_head], layer_tensor[1, block, :, local_head]
    if engine == "vllm_flashinfer":
        return layer_tensor[block, 0, :, local_head], layer_tensor[block, 1, :, local_head]
    k, v = layer_tensor
    s = slice(block * block_size, (block + 1) * block_size)
    return k[s, local_head], v[s, local_head]


def fill_kv(engine, layers, live_blocks, instance, heads, block_size, head_dim, dtype, noise_seed):
    """Noise everywhere, then the expected values in every live block for this rank's heads."""
    g = torch.Generator().manual_seed(noise_seed)
    for layer in layers:
        for t in (layer if engine == "sglang" else (layer,)):
            raw = t.view(torch.uint8)  # head_dim is contiguous in every layout, HND included
            raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    for li, layer in enumerate(layers):
        for b in live_blocks:
            for lh, h in enumerate(range(*heads)):
                want = kv_values(li, instance, b, h, block_size, head_dim, dtype)
                for view, part in zip(block_head(engine, layer, b, lh, block_size), want):
                    view.copy_(part)


def random_tables(rng: random.Random, num_instances: int, num_blocks: int, fill: float, reserved: int,
                  id_base: int = 0) -> dict:
    """Per instance: seq_id -> block table over a shuffled pool, some tables sharing a prefix of an earlier one."""
    out, next_id = {}, id_base
    for inst in range(num_instances):
        free = list(range(reserved, num_blocks))
        rng.shuffle(free)
        free = free[:int(fill * len(free))]
        tables = {}
        while free:
            n = rng.randint(1, 5)
            table, free = free[:n], free[n:]
            if tables and rng.random() < 0.3:
                prev = rng.choice(list(tables.values()))
                table = prev[:rng.randint(1, len(prev))] + table
            tables[next_id] = table
            next_id += 1
        out[inst] = tables
    return out
