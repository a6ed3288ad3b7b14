"""The TP policy drives the reference engine: a merge when a request fits no TP1 instance (its elastic KV pool
takes the weight memory the merge frees), a split back when it is done; and the engine makes the same decisions at
the same steps as the trace-driven simulator given the same capacities (amoeba_core.simulator.policy_decisions)."""
import torch

from amoeba_core import llama_param_specs
from amoeba_core.capacity import weight_bytes_per_gpu
from amoeba_core.demo import DEMO_ENGINE_MODEL
from amoeba_core.reference.run import run_generation, serve_with_policy
from amoeba_core.simulator import policy_decisions

# The first 60 requests of the Mooncake conversation trace (kvcache-ai/Mooncake, FAST25-release/traces/
# conversation_trace.jsonl, Apache-2.0): (timestamp ms, input tokens, output tokens).
MOONCAKE_HEAD = [
    (0, 6758, 500), (0, 7322, 490), (0, 7236, 794), (0, 2290, 316), (0, 6760, 3), (0, 4834, 173), (0, 23141, 453),
    (0, 26888, 458), (0, 10498, 402), (0, 17450, 610), (3000, 13544, 71), (3000, 87169, 402), (3000, 6324, 548),
    (3000, 2012, 354), (3000, 7324, 14), (3000, 9418, 145), (3000, 915, 355), (3000, 12846, 466), (3000, 20506, 929),
    (3000, 16609, 349), (3000, 26353, 370), (3000, 6059, 475), (3000, 5954, 420), (3000, 11339, 848),
    (3000, 15172, 80), (3000, 45922, 265), (5999, 1053, 26), (5999, 5710, 745), (5999, 7238, 11), (9000, 10355, 584),
    (9000, 1477, 615), (9000, 15366, 344), (9000, 3806, 309), (9000, 8772, 1), (9000, 26156, 238),
    (9000, 16635, 449), (9000, 2293, 31), (9000, 1110, 240), (12000, 3628, 555), (12000, 2038, 524),
    (12000, 1902, 587), (12000, 14041, 227), (12000, 12095, 239), (12000, 1066, 324), (12000, 9615, 203),
    (12000, 19976, 105), (15000, 6525, 481), (15000, 898, 324), (15000, 5391, 361), (15000, 23631, 362),
    (15000, 38383, 589), (15000, 7543, 415), (15000, 8974, 219), (15000, 24246, 587), (15000, 15761, 417),
    (15000, 27701, 459), (15000, 11041, 98), (15000, 4836, 24), (15000, 2350, 355), (15000, 934, 421),
]

MODEL = dict(DEMO_ENGINE_MODEL, torch_dtype="float32")
WORLD = 4


def scaled_trace(length_scale=300, ms_per_step=500, seed=0):
    """The trace scaled down to a tiny model: prompt lengths / length_scale, one engine step per ms_per_step ms,
    outputs of 1-8 tokens (output / 100 + 1)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, MODEL["vocab_size"], (max(1, n // length_scale),), generator=g).tolist()
               for _, n, _ in MOONCAKE_HEAD]
    arrivals = [ts // ms_per_step for ts, _, _ in MOONCAKE_HEAD]
    outputs = [min(o // 100 + 1, 8) for _, _, o in MOONCAKE_HEAD]
    return prompts, arrivals, outputs


def test_engine_and_simulator_make_the_same_decisions_and_tokens_match_tp1(pools):
    """128 KiB of KV per rank beside the TP1 weights: the longest prompts of the scaled trace fit no TP1 instance
    (32 blocks) but fit the merged TP4 instance once the freed weight memory is in its pool (1568 blocks). The
    engine merges and splits exactly when the simulator does, and its tokens equal a TP1 run without a memory
    limit."""
    prompts, arrivals, outputs = scaled_trace()
    limit = weight_bytes_per_gpu(llama_param_specs(MODEL), 1) + (128 << 10)
    results = pools(WORLD).run(serve_with_policy, prompts=prompts, arrivals=arrivals, max_new_tokens=outputs,
                               memory_limit_bytes=limit, config=MODEL)
    r = results[0]
    assert all(x["decisions"] == r["decisions"] for x in results)
    simulated = policy_decisions([1] * WORLD, r["capacity_blocks"], list(zip(arrivals, map(len, prompts), outputs)),
                                 block_size=4)
    assert [(s, type(a).__name__.lower(), a.new_degree) for s, a in simulated] == r["decisions"]
    assert [kind for _, kind, _ in r["decisions"]] == ["merge", "split", "merge", "split"]
    for x in results:
        for t in x["transitions"]:
            assert t["verified"] and t["failed"] is None, (t["from"], t["to"], t["bad_weights"][:3], t["bad_kv"][:3])
    baseline = pools(WORLD).run(run_generation, prompts=prompts, max_new_tokens=max(outputs), schedule=[(WORLD, 1)],
                                config=MODEL, num_blocks=512, verify=False)
    assert r["tokens"] == [toks[:n] for toks, n in zip(baseline[0]["tokens"], outputs)]
