"""bench/prefill_profile.py: one record per stage and per block setting, written as returned, and the
library's block defaults restored afterwards (blockwise == dense is tests/test_attention.py's). No timing
assertions."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import prefill_profile  # noqa: E402
from sparrow_jax.models import attention as attn_lib  # noqa: E402
from sparrow_jax.synthetic import demo  # noqa: E402


@pytest.mark.skipif(demo.shipped_target() is None, reason="shipped target weights absent")
def test_stages_and_block_cells(tmp_path, monkeypatch):
    defaults = dict(attn_lib.blockwise_attention.__kwdefaults__)
    monkeypatch.setattr(attn_lib, "DENSE_SCORE_LIMIT", 1)  # a 4 s prompt takes the blockwise path too
    out = tmp_path / "p.jsonl"
    records = prefill_profile.main(["--seconds", "4", "--blocks", "16/32", "dense", "--repeats", "1",
                                    "--jsonl", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    lib = f"{attn_lib.Q_BLOCK}/{attn_lib.KV_BLOCK}"
    assert [(r["cell"], r["blocks"]) for r in records] == [
        ("processor", lib), ("batch", lib), ("vision", lib), ("lm_prefill", lib),
        ("lm_prefill", "16/32"), ("lm_prefill", "dense")]
    assert [r["dense_score_limit"] for r in records] == [1] * 5 + [1 << 62]
    assert all(r["seconds_median"] > 0 and r["visual_tokens"] > 0 for r in records)
    assert attn_lib.blockwise_attention.__kwdefaults__ == defaults and attn_lib.DENSE_SCORE_LIMIT == 1


@pytest.mark.skipif(demo.shipped_target() is None, reason="shipped target weights absent")
def test_dense_score_limit_applies_to_block_cells(tmp_path):
    records = prefill_profile.main(["--seconds", "4", "--blocks", "16/32", "--dense-score-limit", "0", "--repeats",
                                    "1", "--jsonl", str(tmp_path / "p.jsonl")])
    assert records[-1]["blocks"] == "16/32" and records[-1]["dense_score_limit"] == 0
    assert records[0]["dense_score_limit"] == attn_lib.DENSE_SCORE_LIMIT  # stage cells: the library's


def test_bad_blocks_are_refused():
    with pytest.raises(SystemExit, match="--blocks"):
        prefill_profile.main(["--blocks", "128x1024"])
