"""Plot τ and DSR vs visual length (the paper's Figure 1 shape) from length-sweep records, without decoding
anything: the newest record per (length, method, temperature) among those of the given target keys and
dates, drawn by `length_sweep.plot` (T = 0 solid, T > 0 dashed). Needs matplotlib (`pip install -e ".[bench]"`).

  python bench/plot_length_sweep.py --key 228b8d9fc6a22bcf:0 --key 1d956f4911b98b65:1 --since "2026-12-06 20:5"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import length_sweep  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", default=str(HERE / "results" / "length_sweep.jsonl"))
    ap.add_argument("--key", action="append", required=True, metavar="TARGET_KEY:TEMPERATURE",
                    help="records of this target key (length_sweep's target_key) at this temperature; repeatable")
    ap.add_argument("--since", default="", help="only records dated on or after this ('YYYY-MM-DD HH:MM')")
    ap.add_argument("--out", default=str(HERE / "results" / "length_sweep.png"))
    args = ap.parse_args(argv)
    wanted = set()
    for spec in args.key:
        key, sep, temp = spec.rpartition(":")
        try:
            wanted.add((key, float(temp)))
        except ValueError:
            ap.error(f"--key {spec!r}: expected TARGET_KEY:TEMPERATURE, e.g. 228b8d9fc6a22bcf:0")
    newest = {}
    for line in Path(args.jsonl).read_text().splitlines():
        r = json.loads(line)
        if (r.get("target_key"), r.get("temperature")) in wanted and str(r.get("date", "")) >= args.since:
            newest[(r["length_s"], r["method"], r["temperature"])] = r
    if not newest:
        ap.error(f"{args.jsonl}: no record matches --key {args.key} --since {args.since!r}")
    length_sweep.plot(list(newest.values()), args.out)
    print(f"[plot] {len(newest)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
