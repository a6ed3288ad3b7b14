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
