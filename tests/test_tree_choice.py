"""The stored tree choice (`<draft>/tree_choice.json`, decoding/tree_choice.py): bucket selection, the
fallback to the default tree without a file or for another backend, one-line errors for a malformed file;
`decode.py --tree auto` decodes with the stored tree; bench/tree_search.py's fast mode writes a choice
that reads back."""

import copy
import json
import shutil
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding import tree_choice as tc
from sparrow_jax.decoding.tree import TreeSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUCKETS = [{"max_visual_tokens": 512, "tree": "24-5-6"}, {"max_visual_tokens": 128, "tree": "chain4"},
           {"max_visual_tokens": 16384, "tree": "60-6-10"}]


def write_choice(d: Path, backend=None, buckets=BUCKETS, **extra) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / tc.FILE_NAME
    p.write_text(json.dumps({"backend": backend or jax.default_backend(), "buckets": buckets, **extra}))
    return p


@pytest.mark.parametrize("n, tree", [(0, "chain4"), (100, "chain4"), (128, "chain4"), (129, "24-5-6"),
                                     (512, "24-5-6"), (4096, "60-6-10"), (16384, "60-6-10"), (99999, "60-6-10")])
def test_pick_bucket_is_the_smallest_holding_the_count_else_the_largest(n, tree):
    assert tc.pick_bucket(BUCKETS, n)["tree"] == tree


def test_auto_tree_reads_the_choice_for_the_prompt_length(tmp_path):
    write_choice(tmp_path)
    for n, want in ((128, "chain4"), (300, "24-5-6"), (10**6, "60-6-10")):
        tree, note = tc.auto_tree(tmp_path, n, jax.default_backend())
        assert tree == TreeSpec.parse(want) and want in note and str(tmp_path / tc.FILE_NAME) in note


def test_auto_tree_falls_back_to_the_default_with_the_reason(tmp_path):
    default = TreeSpec.parse(tc.DEFAULT_TREE)
    tree, note = tc.auto_tree(None, 128, "cpu")
    assert tree == default and "random draft" in note
    tree, note = tc.auto_tree(tmp_path, 128, "cpu")  # no file
    assert tree == default and f"no {tmp_path / tc.FILE_NAME}" in note and "bench/tree_search.py" in note
    write_choice(tmp_path, backend="tpu")
    tree, note = tc.auto_tree(tmp_path, 128, "cpu")
    assert tree == default and "backend tpu, this is cpu" in note and "\n" not in note


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"buckets": BUCKETS}), "'backend'"),
    (json.dumps({"backend": "cpu", "buckets": []}), "'buckets' must be a non-empty list"),
    (json.dumps({"backend": "cpu", "buckets": [{"max_visual_tokens": "128", "tree": "chain4"}]}),
     "buckets[0]: 'max_visual_tokens'"),
    (json.dumps({"backend": "cpu", "buckets": [{"max_visual_tokens": 128}]}), "buckets[0]: 'tree'"),
    (json.dumps({"backend": "cpu", "buckets": [{"max_visual_tokens": 128, "tree": "48-5"}]}),
     "buckets[0]: tree '48-5'"),
    (json.dumps({"backend": "cpu", "buckets": BUCKETS + [{"max_visual_tokens": 128, "tree": "chain2"}]}),
     "max_visual_tokens 128 appears twice"),
])
def test_malformed_file_is_a_one_line_error_naming_it(tmp_path, content, says):
    p = tmp_path / tc.FILE_NAME
    p.write_text(content)
    with pytest.raises(tc.TreeChoiceError) as e:
        tc.auto_tree(tmp_path, 128, "cpu")
    msg = str(e.value)
    assert str(p) in msg and says in msg and "\n" not in msg


def test_write_then_read_round_trips_sorted(tmp_path):
    choice = {"backend": "cpu", "buckets": copy.deepcopy(BUCKETS), "command": "x"}
    tc.write(tmp_path / "sub" / tc.FILE_NAME, choice)
    back = tc.read(tmp_path / "sub" / tc.FILE_NAME)
    assert [b["max_visual_tokens"] for b in back["buckets"]] == [128, 512, 16384] and back["command"] == "x"
    with pytest.raises(tc.TreeChoiceError):
        tc.write(tmp_path / "bad.json", {"backend": "cpu", "buckets": [{"max_visual_tokens": 1, "tree": "0-0-0"}]})
    assert not (tmp_path / "bad.json").exists()


# ------------------------------------------------------------------------------------------ decode.py


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from sparrow_jax.io.draft_checkpoint import save_draft
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft

    d = tmp_path_factory.mktemp("auto")
    cfg, video = _tiny.write_cli_files(d, num_frames=4)
    save_draft(SparrowDraft(DraftConfig.for_target(_tiny.our_config()), rngs=nnx.Rngs(3)), d / "draft")
    return d, cfg, video


def test_decode_tree_auto_uses_the_stored_choice(cli_files, capsys):
    import decode

    d, cfg, video = cli_files
    # The clip has a few visual tokens: the first bucket holds it (the second would be the fallback).
    write_choice(d / "draft", buckets=[{"max_visual_tokens": 1000, "tree": "6-2-2"},
                                       {"max_visual_tokens": 5000, "tree": "chain3"}])
    out = d / "out.jsonl"
    decode.main(["--config", str(cfg), "--video", str(video), "--prompt", "What moves?", "--max-pixels",
                 str(56 * 56), "--max-new-tokens", "4", "--draft", str(d / "draft"), "--no-stream",
                 "--jsonl", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["tree"] == "6-2-2" and row["max_draft_tokens"] == 3 and 0 < row["visual_tokens"] <= 1000
    assert "--tree auto: 6-2-2 from" in capsys.readouterr().out


def test_decode_tree_auto_with_a_malformed_choice_fails_in_one_line(cli_files, capsys):
    import decode

    d, cfg, video = cli_files
    bad = d / "bad_draft"
    shutil.copytree(d / "draft", bad)
    (bad / tc.FILE_NAME).write_text(json.dumps({"backend": jax.default_backend(), "buckets": "all"}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        decode.main(["--config", str(cfg), "--video", str(video), "--max-pixels", str(56 * 56), "--max-new-tokens",
                     "2", "--draft", str(bad), "--tree", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and str(bad / tc.FILE_NAME) in err[0] and "'buckets'" in err[0]


# ------------------------------------------------------------------------------------------ the bench


@pytest.mark.slow
def test_tree_search_fast_mode_writes_a_choice_decode_can_read(tmp_path):
    """bench/tree_search.py on a tiny random target with the world's tokenizer (4 s videos, 64 visual
    tokens), a random draft and two candidates: a JSON line per bucket, every candidate's output equal to
    AR's, and a tree_choice.json that tree_choice.read accepts and auto_tree picks from."""
    sys.path.insert(0, str(ROOT / "bench"))
    import tree_search

    from sparrow_jax.io.hf_checkpoint import save_qwen2_5_vl
    from sparrow_jax.models import registry

    shipped = ROOT / "shipped" / "tiny-qwen2.5-vl"
    d = json.loads((shipped / "config.json").read_text())
    d["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    d["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                              fullatt_block_indexes=[0])
    cfg = registry.config_from_dict(d, "tiny")
    target = tmp_path / "target"
    save_qwen2_5_vl(registry.build_target(cfg, rngs=nnx.Rngs(0)), target)
    for name in ("tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json",
                 "preprocessor_config.json"):
        shutil.copy(shipped / name, target / name)
    out, jsonl = tmp_path / "choice" / tc.FILE_NAME, tmp_path / "ts.jsonl"
    recs = tree_search.main(["--target", str(target), "--draft", "random", "--lengths", "4", "--scenes", "1",
                             "--candidates", "4-1-2,chain2", "--max-new-tokens", "4", "--out", str(out),
                             "--jsonl", str(jsonl), "--no-progress"])
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(recs) == len(lines) == 1 and lines[0]["visual_tokens"] == 64
    assert [r["tree"] for r in lines[0]["rows"]] == ["4-1-2", "chain2"]
    assert all(r["outputs_identical_to_ar"] and r["tokens_per_s"] > 0 and r["tau"] >= 1 for r in lines[0]["rows"])
    choice = tc.read(out)
    assert choice["backend"] == jax.default_backend() and choice["buckets"][0]["max_visual_tokens"] == 64
    tree, _ = tc.auto_tree(out.parent, 64, jax.default_backend())
    assert str(tree) == str(TreeSpec.parse(lines[0]["chosen"])) and lines[0]["chosen"] in ("4-1-2", "chain2")
