"""bench/soak.py (issue 13): a short soak on the shipped target — after one warm-up call per compiled-program
key, calls with new prompts, sampling values and seeds compile nothing, and every greedy row of a
(question, video) pair gets the same tokens whatever its call."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
SHIPPED = ROOT / "shipped" / "tiny-qwen2.5-vl"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped target absent")
def test_short_soak_compiles_nothing_after_warmup(tmp_path):
    import soak

    out = tmp_path / "soak.jsonl"
    rec = soak.main(["--calls", "10", "--lengths", "4", "--scenes", "2", "--batches", "1,2", "--modes", "sparrow",
                     "--max-new-tokens", "16", "--rss-every", "5", "--jsonl", str(out), "--no-progress"])
    assert json.loads(out.read_text().splitlines()[-1])["calls"] == 10
    assert rec["keys"] <= 4 and rec["warmup_compiles"] > 0
    assert rec["compiles_after_warmup"] == 0, rec["compile_calls"]
    assert rec["greedy_pairs"] >= 1 and rec["greedy_mismatches"] == 0
    assert [n for n, _ in rec["rss_mib"]] == [0, 5, 10] and all(m > 0 for _, m in rec["rss_mib"])
    assert rec["rows"] >= 10 and rec["tokens"] >= rec["rows"]


def test_soak_arguments_are_checked():
    import soak

    for bad in (["--lengths", "2"], ["--batches", "0"], ["--calls", "0"], ["--greedy-share", "2"], ["--lengths", "x"]):
        with pytest.raises(SystemExit):
            soak.parse_args(bad)
