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
        assert real[0] == pytest.approx(real[1], rel=1e-5)  # fp32 summation order
    assert "background" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", str(SHIPPED), "--per-kind", "5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", str(SHIPPED), "--world", "sprite_scale"])


def test_content_tokens_are_the_world_attribute_words():
    import answer_loss_by_kind as bench
    from sparrow_jax.io.text import load_codec
    from sparrow_jax.synthetic import world

    codec = load_codec(str(SHIPPED), 1024)
    content = bench.content_token_ids(codec, 1024)
    scene = world.make_scene(10_000_001, 8)
    said = [codec.decode([t]).strip() for t in codec.encode(world.caption(scene)) if content[t]]
    obj = scene.objects[0]
    assert scene.background in said and obj.colour in said and obj.size in said
    assert not {"the", "video", "seconds", "background", "object"} & set(said)


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped target absent")
def test_caption_probe_reports_content_loss(tmp_path):
    import answer_loss_by_kind as bench

    out = tmp_path / "probe.jsonl"
    bench.main(["--target", str(SHIPPED), "--kinds", "caption", "--per-kind", "8", "--content", "--by-word",
                "--conditions", "real,blank", "--jsonl", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["condition"] for r in rows] == ["real", "blank"]
    for r in rows:
        # a caption names at least a background, a size, a colour and a shape per video
        assert r["kind"] == "caption" and r["content_tokens"] >= 4 * 8
        assert np.isfinite(r["content_loss"]) and 0 <= r["content_top1"] <= 1
        # per word: counts add up to the content tokens, and their weighted mean is the content loss
        n = sum(c for c, _ in r["by_word"].values())
        assert n == r["content_tokens"]
        assert sum(c * v for c, v in r["by_word"].values()) / n == pytest.approx(r["content_loss"], rel=1e-4)


def test_motion_words_are_the_world_motion_words():
    """world.MOTION_WORDS (part of the attribute words the probe counts) names each motion in the world's
    own texts: every motion's caption phrases or answer contain one of them, and none is stale."""
    from sparrow_jax.synthetic import world

    texts = {m: " ".join([*world._MOTION_TEXT[m], world._MOTION_ANSWER[m]]).lower().replace(".", " ").split()
             for m in world.MOTIONS}
    assert all(set(t) & world.MOTION_WORDS for t in texts.values())
    assert world.MOTION_WORDS - set(world.MOTIONS) <= {w for t in texts.values() for w in t}
    assert world.MOTION_WORDS <= world.ATTRIBUTE_WORDS
