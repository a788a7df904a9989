"""Where a long video's prefill goes (issue 14): the stages of our prefill timed apart on the shipped target,
and the LM prefill under several blockwise-attention block sizes, in one run.

Stages (one world scene of --seconds, caption request, as decode.py builds it):
  processor     video decode + resize + tokenisation (api.Processor; not part of the peers' timed prefill,
                which feeds both sides the same preprocessed arrays)
  batch         the family's batch builder (registry.prepare_batch_for)
  vision        the vision tower, chunked as decode.py runs it (target.encode_visuals_chunked)
  lm_prefill    the LM over the whole prompt + cache write (target._prefill with the tower's output)
Then lm_prefill again for each --blocks Q/KV pair (`attention.blockwise_attention`'s q_block / kv_block;
prompts past DENSE_SCORE_LIMIT scores run blockwise), and `dense` (the whole score matrix at once).
Each cell: median of --repeats calls after one compile call.
With --idle: the whole prefill as decode.py and bench/peers.py time it (batch builder + tower + LM) after
each of the given seconds of idle (a garbage collection, then sleep), with XLA:CPU's worker threads pinned
one per core (`sparrow_jax.runtime`, the default) and not pinned, interleaved call by call.

  python bench/prefill_profile.py --seconds 256
  python bench/prefill_profile.py --seconds 1024 --blocks 512/512 128/1024
  python bench/prefill_profile.py --seconds 8 --blocks --idle 0 0.05 0.3 --repeats 9
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402

from common import environment, median_time, write_jsonl  # noqa: E402
from sparrow_jax import api  # noqa: E402
from sparrow_jax.decoding.autoregressive import cache_capacity  # noqa: E402
from sparrow_jax.models import attention as attn_lib, registry, target as tg  # noqa: E402
from sparrow_jax.synthetic import demo, world as W  # noqa: E402


def run(args) -> list[dict]:
    target_dir = Path(args.target) if args.target else demo.shipped_target()
    if target_dir is None:
        raise SystemExit("no shipped target found: pass --target DIR")
    wcfg = demo.target_world(target_dir)
    scene = W.make_scene(args.seed, args.seconds, wcfg)
    tmp = tempfile.TemporaryDirectory(prefix="prefill_profile_")
    video = W.write_scene_video(scene, Path(tmp.name) / f"scene_{args.seconds}s.mp4", wcfg)
    dec = api.SpecDecoder.from_pretrained(target_dir, config=api.DecodeConfig(mode="ar", max_new_tokens=64))
    tcfg = dec.target.cfg
    m_star = tg.default_m_star(tcfg.num_layers)
    rows = dec.processor([demo.QUESTION], [str(video)], None, dec.config.vision)
    batch = registry.prepare_batch_for(tcfg)(rows, tcfg)
    capacity = cache_capacity(batch.input_ids_BT.shape[1], 64, 1)
    feats = tg.encode_visuals_chunked(dec.tgraph, dec.tparams, batch.pixels_PC, batch.vision_layout)
    lm_batch = dataclasses.replace(batch, pixels_PC=None, vision_layout=None, visual_feats_MD=feats)

    def lm():
        return tg._prefill(dec.tgraph, dec.tparams, lm_batch, capacity=capacity, m_star=m_star)

    stages = {
        "processor": lambda: dec.processor([demo.QUESTION], [str(video)], None, dec.config.vision),
        "batch": lambda: registry.prepare_batch_for(tcfg)(rows, tcfg),
        "vision": lambda: tg.encode_visuals_chunked(dec.tgraph, dec.tparams, batch.pixels_PC, batch.vision_layout),
        "lm_prefill": lm,
    }
    env = environment()
    common = {"bench": "prefill_profile", **env, "code": args.label, "target": str(target_dir), "seconds": args.seconds,
              "visual_tokens": int(batch.vis_len_B[0]), "prompt_tokens": int(batch.input_ids_BT.shape[1]),
              "repeats": args.repeats}
    records = []
    defaults = dict(attn_lib.blockwise_attention.__kwdefaults__)
    for name, fn in stages.items():
        s = median_time(fn, args.repeats)
        rec = {**common, "cell": name, "blocks": f"{defaults['q_block']}/{defaults['kv_block']}",
               "dense_score_limit": attn_lib.DENSE_SCORE_LIMIT, "seconds_median": s}
        records.append(rec)
        print(f"[prefill_profile] {name:<12} {s:8.3f} s", flush=True)
    if args.idle:
        records += idle_cells(args, common, lambda: tg.prefill(
            dec.tgraph, dec.tparams, registry.prepare_batch_for(tcfg)(rows, tcfg), capacity=capacity, m_star=m_star))
    limit = attn_lib.DENSE_SCORE_LIMIT
    try:
        for blocks in args.blocks:
            if blocks == "dense":
                attn_lib.DENSE_SCORE_LIMIT = 1 << 62
            else:
                q, kv = (int(x) for x in blocks.split("/"))
                attn_lib.DENSE_SCORE_LIMIT = limit if args.dense_score_limit is None else args.dense_score_limit
                attn_lib.blockwise_attention.__kwdefaults__ = {"q_block": q, "kv_block": kv}
            jax.clear_caches()  # the block sizes are read at trace time
            s = median_time(lm, args.repeats)
            records.append({**common, "cell": "lm_prefill", "blocks": blocks,
                            "dense_score_limit": attn_lib.DENSE_SCORE_LIMIT, "seconds_median": s})
            print(f"[prefill_profile] lm_prefill   {s:8.3f} s  blocks {blocks}", flush=True)
    finally:
        attn_lib.DENSE_SCORE_LIMIT = limit
        attn_lib.blockwise_attention.__kwdefaults__ = defaults
    for rec in records:
        write_jsonl(args.jsonl, rec)
    return records


def idle_cells(args, common: dict, prefill) -> list[dict]:
    """The whole prefill after each --idle seconds, workers pinned and not, interleaved call by call."""
    import gc  # noqa: PLC0415
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from sparrow_jax import runtime  # noqa: PLC0415

    jax.block_until_ready(prefill())
    times = {(pin, idle): [] for pin in (True, False) for idle in args.idle}
    for _ in range(args.repeats):
        for pin, idle in times:
            runtime.pin_cpu_workers() if pin else runtime.release_cpu_workers()
            gc.collect()
            time.sleep(idle)
            t0 = time.perf_counter()
            jax.block_until_ready(prefill())
            times[pin, idle].append(time.perf_counter() - t0)
    runtime.pin_cpu_workers()
    records = []
    for (pin, idle), ts in times.items():
        records.append({**common, "cell": "prefill_after_idle", "idle_s": idle, "workers_pinned": pin,
                        "seconds_median": float(np.median(ts)), "seconds_runs": ts})
        print(f"[prefill_profile] prefill after {idle:.2f} s idle, workers {'pinned' if pin else 'free':<6} "
              f"{np.median(ts) * 1e3:8.1f} ms", flush=True)
    return records


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="HF checkpoint directory (default: the shipped tiny target)")
    ap.add_argument("--seconds", type=int, default=256, help="video length (the shipped target: 16 visual tokens/s)")
    ap.add_argument("--seed", type=int, default=demo.SAMPLE_SEED)
    ap.add_argument("--label",
                    help="names the code measured (field `code`), e.g. for before/after runs of two checkouts")
    ap.add_argument("--dense-score-limit", type=int, default=None,
                    help="DENSE_SCORE_LIMIT for the --blocks cells (0: every LM attention blockwise; default: "
                         "the library's)")
    ap.add_argument("--blocks", nargs="*", default=["512/512", "256/512", "128/1024", "256/1024", "dense"],
                    help="Q/KV block sizes of the blockwise LM attention to time, or 'dense'")
    ap.add_argument("--idle", type=float, nargs="*", default=[],
                    help="seconds of idle before each timed whole prefill, workers pinned and not (e.g. 0 0.3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jsonl", default=str(HERE / "results" / "prefill_profile.jsonl"))
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    for b in args.blocks:
        if b != "dense" and not (b.count("/") == 1 and all(x.isdigit() and int(x) > 0 for x in b.split("/"))):
            raise SystemExit(f"--blocks {b!r}: expected Q/KV (positive ints) or 'dense'")
    if args.seconds < 1 or args.repeats < 1:
        raise SystemExit("--seconds and --repeats must be positive")
    return run(args)


if __name__ == "__main__":
    main()
