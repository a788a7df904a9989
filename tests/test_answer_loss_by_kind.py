"""bench/answer_loss_by_kind.py: the per-kind real-vs-control answer-loss probe runs on the shipped target
and writes one JSON line per (kind, condition); a condition repeated gives the same loss."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
SHIPPED = ROOT / "shipped" / "tiny-qwen2.5-vl"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped target absent")
def test_probe_rows_per_kind_and_condition(tmp_path, capsys):
    import answer_loss_by_kind as bench

    out = tmp_path / "probe.jsonl"
    bench.main(["--target", str(SHIPPED), "--kinds", "background,colour", "--per-kind", "8",
                "--conditions", "real,blank,real", "--world", "sprite_scale=1.0", "--jsonl", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["condition"]) for r in rows] == [
        (k, c) for k in ("background", "colour") for c in ("real", "blank", "real")]
    for r in rows:
        assert r["questions"] == 8 and r["world"] == {"sprite_scale": 1.0} and np.isfinite(r["loss"]) and 0 <= r["top1"] <= 1 and r["command"]
    for k in ("background", "colour"):
        real = [r["loss"] for r in rows if r["kind"] == k and r["condition"] == "real"]
        assert real[0] == pytest.approx(real[1], abs=1e-6)
    assert "background" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", str(SHIPPED), "--per-kind", "5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", str(SHIPPED), "--world", "sprite_scale"])
