"""decode.py end to end on a tiny config: real video file in, JSON lines out, speculative output equal
to AR, clear errors for bad inputs and for a draft that does not fit the target."""

import json
import sys
from pathlib import Path

import pytest
from flax import nnx

import _tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decode  # noqa: E402
from sparrow_jax.io.draft_checkpoint import save_draft  # noqa: E402
from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: E402


def error_of(argv, capsys):
    """Run decode.py expecting a refusal: (exit code, the stderr message line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        decode.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decode.py: error: "), err
    return e.value.code, err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return (d, *_tiny.write_cli_files(d))


def test_sparrow_mode_with_compare_ar_writes_jsonl(files, capsys):
    d, cfg, video = files
    out = d / "out.jsonl"
    decode.main(["--config", str(cfg), "--video", str(video), "--prompt", "What moves?", "--video", str(video),
                 "--prompt", "Colours?", "--max-pixels", str(56 * 56), "--max-new-tokens", "6", "--tree", "10-3-3",
                 "--compare-ar", "--repeats", "2", "--profile", "--jsonl", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1]
    for r in rows:
        assert r["outputs_identical_to_ar"] is True and r["timed_runs"] == 2 and r["max_draft_tokens"] == 4
        assert r["mode"] == "sparrow" and r["visual_tokens"] > 0 and len(r["tokens"]) == 6
        assert r["tau"] >= 1.0 and r["DSR"] > 0 and r["ESR"] > 0
        assert r["draft_s_per_round"] > 0 and r["verify_s_per_round"] > 0
    assert "DSR" in capsys.readouterr().out


def test_bad_video_is_a_one_line_error(files, capsys):
    d, cfg, _ = files
    bad = d / "broken.mp4"
    bad.write_bytes(b"not a video")
    code, msg = error_of(["--config", str(cfg), "--video", str(bad), "--max-new-tokens", "2"], capsys)
    assert code == 1 and "broken.mp4" in msg


def test_draft_that_does_not_fit_is_refused(files, capsys):
    d, cfg, video = files
    wrong = SparrowDraft(DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=_tiny.VOCAB), rngs=nnx.Rngs(0))
    save_draft(wrong, d / "wrong_draft")
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--draft", str(d / "wrong_draft"),
                          "--max-new-tokens", "2"], capsys)
    assert code == 1 and "hidden size 32" in msg


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        decode.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--compare-ar" in out and "--repeats" in out and "--m-star" in out
    assert "DEPTH+1 draft tokens" in " ".join(out.split()), "--help must state the EAGLE-2 tree notation"


def test_first_mismatch():
    import numpy as np

    a = np.asarray([[1, 2, 3, 0], [4, 5, 6, 7]])
    assert decode.first_mismatch(a, [3, 4], a.copy(), [3, 4]) is None
    b = a.copy()
    b[1, 2] = 9
    assert decode.first_mismatch(a, [3, 4], b, [3, 4]) == (1, 2, 6, 9)
    assert decode.first_mismatch(a, [3, 4], a, [2, 4]) == (0, 2, 3, None)  # one run stopped earlier


def test_compare_ar_refuses_to_report_speedups_for_different_outputs(files, capsys, monkeypatch):
    """A speculative run whose output differs from AR: the first mismatch is printed, no DSR/ESR, exit 1."""
    import dataclasses

    from sparrow_jax.decoding import engine as E

    real = E.speculative_generate

    def corrupted(*args, **kw):
        res = real(*args, **kw)
        return dataclasses.replace(res, tokens_BM=res.tokens_BM.at[0, 2].add(1))

    monkeypatch.setattr(E, "speculative_generate", corrupted)
    d, cfg, video = files
    with pytest.raises(SystemExit) as e:
        decode.main(["--config", str(cfg), "--video", str(video), "--prompt", "What moves?", "--max-pixels",
                     str(56 * 56), "--max-new-tokens", "4", "--tree", "10-3-3", "--compare-ar", "--repeats", "1"])
    captured = capsys.readouterr()
    out = captured.out
    assert e.value.code == 1 and "row 0, position 2" in captured.err and "MISMATCH" in out
    assert "-> DSR" not in out, "no speedup may be printed for different outputs"


def test_m_star_outside_the_stack_is_refused(files, capsys):
    d, cfg, video = files
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--max-new-tokens", "2", "--m-star", "99"],
                         capsys)
    assert code == 2 and "--m-star 99" in msg


def test_prompt_over_context_is_refused(files, tmp_path, capsys):
    d, cfg, video = files
    small = json.loads(cfg.read_text())
    small["text_config"]["max_position_embeddings"] = 40
    p = tmp_path / "short_ctx.json"
    p.write_text(json.dumps(small))
    for mode in ("ar", "sparrow"):
        code, msg = error_of(["--config", str(p), "--video", str(video), "--max-pixels", str(56 * 56), "--mode", mode,
                              "--max-new-tokens", "8", "--tree", "10-3-3"], capsys)
        assert code == 1 and "over the target's context of 40 positions" in msg and "prompt 0" in msg
