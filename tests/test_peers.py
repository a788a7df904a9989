"""bench/peers.py --fast end to end on a tiny Qwen2.5-VL written by transformers' save_pretrained: every
method (transformers greedy, prompt lookup, a truncated-target assistant; our AR and a random Sparrow
draft) writes its JSON line with positive speeds, our AR's greedy tokens equal transformers' on this fp32
checkpoint, transformers' assisted outputs equal its greedy ones, and our Sparrow equals our AR."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import _tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

METHODS = ["hf_generate", "hf_lookup", "hf_assistant", "ar", "sparrow"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("peers")
    _tiny.save_hf_checkpoint(d / "ckpt", _tiny.BASE_HF_CONFIG, seed=3)
    out = d / "peers.jsonl"
    rows = peers.main(["--fast", "--target", str(d / "ckpt"), "--random-draft", "sparrow", "--assistant-layers", "1",
                       "--lookup-tokens", "3", "--settle", "0", "--jsonl", str(out), "--no-progress"])
    return rows, [json.loads(x) for x in out.read_text().splitlines()]


def test_every_method_has_a_row_with_positive_speeds(run):
    rows, lines = run
    assert [r["method"] for r in lines] == METHODS == [r["method"] for r in rows]
    n = peers.FAST["max_new_tokens"]
    for r in lines:
        assert {"command", "machine", "date", "jax", "flax", "torch", "transformers", "torch_threads"} <= set(r)
        assert r["study"] == "peers" and r["target"] == "target" and r["length_s"] == peers.FAST["lengths"][0]
        assert r["new_tokens"] == n and [len(t) for t in r["tokens"]] == [n]
        assert r["decode_tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["e2e_tokens_per_s"] < r["decode_tokens_per_s"]
    by = {r["method"]: r for r in lines}
    assert by["ar"]["ratio"]["vs"] == "hf_generate"
    assert by["sparrow"]["ratio"]["vs"] in ("hf_lookup", "hf_assistant") and by["sparrow"]["tree"] == "6-2-2"
    assert all(by[m]["ratio"]["decode"] > 0 for m in ("ar", "sparrow"))
    assert "prompt lookup" in by["hf_lookup"]["assistant"] and "first 1 of 3" in by["hf_assistant"]["assistant"]


def test_outputs_agree(run):
    _, lines = run
    by = {r["method"]: r for r in lines}
    # fp32 on both sides: our AR is transformers' greedy decode token for token
    assert by["ar"]["tokens"] == by["hf_generate"]["tokens"] and by["ar"]["vs_hf_generate"]["identical"]
    for m in ("hf_lookup", "hf_assistant"):  # transformers' assisted decoding is lossless too
        assert by[m]["tokens"] == by["hf_generate"]["tokens"] and by[m]["vs_hf_generate"]["identical"]
    assert by["sparrow"]["tokens"] == by["ar"]["tokens"] and by["sparrow"]["vs_ours_ar"]["identical"]
    assert by["sparrow"]["tau"] >= 1.0 and by["sparrow"]["tokens_per_target_call"] == by["sparrow"]["tau"]


def test_bad_arguments_are_usage_errors(capsys):
    for argv, words in ((["--draft", "eagle=/x"], "eagle"), (["--draft", "sparrow"], "NAME=DIR"),
                        (["--lengths", "8,x"], "--lengths"), (["--scenes", "0"], "--scenes"),
                        (["--target", "/nonexistent"], "config.json"), (["--tree", "1-2"], "--tree")):
        with pytest.raises(SystemExit) as e:
            peers.parse_args(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
