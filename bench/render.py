"""Render BENCHMARKS.md's tables from the benches' JSON lines (issue 11): every figure in a rendered table
comes from a record in bench/results/, never typed by hand. Prose stays hand-written around the tables.

A rendered table sits between two markers; the opening marker holds its recipe as JSON:

  <!-- render {"file": "length_sweep.jsonl", "where": {"target_key": "d6920c559d41d82a"},
               "key": ["length_s", "method", "temperature"], "sort": ["length_s", "method"],
               "cols": [["length", "length_s", "{} s"], ["τ", "tau", "{:.2f}"], ["DSR", "DSR", "{:.2f}"]]} -->
  | length | τ | DSR |
  ...
  <!-- /render -->

- file: a JSON-lines file under bench/results/; where: field = value filters (dotted paths reach into nested
  records, e.g. "ar.tokens_per_s"; a list value = one of); since: keep records whose "date" is on or after it;
  until: keep those dated before it (a table that must not change when later runs are appended).
- key: fields that name one row; a later record with the same key replaces the earlier (a rerun wins).
- explode: {"path": "results", "as": ["length", "condition"]} makes one row per leaf of a record's nested
  dict at that path (two levels here; a list at any level gives one row per item, e.g. {"path": "rows",
  "as": []}), the keys bound to the names in "as" (numeric keys as numbers) and the
  record's own fields under "record." (filters apply to records, before exploding).
- row_where: with explode, field = value filters on the exploded rows (the record's fields are under "record.").
- sort: fields to order rows by (default: file order); cols: [header, field, format] (format a str.format
  pattern, default "{}"; "{:%}"-style and "{:,}" work; a missing field renders as "—", a bool as yes/no;
  a list renders its items formatted and space-separated).

  python bench/render.py            # rewrite BENCHMARKS.md's rendered tables in place
  python bench/render.py --check    # exit 1 if any rendered table differs from its records (CI-safe)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- render (\{.*?\}) -->\n)(.*?)(<!-- /render -->)", re.S)


class RenderError(ValueError):
    """A recipe that cannot be rendered (names the table by its position and the problem)."""


def field(record: dict, path: str):
    """record["a"]["b"] for "a.b"; None when any step is missing."""
    x = record
    for part in path.split("."):
        if not isinstance(x, dict) or part not in x:
            return None
        x = x[part]
    return x


def fmt(value, pattern: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return " ".join(fmt(v, pattern) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return pattern.format(value)


def select(records: list[dict], recipe: dict) -> list[dict]:
    where, since, until = recipe.get("where", {}), recipe.get("since"), recipe.get("until")
    rows = []
    for r in records:
        ok = all((field(r, k) in v) if isinstance(v, list) else field(r, k) == v for k, v in where.items())
        date = str(r.get("date", ""))
        if ok and (since is None or date >= since) and (until is None or date < until):
            rows.append(r)
    if recipe.get("key"):
        by_key = {}
        for r in rows:
            by_key[tuple(json.dumps(field(r, k)) for k in recipe["key"])] = r  # later wins, first position kept
        rows = list(by_key.values())
    if recipe.get("sort"):
        rows.sort(key=lambda r: tuple((field(r, k) is None, field(r, k)) for k in recipe["sort"]))
    return rows


def _number(key: str):
    try:
        return int(key)
    except ValueError:
        try:
            return float(key)
        except ValueError:
            return key


def explode(records: list[dict], spec: dict) -> list[dict]:
    """One row per leaf `depth` levels down record[spec["path"]], keyed as spec["as"] names."""
    names, out = list(spec["as"]), []

    def walk(node, bound, record):
        if isinstance(node, list):  # a list of rows: each item is a row (or a dict to walk further)
            for item in node:
                walk(item, bound, record)
            return
        if len(bound) == len(names):
            out.append({**(node if isinstance(node, dict) else {"value": node}), **bound, "record": record})
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, {**bound, names[len(bound)]: _number(k)}, record)

    for r in records:
        walk(field(r, spec["path"]), {}, r)
    return out


def table(recipe: dict, results: Path = RESULTS) -> str:
    path = results / recipe["file"]
    if not path.is_file():
        raise RenderError(f"{path}: no such results file")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = select(records, {k: v for k, v in recipe.items() if k not in ("key", "sort")} if "explode" in recipe else recipe)
    if not rows:
        raise RenderError(f"{path}: no record matches where={recipe.get('where')} since={recipe.get('since')}")
    if "explode" in recipe:
        rows = select(explode(rows, recipe["explode"]),
                      {"where": recipe.get("row_where", {}), "key": recipe.get("key"), "sort": recipe.get("sort")})
    cols = [(c[0], c[1], c[2] if len(c) > 2 else "{}") for c in recipe["cols"]]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
             "|" + "|".join("---:" if any(isinstance(field(r, f), (int, float)) for r in rows) else "---"
                            for _, f, _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(field(r, f), p) for _, f, p in cols) + " |")
    return "\n".join(lines) + "\n"


def render(text: str, results: Path = RESULTS) -> str:
    """The document with every rendered table replaced by what its recipe gives."""
    out, last = [], 0
    for n, m in enumerate(BLOCK.finditer(text), 1):
        try:
            recipe = json.loads(m.group(2))
            body = table(recipe, results)
        except (json.JSONDecodeError, KeyError, IndexError, RenderError) as e:
            line = text[:m.start()].count("\n") + 1
            raise RenderError(f"rendered table {n} (line {line}): {type(e).__name__}: {e}") from None
        out += [text[last:m.start()], m.group(1), body, m.group(4)]
        last = m.end()
    return "".join(out) + text[last:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a table is out of date")
    args = ap.parse_args(argv)
    doc = Path(args.doc)
    text = doc.read_text()
    try:
        new = render(text, Path(args.results))
    except RenderError as e:
        print(f"{doc}: {e}", file=sys.stderr)
        return 2
    tables = len(BLOCK.findall(text))
    if args.check:
        if new != text:
            print(f"{doc}: rendered tables differ from bench/results (run python bench/render.py)", file=sys.stderr)
            return 1
        print(f"{doc}: {tables} rendered table(s) up to date")
        return 0
    doc.write_text(new)
    print(f"{doc}: {tables} rendered table(s) written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
