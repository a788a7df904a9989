"""`python decode.py` with no arguments (synthetic/demo.py): what it picks with and without the shipped
weights, the held-out world sample it generates, and (slow) the whole run end to end."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sparrow_jax.synthetic import demo
from sparrow_jax.synthetic import world as W

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decode  # noqa: E402


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """demo's shipped directories moved to tmp_path: the tokenizer and preprocessor files only (no
    weights yet), as in a fresh clone before training."""
    import shutil

    target, drafts = tmp_path / "tiny-qwen2.5-vl", tmp_path / "drafts"
    target.mkdir()
    for f in demo.SHIPPED_TARGET.glob("*.json"):
        if f.name != "config.json" and f.name != "generation_config.json":
            shutil.copy(f, target / f.name)
    monkeypatch.setattr(demo, "SHIPPED_TARGET", target)
    monkeypatch.setattr(demo, "SHIPPED_DRAFTS", drafts)
    return target, drafts


def _fake_weights(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")


def _resolve(argv, monkeypatch=None):
    args = decode.parse_args(argv)
    sample, notes = demo.resolve_defaults(args)
    return args, sample, notes


def test_no_weights_no_inputs_falls_back_to_a_random_target(shipped):
    target, _ = shipped
    args, sample, notes = _resolve([])
    assert args.target is None and args.config == str(demo.DEFAULT_CONFIG) and args.tokenizer == str(target)
    assert "random-initialised" in notes[0] and "train_reading_target.sh" in notes[0]
    assert sample is not None and sample.path.is_file() and args.video == [str(sample.path)]
    assert args.prompt == [demo.QUESTION] and sample.scene.seed in W.split_seeds("test", 1)
    assert args.compare_ar and args.max_new_tokens == demo.MAX_NEW_TOKENS[False] and args.repeats == 3
    # a random target reads the video as the shipped one would
    assert (args.min_pixels, args.max_pixels, args.fps) == (112 * 112, 112 * 112, 2.0)


def test_shipped_target_and_draft_are_the_defaults(shipped):
    target, drafts = shipped
    _fake_weights(target)
    _fake_weights(drafts / "sparrow")
    args, sample, notes = _resolve(["--long"])
    assert args.target == str(target) and args.draft == str(drafts / "sparrow") and args.config is None
    assert args.min_pixels is None, "the shipped target's own video_preprocessor_config.json decides"
    assert sample.scene.duration == W.LENGTHS["16k"] and args.repeats == 1
    assert args.max_new_tokens == demo.MAX_NEW_TOKENS[True]
    args, _, notes = _resolve(["--mode", "full_visual"])
    assert args.draft is None and any("no shipped draft for --mode full_visual" in n for n in notes)
    _fake_weights(drafts / "msd")
    assert _resolve(["--mode", "full_visual"])[0].draft == str(drafts / "msd")


def test_explicit_arguments_win(shipped, tmp_path):
    target, drafts = shipped
    _fake_weights(target)
    _fake_weights(drafts / "sparrow")
    video = tmp_path / "v.mp4"
    args, sample, notes = _resolve(["--video", str(video), "--prompt", "Hi?", "--draft", "x", "--long"])
    assert sample is None and args.video == [str(video)] and args.draft == "x" and args.target == str(target)
    assert not args.compare_ar and args.max_new_tokens == 32 and args.repeats == 3
    assert any("--long" in n for n in notes)
    args, _, _ = _resolve(["--config", "c.json", "--no-compare-ar", "--max-new-tokens", "5"])
    assert args.target is None and args.config == "c.json" and not args.compare_ar and args.max_new_tokens == 5


def test_sample_is_deterministic_and_matches_the_world():
    a, b = demo.make_sample(), demo.make_sample()
    assert a.path != b.path and a.path.read_bytes() == b.path.read_bytes()
    wcfg = demo.world_config()  # the shipped target's world (its world.json on the default rendering)
    assert dataclasses.replace(wcfg, **{k: getattr(W.WorldConfig(), k) for k in W.SCENE_FIELDS}) == W.WorldConfig()
    assert a.scene == W.make_scene(demo.SAMPLE_SEED, 8, wcfg)
    assert W.score_caption(a.scene, a.truth())["overall"] == 1.0 and "caption score 1.00" in a.score(a.truth())


@pytest.mark.slow
def test_decode_py_without_inputs_runs_the_demo(shipped, tmp_path, capsys):
    """The README's first command (shortened): the world sample, streamed answer, AR compared, outputs
    identical, the scene's truth and score printed."""
    out = tmp_path / "o.jsonl"
    decode.main(["--max-new-tokens", "8", "--repeats", "1", "--tree", "10-3-3", "--jsonl", str(out)])
    text = capsys.readouterr().out
    assert "held-out world scene" in text and "streamed" in text and "outputs identical to AR" in text
    assert "caption score" in text and "truth:" in text
    row = json.loads(out.read_text())
    assert row["outputs_identical_to_ar"] and row["prompt"] == demo.QUESTION and row["visual_tokens"] == 128
