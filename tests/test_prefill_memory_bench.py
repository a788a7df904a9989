"""bench/prefill_memory.py measures decode.py's own path: its stage-by-stage run (`--source video`) on a
rendered world video gives the tokens decode.py itself prints for that video (`--source decode`), and
every stage reports its peak and resident memory."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import prefill_memory  # noqa: E402

SHIPPED = ROOT / "shipped" / "tiny-qwen2.5-vl"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="the shipped target's weights are absent")
def test_stages_reproduce_decode_py(tmp_path):
    common = ["--visual-tokens", "128", "--video-dir", str(tmp_path / "videos"), "--jsonl", str(tmp_path / "r.jsonl"),
              "--max-new-tokens", "3"]
    stages = prefill_memory.main(["--source", "video", *common])
    decode = prefill_memory.main(["--source", "decode", *common])
    assert stages["visual_tokens"] == 128 and decode["exit_status"] == 0 and "aborted" not in decode
    assert len(stages["tokens"]) == 3 and stages["tokens"] == decode["tokens"]
    assert set(stages["stages"]) == {"preprocess (read + resize + patchify)", "load target", "prepare batch",
                                     "prefill (first call: compile + run)", "AR decode"}
    for s in stages["stages"].values():
        assert 0 < s["rss_after_gib"] <= s["peak_rss_gib"] + 1e-3
    assert stages["peak_rss_gib"] == max(s["peak_rss_gib"] for s in stages["stages"].values())
    assert decode["peak_rss_gib"] > 0 and decode["rss_timeline"]
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1  # rendered once, reused
