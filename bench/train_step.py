"""One draft training step at video lengths: compiled step time and peak RSS.

The step is `Trainer`'s own jitted step on offline features (what `train.py` runs): IVSB on, MTP 2,
the default loss (soft CE + SmoothL1), AdamW, global batch 1, fp32. The target is configs/tiny.json
with random weights (the cost does not depend on the values); the feature record is random too, laid
out as a real one: 32 prompt tokens, <vision_start>, V video tokens, <vision_end>, 30 question tokens
and a 64-token response (128 text positions), so the draft sequence holds ~127 text + V visual slots.

Each visual length runs in its own subprocess, so the peak RSS (the child's ru_maxrss, covering
imports, model build, compile and the steps) belongs to that size alone. Reported: the first call
(compile + run), the --warmup calls (the second call compiles again: the trainer's fresh RNG key has
no sharding, the one the step returns is replicated on the mesh), and the median of --repeats timed steps.

  python bench/train_step.py
  python bench/train_step.py --visual-slots 2048 8192 16384 --attention pallas
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_rss_gib, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, QUESTION, RESPONSE = 32, 30, 64  # text positions around the video; 128 with the two markers


def write_features(out_dir: Path, V: int, tcfg, meta: dict, n_records: int, seed: int = 0):
    """Random feature records with a real record's layout (one shard); text ids below the specials."""
    from sparrow_jax.training.data import FeatureRecord, text_layout, write_shard  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    is_vis = np.concatenate([np.zeros(PROMPT + 1, bool), np.ones(V, bool), np.zeros(1 + QUESTION + RESPONSE, bool)])
    assistant = np.zeros(len(is_vis), bool)
    assistant[-RESPONSE:] = True
    text_pos, pred, vis_pos = text_layout(is_vis, assistant)
    L, M = len(text_pos), len(vis_pos)
    D = tcfg.text.hidden_size
    n_text = min(tcfg.text.vocab_size, tcfg.image_token_id, tcfg.video_token_id, tcfg.vision_start_token_id)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    records = [FeatureRecord(text_ids=rng.integers(0, n_text, L).astype(np.int32), pred_mask=pred, h=normal(L, D),
                             hprev=normal(L, D), vis=normal(M, D), is_vis=is_vis, vis_score=np.zeros(0, np.float32))
               for _ in range(n_records)]
    write_shard(out_dir, 0, records, meta)
    return L


def child(args) -> dict:
    """One size: build the trainer, compile its step, time it; returns the record (peak RSS last)."""
    import jax  # noqa: PLC0415

    from sparrow_jax.models import attention as attn_lib  # noqa: PLC0415
    from sparrow_jax.models import registry  # noqa: PLC0415
    from sparrow_jax.models.target import default_m_star  # noqa: PLC0415
    from sparrow_jax.training.trainer import TrainConfig, Trainer  # noqa: PLC0415

    V = args.child
    if args.dense_score_limit is not None:
        attn_lib.DENSE_SCORE_LIMIT = args.dense_score_limit
    load_before = os.getloadavg()
    d, source = registry.read_config_dict(args.config)
    tcfg = registry.config_from_dict(d, source)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"target_config={args.config}", f"features={tmp}/features", f"out_dir={tmp}/run",
                     f"max_visual={V}", "global_batch=1", "ivsb=true", "mtp_steps=2", f"attention={args.attention}",
                     f"m_star={default_m_star(tcfg.num_layers)}", "tensorboard=false"]
        cfg0 = TrainConfig.from_file_and_overrides(None, overrides)
        L = write_features(Path(tmp) / "features", V, tcfg,
                           cfg0.feature_spec(cfg0.m_star).meta(), n_records=cfg0.global_batch)
        cfg = TrainConfig.from_file_and_overrides(None, overrides + [f"max_text={L}"])
        tr = Trainer(cfg, log=lambda *a: None)
        with jax.set_mesh(tr.mesh):
            batch = tr.next_batch()
            params, opt, rng = tr.params, tr.opt_state, tr.rng

            def step():
                nonlocal params, opt, rng
                t0 = time.perf_counter()
                params, opt, rng, m = tr._step_fn(params, opt, tr.tparams, rng, batch)  # donates params, opt
                jax.block_until_ready((params, m))
                return time.perf_counter() - t0, m

            first, m = step()
            warm = [step()[0] for _ in range(args.warmup)]
            times = [step()[0] for _ in range(args.repeats)]
    return {"visual_slots": V, "text_positions": L, "slots": int(batch.slot_len_B[0]), "loss": float(m["loss"]),
            "first_step_s (compile+run)": round(first, 3), "warmup_step_s": [round(t, 3) for t in warm],
            "median_step_s": round(float(np.median(times)), 3),
            "min_step_s": round(min(times), 3), "step_s": [round(t, 3) for t in times],
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "peak_rss_gib": round(peak_rss_gib(), 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    ap.add_argument("--visual-slots", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--attention", default="xla", choices=["xla", "pallas"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-score-limit", type=int, default=None,
                    help="override attention.DENSE_SCORE_LIMIT (0: blockwise path at every length)")
    ap.add_argument("--rss-goal-gib", type=float, default=4.0)
    ap.add_argument("--jsonl", default=str(RESULTS / "train_step.jsonl"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one size
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return

    env = environment()
    common = {"bench": "train_step", **env, "config": Path(args.config).name, "dtype": "float32",
              "attention": args.attention, "ivsb": True, "mtp_steps": 2, "global_batch": 1, "warmup": args.warmup,
              "repeats": args.repeats, "dense_score_limit": args.dense_score_limit}
    print(f"draft training step (Trainer, offline features, IVSB, MTP 2), {common['config']}, attention="
          f"{args.attention}; median of {args.repeats} after {args.warmup} warmup; one subprocess per size")
    hdr = f"{'visual':>7} {'slots':>6} {'first s':>8} {'median s':>9} {'peak RSS GiB':>13}"
    print(hdr + "\n" + "-" * len(hdr))
    rows = []
    for V in args.visual_slots:
        cmd = [sys.executable, __file__, "--child", str(V), "--config", args.config, "--attention", args.attention,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        if args.dense_score_limit is not None:
            cmd += ["--dense-score-limit", str(args.dense_score_limit)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"visual_slots={V}: child exited with {proc.returncode}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["rss_goal_gib"], r["within_goal"] = args.rss_goal_gib, r["peak_rss_gib"] <= args.rss_goal_gib
        rows.append(r)
        print(f"{V:>7} {r['slots']:>6} {r['first_step_s (compile+run)']:>8.1f} {r['median_step_s']:>9.2f} "
              f"{r['peak_rss_gib']:>13.2f}", flush=True)
        write_jsonl(args.jsonl, {**common, **r})
    print(f"(load average 1 min before/after each size: {[r['loadavg_1m_before_after'] for r in rows]})")


if __name__ == "__main__":
    main()
