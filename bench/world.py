"""The tiny video world's data side: render speed, sample build time (with and without the codec round
trip), raw-vs-decoded pixel difference, caption token lengths, and the visual tokens of each named length.

  python bench/world.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_jsonl  # noqa: E402


def _rate(fn, n):
    t = time.perf_counter()
    out = [fn(i) for i in range(n)]
    return (time.perf_counter() - t) / n, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=200, help="short clips to time")
    ap.add_argument("--jsonl", default=str(Path(__file__).resolve().parent / "results" / "world.jsonl"))
    args = ap.parse_args(argv)

    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415
    from sparrow_jax.synthetic.tokenizer import SHIPPED_DIR  # noqa: PLC0415

    cfg = W.WorldConfig()
    rec = {**environment(), "world": {"height": cfg.height, "width": cfg.width, "fps": cfg.fps}}
    for name, d in (("short", 8), ("16k", W.LENGTHS["16k"])):
        n = args.clips if name == "short" else 2
        scenes = [W.make_scene(s, d) for s in range(n)]
        sec, _ = _rate(lambda i: W.render(scenes[i], cfg), n)
        rec[f"render_{name}"] = {"seconds": d, "s_per_clip": sec, "frames_per_s": cfg.num_frames(d) / sec}
    frames = [W.render(W.make_scene(s, 8), cfg) for s in range(args.clips // 4)]
    for rt in (False, True):
        sec, vis = _rate(lambda i: W.visual_from_frames(frames[i], cfg, roundtrip=rt), len(frames))
        rec[f"preprocess_8s_roundtrip_{rt}"] = {"s_per_clip": sec}
        if rt:
            raw = [W.visual_from_frames(f, cfg).pixel_values for f in frames]
            diff = np.concatenate([np.abs(r - v.pixel_values).ravel() for r, v in zip(raw, vis)])
            rec["raw_vs_decoded_normalised"] = {"mean_abs": float(diff.mean()), "p99_abs": float(np.quantile(diff, 0.99)),
                                                "max_abs": float(diff.max()), "mean_abs_uint8": float(diff.mean() * 0.27 * 255)}
    codec = load_codec(SHIPPED_DIR, 1024)
    rec["caption_tokens"] = {}
    for d in (8, 32, 256, 1024):
        lens = [len(codec.encode(W.caption(W.make_scene(s, d), s))) for s in W.split_seeds("validation", 200)]
        rec["caption_tokens"][d] = {"p10": float(np.percentile(lens, 10)), "median": float(np.median(lens)),
                                    "p90": float(np.percentile(lens, 90))}
    rec["vocab"] = {"bpe": codec.tok.get_vocab_size(with_added_tokens=False), "total": codec.tok.get_vocab_size()}
    rec["lengths"] = {name: {"seconds": d, "visual_tokens": cfg.visual_tokens(d)} for name, d in W.LENGTHS.items()}
    print(json.dumps(rec, indent=1))
    write_jsonl(args.jsonl, rec)


if __name__ == "__main__":
    main()
