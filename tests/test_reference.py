"""End to end: a TP service built on the reference engine keeps generating the same tokens across retp."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import amoeba_core as A
import amoeba_core.launch
from amoeba_core.reference import load_hf_checkpoint, run_generation, transition_steps, write_random_checkpoint

import reference_fns as F
from amoeba_core.demo import MEASUREMENT_ALLOWANCE

pytestmark = pytest.mark.timeout(180)
MAX_NEW = 8


def generate(pool, schedule, model=F.LLAMA, n_prompts=5, **kw):
    kw.setdefault("config", model)
    return pool.run(run_generation, prompts=F.prompts(n_prompts), max_new_tokens=MAX_NEW, schedule=schedule, **kw)


def assert_same_generation(results, baseline, tol=1e-4):
    """Tokens equal on every rank and logits within tol (relative) at every step of every prompt."""
    want = baseline[0]["tokens"]
    assert all(len(t) == MAX_NEW for t in want)
    for r in results:
        assert r["tokens"] == want
    for i, (got, ref) in enumerate(zip(results[0]["logits"], baseline[0]["logits"])):
        assert got.shape == ref.shape == (MAX_NEW, ref.shape[1])
        for step in range(MAX_NEW):
            assert F.max_rel_diff(got[step], ref[step]) < tol, (i, step)


@pytest.fixture(scope="module")
def llama_baseline(pools):
    return generate(pools(4), [(4, 1)], record_logits=True)


@pytest.mark.parametrize("engine, order", [("vllm_flash_attn", "NHD"), ("vllm_flashinfer", "NHD"),
                                           ("vllm_flashinfer", "HND"), ("sglang", "NHD")])
def test_fp32_tokens_match_tp1_across_merges_and_splits(pools, llama_baseline, engine, order):
    results = generate(pools(4), F.WAVE, record_logits=True, kv_engine=engine, kv_order=order)
    assert_same_generation(results, llama_baseline)
    F.check_transitions(results, len(F.WAVE) - 1)
    steps = transition_steps(len(F.WAVE) - 1, MAX_NEW)
    assert [t["step"] for t in results[0]["transitions"]] == steps and steps[-1] < MAX_NEW
    assert [t["to"] for t in results[0]["transitions"]] == ["2x2", "1x4", "2x2", "4x1"]
    for k in range(len(F.WAVE) - 1):  # every transition carried live sequences, and KV bytes moved
        assert sum(r["transitions"][k]["live_blocks"] for r in results) > 0
        assert sum(r["transitions"][k]["stats"]["kv_bytes_received"] for r in results) > 0
    assert results[0]["final_config"].startswith("4x1")


def test_tp1_baseline_independent_of_world_size(pools, llama_baseline):
    """One TP1 engine serving every prompt (world 1) gives what four TP1 instances give."""
    single = generate(pools(1), [(1, 1)], record_logits=True)
    assert_same_generation(single, llama_baseline, tol=1e-5)


def test_weights_from_written_hf_checkpoint(pools, llama_baseline, tmp_path):
    """The same model read from an HF checkpoint on disk; TP changes without ever reaching TP1 at the start."""
    write_random_checkpoint(str(tmp_path), F.LLAMA, seed=0)
    results = generate(pools(4), [(1, 4), (4, 1), (2, 2)], config=None, model_dir=str(tmp_path),
                       record_logits=True)
    assert_same_generation(results, llama_baseline)
    F.check_transitions(results, 2)


def test_bf16_every_transition_verified(pools):
    results = generate(pools(4), F.WAVE, dtype="bfloat16", kv_engine="vllm_flashinfer", kv_order="HND",
                       scratch_bytes=4096)
    F.check_transitions(results, len(F.WAVE) - 1)
    assert all(len(t) == MAX_NEW for t in results[0]["tokens"])
    assert all(r["tokens"] == results[0]["tokens"] for r in results)
    for r in results:
        for t in r["transitions"]:
            st = t["stats"]
            assert st["measured_peak_extra_bytes"] <= st["memory_bound_bytes"] + MEASUREMENT_ALLOWANCE, st


def test_degree_above_kv_heads(pools):
    """2 KV heads at TP4: each KV head lives on two ranks of the instance; generation is unchanged."""
    base = generate(pools(4), [(4, 1)], model=F.GQA2, record_logits=True)
    results = generate(pools(4), [(4, 1), (1, 4), (2, 2), (1, 4), (4, 1)], model=F.GQA2, record_logits=True)
    assert_same_generation(results, base)
    F.check_transitions(results, 4)


@pytest.mark.parametrize("model", [F.QWEN2, F.LLAMA_BIAS], ids=["qwen2_tied", "llama_attention_bias"])
def test_biases_and_tied_embeddings(pools, model):
    base = generate(pools(4), [(4, 1)], model=model, record_logits=True)
    results = generate(pools(4), F.WAVE, model=model, record_logits=True)
    assert_same_generation(results, base)
    F.check_transitions(results, len(F.WAVE) - 1)


def test_waiting_and_preempted_prompts_cross_transitions(pools):
    """A pool too small for every prompt at once: prompts wait, are admitted as others finish, and the waiting
    ones are dealt to the new instances at each TP change; the split leaves one instance short of blocks, so it
    preempts a sequence and recomputes it later. Tokens do not depend on any of this."""
    results = generate(pools(4), [(4, 1), (2, 2), (4, 1)], n_prompts=7, num_blocks=8, record_logits=True)
    base = generate(pools(4), [(4, 1)], n_prompts=7, record_logits=True)
    assert results[0]["steps"] > MAX_NEW  # some prompts had to wait
    assert sum(r["preemptions"] for r in results) > 0
    assert_same_generation(results, base)
    F.check_transitions(results, 2)


def test_prompt_larger_than_an_instance_fails_on_every_rank(pools):
    """A prompt whose lifetime exceeds its instance's KV pool: every rank raises CapacityError (none hangs)."""
    with pytest.raises(A.launch.RankError) as info:
        generate(pools(4), [(4, 1), (2, 2)], n_prompts=7, num_blocks=6)
    assert isinstance(info.value.exc, A.CapacityError)
    assert "sequence 3 needs more KV blocks than the 6 of its instance" in str(info.value.exc)


@pytest.mark.parametrize("model", [F.LLAMA, F.GQA2, F.QWEN2, F.LLAMA_BIAS],
                         ids=["llama", "gqa2", "qwen2", "llama_bias"])
def test_load_hf_checkpoint_fuses_like_vllm(tmp_path, model):
    """Fusing then sharding equals sharding each HF tensor then stacking (what vLLM's loader does)."""
    write_random_checkpoint(str(tmp_path), model, seed=3)
    hf = load_file(os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            model["model_type"]]]
    config, full = load_hf_checkpoint(str(tmp_path))
    specs = A.llama_param_specs(config)
    assert set(full) == {s.name for s in specs}
    assert ("lm_head.weight" in full) != bool(model.get("tie_word_embeddings"))
    unfused = {s.name: s for s in A.llama_param_specs(config, fused=False)}
    assert set(hf) == set(unfused)
    for spec in specs:
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        kind = next((k for k in parts if f".{k}." in spec.name), None)
        names = [spec.name.replace(kind, p) for p in parts[kind]] if kind else [spec.name]
        for degree in (1, 2, 4):
            for r in range(degree):
                want = torch.cat([A.shard(hf[n], unfused[n], r, degree) for n in names])
                assert A.verify.same_bytes(A.shard(full[spec.name], spec, r, degree), want), (spec.name, r, degree)
    config16, full16 = load_hf_checkpoint(str(tmp_path), dtype="bfloat16")
    assert config16["torch_dtype"] == "bfloat16"
    for spec in A.llama_param_specs(config16):
        assert full16[spec.name].dtype == torch.bfloat16
        assert A.verify.same_bytes(full16[spec.name], full[spec.name].to(torch.bfloat16))


def test_random_checkpoint_is_deterministic_and_sane(tmp_path):
    write_random_checkpoint(str(tmp_path / "a"), F.LLAMA, seed=1)
    write_random_checkpoint(str(tmp_path / "b"), F.LLAMA, seed=1)
    a = load_file(os.path.join(tmp_path, "a", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "b", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert 0.5 < float(a["model.embed_tokens.weight"].std()) < 2
    assert abs(float(a["model.norm.weight"].mean()) - 1) < 0.05


def test_recovers_from_failures_mid_transformation_and_keeps_the_tp1_tokens(pools):
    """An exception injected on one rank in the middle of the KV move of a split, and later in the middle of the
    weight move of another split: every rank raises TransformationFailed, the engine reloads the damaged shards
    from the checkpoint, recomputes the sequences whose KV cache was lost, serves on at the old degree, and the
    tokens still equal the TP=1 run. (10 prompts in small pools: the 1x4 -> 2x2 split must overwrite live blocks,
    so the first failure really loses KV.)"""
    faults = [(2, 2, "move.kv", 1), (3, 0, "move.weights", 20)]  # (transition, rank, point, hits before it fires)
    common = dict(n_prompts=10, num_blocks=10, scratch_bytes=8192)
    results = generate(pools(4), F.WAVE, faults=faults, **common)
    baseline = generate(pools(4), [(4, 1)], verify=False, **common)
    assert results[0]["tokens"] == baseline[0]["tokens"]
    for r in results:
        records = r["transitions"]
        assert [t["failed"] for t in records] == [None, None, "TransformationFailed", "TransformationFailed"]
        for t in records:
            assert t["verified"], (t["from"], t["to"], t["bad_weights"][:3], t["bad_kv"][:3])
        assert records[2]["to"] == records[2]["from"] == "1x4"   # the failed split left the group at 1x4
        assert records[3]["to"] == records[3]["from"] == "1x4"   # and so did the second one
        assert r["final_config"].startswith("1x4")
    # The first split failed inside its KV move: sequences lost their cache and were recomputed; the second failed
    # inside its weight move: shards it had finished were reloaded from the checkpoint.
    assert results[0]["transitions"][2]["recomputed"]
    assert all(r["transitions"][3]["restored"] for r in results)
