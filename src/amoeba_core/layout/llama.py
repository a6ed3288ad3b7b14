"""Parameter specs of Llama / Mistral / Qwen2-style decoders from an HF-style config dict."""
from __future__ import annotations

from typing import Mapping, Optional

from ..errors import ConfigError
from . import specs as S

QWEN2_ARCHS = ("Qwen2ForCausalLM",)


def _model_dims(config: Mapping) -> dict:
    required = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"model config lacks {missing}; it has {sorted(config)}")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                              f"give head_dim explicitly")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    is_qwen2 = config.get("model_type") == "qwen2" or any(a in QWEN2_ARCHS for a in config.get("architectures") or ())
    attention_bias = bool(config.get("attention_bias", False))
    return dict(
        hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]),
        vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers q, k, v and o.
        qkv_bias=is_qwen2 or attention_bias, o_bias=attention_bias and not is_qwen2,
    )


def llama_param_specs(config: Mapping, dtype: Optional[str] = None, fused: bool = True) -> list:
    """Specs of every parameter of a Llama / Mistral / Qwen2-style decoder, in checkpoint order.

    config: HF-style dict with hidden_size, num_attention_heads, num_key_value_heads (default: heads), head_dim
            (default hidden/heads), intermediate_size, num_hidden_layers, vocab_size, tie_word_embeddings (default
            False), attention_bias (default False; Qwen2 models always have q/k/v biases).
    dtype:  torch dtype name of every parameter (default: config["torch_dtype"], else "float32").
    fused:  True (default) names and shapes follow vLLM's fused modules:
              model.layers.{i}.self_attn.qkv_proj.{weight,bias}   ((Hq + 2*Hkv) * d, hidden)  fused QKV
              model.layers.{i}.mlp.gate_up_proj.weight            (2 * intermediate, hidden)  merged column
            False keeps HF's unfused names: self_attn.{q,k,v}_proj, mlp.{gate,up}_proj.
            In both, the other names are HF's: model.embed_tokens.weight, model.layers.{i}.input_layernorm.weight,
            self_attn.o_proj.{weight,bias}, post_attention_layernorm.weight, mlp.down_proj.weight, model.norm.weight,
            lm_head.weight (absent when tie_word_embeddings).
    """
    m = _model_dims(config)
    dt = dtype or str(config.get("torch_dtype") or "float32").replace("torch.", "")
    h, d, hq, hkv, inter = m["hidden"], m["head_dim"], m["heads"], m["kv_heads"], m["intermediate"]
    out = [S.vocab("model.embed_tokens.weight", (m["vocab"], h), dt)]
    for i in range(m["layers"]):
        p = f"model.layers.{i}."
        out.append(S.replicated(p + "input_layernorm.weight", (h,), dt))
        if fused:
            qkv_rows = (hq + 2 * hkv) * d
            out.append(S.qkv(p + "self_attn.qkv_proj.weight", (qkv_rows, h), dt, hq, hkv, d))
            if m["qkv_bias"]:
                out.append(S.qkv(p + "self_attn.qkv_proj.bias", (qkv_rows,), dt, hq, hkv, d))
        else:
            for proj in ("q", "k", "v"):
                for part in ("weight", "bias") if m["qkv_bias"] else ("weight",):
                    shape = ((hq if proj == "q" else hkv) * d,) + ((h,) if part == "weight" else ())
                    name = f"{p}self_attn.{proj}_proj.{part}"
                    out.append(S.column(name, shape, dt, unit=d) if proj == "q"
                               else S.kv_heads(name, shape, dt, hkv, d))
        out.append(S.row(p + "self_attn.o_proj.weight", (h, hq * d), dt, unit=d))
        if m["o_bias"]:
            out.append(S.replicated(p + "self_attn.o_proj.bias", (h,), dt))
        out.append(S.replicated(p + "post_attention_layernorm.weight", (h,), dt))
        if fused:
            out.append(S.merged_column(p + "mlp.gate_up_proj.weight", (2 * inter, h), dt, (inter, inter),
                                       ("gate", "up")))
        else:
            out.append(S.column(p + "mlp.gate_proj.weight", (inter, h), dt))
            out.append(S.column(p + "mlp.up_proj.weight", (inter, h), dt))
        out.append(S.row(p + "mlp.down_proj.weight", (h, inter), dt))
    out.append(S.replicated("model.norm.weight", (h,), dt))
    if not m["tied"]:
        out.append(S.vocab("lm_head.weight", (m["vocab"], h), dt))
    return out


def model_dims(config: Mapping) -> dict:
    """Normalised dimensions of a Llama-style config (hidden, heads, kv_heads, head_dim, intermediate, layers,
    vocab, tied, qkv_bias, o_bias)."""
    return _model_dims(config)
