"""Soak (issue 13): many `SpecDecoder.generate` calls in one process, as a serving loop would make them —
varied prompts, videos, batch sizes, modes and sampling settings inside the padding buckets — watching
what must not drift: XLA compilations after warm-up (goal: none) and resident memory over time (goal:
flat within 5 %). Also a free losslessness check: every greedy row of a (question, video) pair must get
the same tokens in every call, whatever its batch-mates, its mode (Sparrow or AR) or the call's position.

  python bench/soak.py                                 # 1,000 calls on the shipped target and Sparrow draft
  python bench/soak.py --calls 100 --lengths 4 --batches 1,2     # quick look

The schedule is drawn up front (seeded): per call a mode, a batch size, a video length (all rows of a call
share it: a batch of mixed lengths pads to the longest, another shape), per row a held-out test scene of
that length and one of its questions (captions and QA kinds, so prompt lengths vary), per row sampling
(greedy, or temperature / top-p / top-k drawn), and a seed. A call's compiled programs are its key: (mode, batch,
video length, prompt bucket, greedy-only or sampling — a batch whose rows are all greedy runs the greedy
program, `sampling.as_sampling`). Warm-up = one call per key of the schedule; then every call of the schedule
runs and each XLA compilation is counted (jax's compile event). RSS = resident set of the process
(/proc VmRSS, common.rss_gib) every --rss-every calls after warm-up; growth = last / first - 1 (and max / min - 1).
Results: one JSON line in --jsonl (command, machine, date, versions), per-checkpoint RSS in it, a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, rss_gib, write_jsonl  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(HERE.parent / "shipped" / "tiny-qwen2.5-vl"))
    ap.add_argument("--draft", default=str(HERE.parent / "shipped" / "drafts" / "sparrow"))
    ap.add_argument("--calls", type=int, default=1000, help="generate calls after warm-up")
    ap.add_argument("--lengths", default="4,8,16", help="video durations in seconds (world test scenes)")
    ap.add_argument("--scenes", type=int, default=4, help="held-out scenes per length")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes drawn per call")
    ap.add_argument("--modes", default="sparrow,ar", help="decode modes drawn per call")
    ap.add_argument("--greedy-share", type=float, default=0.5, help="share of rows decoded greedily")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="one value: it is a compiled shape")
    ap.add_argument("--rss-every", type=int, default=50, help="calls between RSS readings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", default=str(HERE / "results" / "soak.jsonl"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
        args.batches = [int(x) for x in args.batches.split(",") if x]
    except ValueError as e:
        ap.error(f"--lengths / --batches: comma-separated integers expected ({e})")
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.lengths or min(args.lengths) < 4:
        ap.error("--lengths: world scenes last at least 4 s (world.MIN_DURATION)")
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches: positive batch sizes")
    for name in ("calls", "scenes", "rss_every", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.greedy_share <= 1:
        ap.error("--greedy-share must be in [0, 1]")
    return args


def rss_mib() -> float:
    """Resident set size of this process now (not the peak)."""
    return rss_gib() * 1024


def draw_schedule(rng, n: int, items: dict, args) -> list[dict]:
    """n calls: mode, batch, length, per row an item index (into items[length]) and sampling, a seed."""
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415

    calls = []
    for _ in range(n):
        length = int(rng.choice(args.lengths))
        B = int(rng.choice(args.batches))
        rows, sampling = [], []
        for _ in range(B):
            rows.append(int(rng.integers(len(items[length]))))
            if rng.random() < args.greedy_share:
                sampling.append(SamplingParams())
            else:
                sampling.append(SamplingParams(float(rng.uniform(0.3, 1.5)), top_p=float(rng.choice([1.0, 0.9, 0.5])),
                                               top_k=int(rng.choice([0, 0, 5, 50]))))
        calls.append({"mode": str(rng.choice(args.modes)), "B": B, "length": length, "rows": rows,
                      "sampling": tuple(sampling), "seed": int(rng.integers(1 << 30))})
    return calls


def main(argv=None):
    args = parse_args(argv)
    import jax  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax import SpecDecoder  # noqa: PLC0415
    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.synthetic import demo, world  # noqa: PLC0415

    t_start = time.perf_counter()
    decoder = SpecDecoder.from_pretrained(args.target, draft_dir=args.draft)
    wcfg = demo.target_world(args.target)
    tmp = Path(tempfile.mkdtemp(prefix="soak_"))
    # items[length] = [(question, video path, prompt tokens)]: every question of every scene of that length
    items = {}
    for length in args.lengths:
        items[length] = []
        for i, seed in enumerate(world.split_seeds("test", args.scenes)):
            scene = world.make_scene(seed, length, wcfg)
            path = world.write_scene_video(scene, tmp / f"{length}s_{i}.mp4", wcfg)
            for qa in world.scene_qa(scene, i):
                n = len(decoder.processor([qa.question], [str(path)])[0].input_ids)
                items[length].append((qa.question, str(path), n))
    rng = np.random.default_rng(args.seed)
    calls = draw_schedule(rng, args.calls, items, args)

    def key(c):  # the compiled programs a call runs: its shapes, and greedy-only or sampling (sampling.as_sampling)
        return (c["mode"], c["B"], c["length"], tg.bucket(max(items[c["length"]][r][2] for r in c["rows"])),
                "greedy" if all(s.greedy for s in c["sampling"]) else "sampled")

    compiles = []

    def listener(event, duration_s, **kw):
        if event == COMPILE_EVENT:
            compiles.append(duration_s)

    def run(c):
        qs = [items[c["length"]][r][0] for r in c["rows"]]
        vids = [items[c["length"]][r][1] for r in c["rows"]]
        return decoder.generate(qs, videos=vids, mode=c["mode"], max_new_tokens=args.max_new_tokens,
                                sampling=c["sampling"], seed=c["seed"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    warm = {}
    for c in calls:
        warm.setdefault(key(c), c)
    t0 = time.perf_counter()
    for c in tqdm(warm.values(), desc="warm-up", unit="call", disable=args.no_progress):
        run(c)
    warmup_s, warmup_compiles = time.perf_counter() - t0, len(compiles)
    compiles.clear()

    greedy: dict[tuple, list[int]] = {}
    mismatches, rows_done, tokens = 0, 0, 0
    rss = [(0, rss_mib())]
    t0 = time.perf_counter()
    compile_calls = []
    for n, c in enumerate(tqdm(calls, desc="soak", unit="call", disable=args.no_progress), 1):
        before = len(compiles)
        outs = run(c)
        if len(compiles) > before:
            compile_calls.append({"call": n, "key": list(key(c)), "compiles": len(compiles) - before})
        for r, s, out in zip(c["rows"], c["sampling"], outs):
            rows_done, tokens = rows_done + 1, tokens + len(out.token_ids)
            if s.temperature == 0:
                ref = greedy.setdefault((c["length"], r), out.token_ids)
                mismatches += ref != out.token_ids
        if n % args.rss_every == 0 or n == len(calls):
            rss.append((n, rss_mib()))
    soak_s = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(listener)

    values = [m for _, m in rss]
    rec = {"bench": "soak", "target": args.target, "draft": args.draft, "calls": len(calls), "rows": rows_done,
           "tokens": tokens, "lengths_s": args.lengths, "batches": args.batches, "modes": args.modes,
           "max_new_tokens": args.max_new_tokens, "keys": len(warm), "warmup_s": warmup_s,
           "warmup_compiles": warmup_compiles, "compiles_after_warmup": len(compiles), "compile_calls": compile_calls[:20],
           "soak_s": soak_s, "calls_per_s": len(calls) / soak_s, "rss_mib": rss,
           "rss_growth": values[-1] / values[0] - 1, "rss_spread": max(values) / min(values) - 1,
           "greedy_pairs": len(greedy), "greedy_mismatches": int(mismatches),
           "wall_s": time.perf_counter() - t_start, **environment()}
    write_jsonl(args.jsonl, rec)
    print(f"soak: {len(calls)} calls ({rows_done} rows, {tokens} tokens) over {len(warm)} shape keys; "
          f"warm-up {warmup_s:.0f} s with {warmup_compiles} compilations; soak {soak_s:.0f} s "
          f"({rec['calls_per_s']:.1f} calls/s)")
    print(f"compilations after warm-up: {len(compiles)}   RSS {values[0]:.0f} -> {values[-1]:.0f} MiB "
          f"(growth {100 * rec['rss_growth']:+.1f} %, max/min {100 * rec['rss_spread']:.1f} %)   "
          f"greedy rows disagreeing with the same pair's first greedy row: {mismatches} of {len(greedy)} pairs")
    return rec


if __name__ == "__main__":
    main()
