"""bench/length_sweep.py end to end on a random tiny target: one held-out 8 s world scene, AR and a random
Sparrow-view draft; the JSON lines carry the sweep's fields, the speculative output equals AR's token for
token, and a second call resumes from the per-scene results without running anything."""

import json
import sys
from pathlib import Path

import pytest

import _tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import length_sweep  # noqa: E402


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    cfg = d / "tiny_config.json"
    cfg.write_text(json.dumps(_tiny.BASE_HF_CONFIG))
    argv = ["--config", str(cfg), "--lengths", "8", "--scenes", "1", "--max-new-tokens", "8", "--tree", "6-2-2",
            "--random-draft", "sparrow", "--work", str(d / "work"), "--jsonl", str(d / "out.jsonl"), "--no-progress"]
    rows = length_sweep.main(argv)
    return d, argv, rows


def test_rows_carry_the_sweep_fields_and_sparrow_equals_ar(sweep):
    d, _, rows = sweep
    lines = [json.loads(x) for x in (d / "out.jsonl").read_text().splitlines()]
    assert [r["method"] for r in lines] == ["ar", "sparrow"] == [r["method"] for r in rows]
    for r in lines:
        assert {"command", "machine", "date", "jax", "flax", "commit", "definitions"} <= set(r)
        assert r["study"] == "length_sweep" and r["length_s"] == 8 and r["temperature"] == 0.0
        assert r["visual_tokens"] == 128 and r["new_tokens"] == 8 and r["scenes"] == 1
        assert r["DSR"] > 0 and r["ESR"] > 0 and 0 < r["prefill_share_ar"] < 1
    ar, sp = lines
    assert ar["tau"] == 1.0 and ar["DSR"] == 1.0
    assert sp["identical_to_ar"] is True and sp["mode"] == "text_only" and sp["tree"] == "6-2-2"
    assert sp["tau"] >= 1.0 and len(sp["acceptance_per_depth"]) == 3 and sp["rounds"] >= 1
    work = [json.loads(x) for x in next((d / "work").glob("*.jsonl")).read_text().splitlines()]
    by_method = {r["method"]: r for r in work}
    assert by_method["sparrow"]["tokens"] == by_method["ar"]["tokens"] and len(by_method["ar"]["tokens"]) == 8


def test_second_call_resumes_without_running(sweep, monkeypatch):
    d, argv, rows = sweep

    def refuse(*a, **k):
        raise AssertionError("a finished scene was run again")

    monkeypatch.setattr(length_sweep.Decoders, "run", refuse)
    again = length_sweep.main(argv)
    assert [(r["method"], r["tau"], r["DSR"]) for r in again] == [(r["method"], r["tau"], r["DSR"]) for r in rows]


def test_bad_arguments_are_usage_errors(capsys):
    for argv, words in ((["--draft", "nope=/x"], "nope"), (["--draft", "sparrow"], "NAME=DIR"),
                        (["--trees", "8:1-2"], "--trees"), (["--scenes", "1,2", "--lengths", "8"], "--scenes"),
                        (["--random-draft", "nope:x"], "NAME:LABEL"), (["--random-draft", "sparrow:"], "NAME:LABEL")):
        with pytest.raises(SystemExit) as e:
            length_sweep.parse_args(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_labelled_method_is_a_draft_of_its_method():
    """An ablation draft runs as NAME:LABEL, in NAME's decode mode, beside NAME itself."""
    args = length_sweep.parse_args(["--random-draft", "sparrow,sparrow:mtp_only"])
    assert set(args.methods) == {"sparrow", "sparrow:mtp_only"}
