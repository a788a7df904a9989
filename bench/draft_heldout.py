"""Held-out loss and top-1 of a trained draft: validation scenes of the tiny world (never trained on),
features from the frozen target exactly as training computes them, the training loss per MTP pass
without an update. The figure the draft recipes report beside their training curves.

  python bench/draft_heldout.py --config configs/train_tiny_draft_sparrow.json --draft shipped/drafts/sparrow
  python bench/draft_heldout.py --config configs/train_tiny_draft_msd.json --draft shipped/drafts/msd

--samples validation items (default 64; batches of the config's global batch), about 1 s each on 2 cores.
--decode-view: the same items without IVSB's bridged visual slots, i.e. the sequence the draft sees when it
decodes (VATA: text positions only). For a draft trained with IVSB the gap between the two views is what it
learned to take from the bridge, which decoding does not give it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, write_jsonl  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the draft's training config (target, data, view, slots)")
    ap.add_argument("--draft", required=True, help="the trained draft directory (ours)")
    ap.add_argument("--samples", type=int, default=64, help="validation items")
    ap.add_argument("--decode-view", action="store_true",
                    help="evaluate without IVSB's visual slots (the sequence decoding gives the draft)")
    ap.add_argument("--jsonl", default=str(HERE / "results" / "draft_heldout.jsonl"))
    args = ap.parse_args(argv)

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax.io.draft_checkpoint import load_draft  # noqa: PLC0415
    from sparrow_jax.synthetic.sources import sample_source  # noqa: PLC0415
    from sparrow_jax.training.features import records_for  # noqa: PLC0415
    from sparrow_jax.training.trainer import Trainer, TrainConfig, load_target  # noqa: PLC0415

    cfg = TrainConfig.from_file_and_overrides(args.config, ["ivsb=false", "ivsb_bridge_dropout=0"] if args.decode_view else [])
    if cfg.data != "world":
        sys.exit(f"draft_heldout.py: {args.config}: data {cfg.data!r}; held-out scenes come from the world source")
    target = load_target(cfg)
    held = sample_source(cfg.data)(target.cfg, args.samples, seed=cfg.data_seed, split="validation",
                                   **cfg.data_options)
    tr = Trainer(dataclasses.replace(cfg, tensorboard=False), samples=held, target=target, log=lambda *a: None)
    draft = load_draft(args.draft, target_cfg=target.cfg)
    if draft.cfg.visual_view != cfg.visual_view:
        sys.exit(f"draft_heldout.py: {args.draft} was trained for view {draft.cfg.visual_view!r}, the config "
                 f"names {cfg.visual_view!r}")
    tr.params = nnx.split(draft, nnx.Param)[1]
    t0, sums, n = time.perf_counter(), {}, 0
    B = cfg.global_batch
    for i in tqdm(range(0, args.samples - B + 1, B), desc="held-out"):
        recs = records_for(target, [held[j] for j in range(i, i + B)], spec=tr.feature_spec)
        for k, v in tr.evaluate(recs).items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    metrics = {k: v / n for k, v in sums.items()}
    row = {"bench": "draft_heldout", "config": args.config, "draft": args.draft, "view": cfg.visual_view,
           "sequence": "decode" if args.decode_view else "training", "ivsb_slots": cfg.ivsb,
           "samples": n * B, "seconds": round(time.perf_counter() - t0, 1), **{k: round(v, 4) for k, v in metrics.items()},
           **environment()}
    write_jsonl(args.jsonl, row)
    print(" ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if "top1" in k or k == "loss"))


if __name__ == "__main__":
    main()
