"""bench/round_profile.py times the pieces of one speculative round inside jitted loops. No timing
assertions: the records name what was timed, at which cache lengths, and their derived ratios follow
from their own times."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import round_profile  # noqa: E402


def test_ratio_needs_a_positive_time():
    assert round_profile.ratio(3.0, 1.5) == 2.0
    assert round_profile.ratio(3.0, 0.0) is None and round_profile.ratio(3.0, -0.1) is None


def test_records_follow_the_draft_view_and_their_own_times(small_config_file, tmp_path):
    cfg = small_config_file
    out = tmp_path / "r.jsonl"
    records = round_profile.main(["--config", str(cfg), "--draft", "", "--lengths", "0", "40", "--text-tokens", "20",
                                  "--trips", "1", "3", "--repeats", "1", "--jsonl", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert [r["visual_tokens"] for r in records] == [0, 40]
    for r in records:
        assert r["target_committed"] == 22 + r["visual_tokens"]  # 20 text tokens, 2 markers, V visual
        # text only (the engine's layout: pairs (t_i+1, h_i), so one fewer item): independent of V
        assert r["draft_view"] == "none" and r["draft_committed"] == 21
        assert r["tree"] == "4-2-1" and r["tree_nodes"] == 4
        for piece in round_profile.PIECES:
            assert math.isfinite(r[f"{piece}_ms"])
        assert r["target_over_draft_step"] == round_profile.ratio(r["ar_ms"], r["draft_ms"])
        assert r["round_in_ar_steps"] == round_profile.ratio(r["round_ms"], r["ar_ms"])
        assert math.isclose(r["overhead_ms"], r["round_ms"] - r["phase_ms"] - r["verify_ms"], abs_tol=1e-3)
