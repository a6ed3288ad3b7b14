"""Real-model checks: tiny HF transformers models of each newer family, saved with save_pretrained, served by the
reference engine on 4 CPU ranks while retp merges and splits it (4x1 -> 2x2 -> 1x4 -> 2x2 -> 4x1), generate the
same greedy tokens as HF's own generate (and logits within 1e-4), with every transition verified bit for bit."""
import pytest
import torch

import amoeba_core as A
from amoeba_core.reference import random_hf_tensors, run_generation

import family_models as M
import reference_fns as F

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(240)
MAX_NEW = 8


def hf_model(cfg: dict, seed: int = 0):
    """An HF model of the config with the reference engine's well-scaled random weights (random_hf_tensors: unit
    activations, so argmax decisions are far from ties), loaded through load_state_dict."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg)).eval()
    missing, unexpected = model.load_state_dict(random_hf_tensors(dict(cfg, torch_dtype="float32"), seed),
                                                strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"} and (not missing or cfg["tie_word_embeddings"])
    return model


def hf_greedy(model, prompts):
    """Greedy tokens and per-step logits of HF generate, one prompt at a time (no padding), no early stop."""
    model.generation_config.eos_token_id = None
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(p):].tolist())
            logits.append(torch.cat(out.logits).float())
    return tokens, logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3", "deepseek_v2"])
def test_tokens_match_hf_generate_across_merges_and_splits(pools, tmp_path, family):
    cfg = M.FAMILIES[family]
    model = hf_model(cfg)
    model.save_pretrained(tmp_path)
    prompts = F.prompts(5, vocab=cfg["vocab_size"])
    want, want_logits = hf_greedy(model, prompts)
    results = pools(4).run(run_generation, prompts=prompts, max_new_tokens=MAX_NEW, schedule=F.WAVE,
                           model_dir=str(tmp_path), record_logits=True)
    F.check_transitions(results, len(F.WAVE) - 1)
    assert [t["to"] for t in results[0]["transitions"]] == ["2x2", "1x4", "2x2", "4x1"]
    for k in range(len(F.WAVE) - 1):  # every transition carried live sequences
        assert sum(r["transitions"][k]["live_blocks"] for r in results) > 0
    for r in results:
        assert r["tokens"] == want
    for i, (got, ref) in enumerate(zip(results[0]["logits"], want_logits)):
        assert got.shape == ref.shape == (MAX_NEW, cfg["vocab_size"])
        assert F.max_rel_diff(got, ref) < 1e-4, i


def test_mla_merges_replicate_the_latent_cache(pools, tmp_path):
    """DeepSeek-V2-Lite style (no q_lora_rank): the merge 2x2 -> 1x4 brings each rank the other instance's latent
    blocks (KV bytes move although no head is split); the split back moves none."""
    cfg = M.DEEPSEEK_V2_LITE
    model = hf_model(cfg, seed=1)
    model.save_pretrained(tmp_path)
    prompts = F.prompts(4, vocab=cfg["vocab_size"])
    want, _ = hf_greedy(model, prompts)
    results = pools(4).run(run_generation, prompts=prompts, max_new_tokens=MAX_NEW,
                           schedule=[(2, 2), (1, 4), (2, 2)], model_dir=str(tmp_path))
    F.check_transitions(results, 2)
    assert all(r["tokens"] == want for r in results)
    merge, split = ([sum(r["transitions"][k]["stats"]["kv_bytes_received"] for r in results) for k in (0, 1)])
    assert merge > 0 and split == 0


def test_fp8_block_quantized_model_tokens_unchanged_by_tp_changes(pools):
    """A block-quantized FP8 Qwen3-MoE (weights float8_e4m3fn with 128x128 weight_scale_inv, dequantized at use):
    the service's tokens and logits across merges and splits equal a TP1 run's; weights and scales bit-exact."""
    cfg = M.FP8_QWEN3_MOE
    base = pools(4).run(run_generation, prompts=F.prompts(4), max_new_tokens=MAX_NEW, schedule=[(4, 1)],
                        config=cfg, record_logits=True)
    results = pools(4).run(run_generation, prompts=F.prompts(4), max_new_tokens=MAX_NEW, schedule=F.WAVE,
                           config=cfg, record_logits=True)
    F.check_transitions(results, len(F.WAVE) - 1)
    assert all(r["tokens"] == base[0]["tokens"] for r in results)
    for got, ref in zip(results[0]["logits"], base[0]["logits"]):
        assert F.max_rel_diff(got, ref) < 1e-4
    specs = A.model_param_specs(cfg)
    assert sum(s.dtype == "float8_e4m3fn" for s in specs) == 8
