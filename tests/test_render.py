"""bench/render.py: BENCHMARKS.md's rendered tables are exactly what their records give (filters, a rerun
replacing its earlier line, order, formats), a broken recipe names its table, and the committed
BENCHMARKS.md is up to date with the committed bench/results."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import render  # noqa: E402

RECIPE = {"file": "s.jsonl", "where": {"study": "sweep", "cfg.tree": ["6-2-2", "chain3"]}, "since": "2026-12-01",
          "key": ["length_s", "method"], "sort": ["length_s", "method"],
          "cols": [["length", "length_s", "{} s"], ["method", "method"], ["τ", "tau", "{:.2f}"],
                   ["share", "share", "{:.1%}"], ["per depth", "acc", "{:.2f}"], ["tok", "tokens", "{:,}"], ["=", "same"]]}


def _records():
    base = {"study": "sweep", "date": "2026-12-06 10:00 UTC", "cfg": {"tree": "6-2-2"}, "share": 0.25,
            "acc": [0.9, 0.5], "tokens": 12345}
    return [
        {**base, "length_s": 32, "method": "sparrow", "tau": 2.0, "same": True},
        {**base, "length_s": 8, "method": "sparrow", "tau": 9.0},           # replaced by the rerun below
        {**base, "length_s": 8, "method": "msd", "tau": 3.0, "tokens": None},
        {**base, "length_s": 8, "method": "sparrow", "tau": 2.5},           # the rerun wins
        {**base, "length_s": 8, "method": "eagle", "tau": 7.0, "date": "2026-11-29 10:00 UTC"},  # too old
        {**base, "length_s": 8, "method": "pruned", "tau": 7.0, "cfg": {"tree": "48-5-10"}},     # other tree
        {**base, "length_s": 8, "method": "ar", "tau": 7.0, "study": "other"},
    ]


def _doc(tmp_path, recipe=RECIPE, body="stale\n"):
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    doc = tmp_path / "B.md"
    doc.write_text(f"# B\nprose\n<!-- render {json.dumps(recipe)} -->\n{body}<!-- /render -->\nmore prose\n")
    return doc


def test_table_is_what_the_records_give(tmp_path):
    doc = _doc(tmp_path)
    assert render.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 1
    assert render.main(["--doc", str(doc), "--results", str(tmp_path)]) == 0
    text = doc.read_text()
    assert text.startswith("# B\nprose\n<!-- render ") and text.endswith("<!-- /render -->\nmore prose\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows == ["| length | method | τ | share | per depth | tok | = |",
                    "| 8 s | msd | 3.00 | 25.0% | 0.90 0.50 | — | — |",
                    "| 8 s | sparrow | 2.50 | 25.0% | 0.90 0.50 | 12,345 | — |",
                    "| 32 s | sparrow | 2.00 | 25.0% | 0.90 0.50 | 12,345 | yes |"]
    assert render.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 0  # idempotent


@pytest.mark.parametrize("change, words", [({"file": "missing.jsonl"}, "no such results file"),
                                           ({"where": {"study": "nothing"}}, "no record matches"),
                                           ({"cols": [["x"]]}, "IndexError")])
def test_broken_recipe_names_its_table(tmp_path, capsys, change, words):
    doc = _doc(tmp_path, {**RECIPE, **change})
    assert render.main(["--doc", str(doc), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rendered table 1 (line 3)" in err and words in err


def test_committed_benchmarks_are_rendered_from_committed_results():
    assert render.main(["--check"]) == 0


def test_until_freezes_a_table_against_later_runs(tmp_path):
    recipe = {**RECIPE, "until": "2026-12-06 10:00 UTC"}  # the 2026-12-06 records and later are left out
    assert render.select(_records(), {**recipe, "since": None}) == [r for r in _records() if r["method"] == "eagle"]
    assert render.select(_records(), recipe) == []


def test_explode_nested_results_into_rows(tmp_path):
    rec = {"bench": "reads", "date": "2026-12-06", "target": "t",
           "results": {"32": {"real": {"score": 0.5}, "blank": {"score": 0.25}}, "8": {"real": {"score": 0.75}}}}
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    recipe = {"file": "r.jsonl", "where": {"bench": "reads"}, "explode": {"path": "results", "as": ["len", "cond"]},
              "sort": ["len", "cond"], "cols": [["len", "len"], ["video", "cond"], ["score", "score", "{:.2f}"],
                                                ["target", "record.target"]]}
    body = render.table(recipe, tmp_path).splitlines()
    assert body[2:] == ["| 8 | real | 0.75 | t |", "| 32 | blank | 0.25 | t |", "| 32 | real | 0.50 | t |"]


def test_explode_a_list_of_rows(tmp_path):
    rec = {"bench": "intern", "rows": [{"x": 0, "same": 0.0}, {"x": 1, "same": 0.5}]}
    (tmp_path / "i.jsonl").write_text(json.dumps(rec) + "\n")
    recipe = {"file": "i.jsonl", "explode": {"path": "rows", "as": []}, "cols": [["x", "x"], ["same", "same", "{:.2f}"]]}
    assert render.table(recipe, tmp_path).splitlines()[2:] == ["| 0 | 0.00 |", "| 1 | 0.50 |"]
