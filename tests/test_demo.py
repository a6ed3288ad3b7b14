"""The README's main job: the demo runs a schedule end to end and its JSON says every step was verified."""
import json

from amoeba_core import demo


def test_synthetic_demo_reports_verified_minimal_transitions(tmp_path):
    out = tmp_path / "out.json"
    rc = demo.main(["--engine", "synthetic", "--world-size", "2", "--schedule", "2x1,1x2,2x1", "--num-blocks", "48",
                    "--json", str(out), "--timeout", "120"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["world_size"] == 2 and len(report["transitions"]) == 2
    for t in report["transitions"]:
        assert t["verified"] and t["weight_bytes_moved"] == t["weight_bytes_min"]
        assert t["kv_bytes_moved"] == t["kv_bytes_min"] and t["within_budget"]
        assert t["measured_peak_extra_bytes"] <= t["memory_bound_bytes"] + demo.MEASUREMENT_ALLOWANCE
    assert report["transitions"][1]["weight_bytes_moved"] > 0  # the split moves weights


def test_reference_demo_generates_the_tp1_tokens(tmp_path):
    out = tmp_path / "out.json"
    rc = demo.main(["--world-size", "2", "--schedule", "2x1,1x2,2x1", "--max-new-tokens", "6", "--json", str(out),
                    "--timeout", "120"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["matches_tp1"] and len(report["generated"]) == len(demo.DEMO_PROMPT_LENGTHS)
    assert all(len(g) == 6 for g in report["generated"]) and all(t["verified"] for t in report["transitions"])


def test_schedule_entries_must_cover_the_world():
    import pytest
    from amoeba_core.errors import ConfigError
    with pytest.raises(ConfigError, match="covers 6 ranks, the world has 4"):
        demo.parse_schedule("4x1,3x2", 4)


def test_long_context_scenario_serves_the_long_prompt_thanks_to_the_handoff(tmp_path):
    """The long prompt fits no TP1 instance and no merged instance without the handoff; the policy merges, the
    pool takes the freed weight memory, the prompt is served, the group splits back while short requests run, every
    token equals a TP=1 run, and the measured footprint respects the invariant on every transition."""
    out = tmp_path / "out.json"
    rc = demo.main(["--scenario", "long-context", "--json", str(out), "--timeout", "120"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["served_long_prompt"] and report["matches_tp1"]
    merge, split = report["transitions"]
    long_tokens = report["long_prompt_tokens"] + 12 - 1
    assert merge["from"] == "4x1" and merge["to"] == "1x4" and split["to"] == "4x1"
    assert merge["kv_capacity_tokens_before"] < long_tokens and merge["kv_capacity_tokens_no_handoff"] < long_tokens
    assert merge["kv_capacity_tokens_after"] >= long_tokens and merge["handoff_matches_freed_bytes"]
    assert split["kv_blocks_live"] > 0  # short requests were running across the split
    for t in report["transitions"]:
        assert t["verified"] and t["memory_invariant_holds"] and t["kv_bytes_moved"] == t["kv_bytes_min"]
        assert t["weight_bytes_moved"] == t["weight_bytes_min"] and "measured_peak_extra_bytes" in t
