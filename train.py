"""Train a Sparrow draft (IVSB + MTP) against a frozen target, or (task=target) the target itself.

  python train.py --config run.json --set steps=200 --set mesh=[1,2,2]
  python train.py --set online=true --set target_config=configs/tiny.json --set steps=50
  python train.py --extract-features feats/ --num-samples 256        # offline features, then:
  python train.py --set features=feats/ --set steps=500
  python train.py --set task=target --set data=colours --set steps=300 --export runs/target/hf

Config keys are the fields of `sparrow_jax.training.trainer.TrainConfig` (a JSON/YAML file, then
`--set key=value` overrides). Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I
(or rely on the cluster's auto-detection with --distributed). `data` picks the sample source
(sparrow_jax/synthetic/sources.py): "world" = the shipped tiny video world's captions and QA (what the
shipped target and drafts were trained on, configs/train_tiny_*.json), "video_instruct" = a local
LLaVA-Video-178K / ShareGPT4Video copy (configs/recipes/), "synthetic" = procedural videos with random text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402 — after HF_HUB_OFFLINE is set

from sparrow_jax.io.draft_checkpoint import export_official, save_draft, target_embedding  # noqa: E402
from sparrow_jax.models.target import default_m_star  # noqa: E402
from sparrow_jax.synthetic.sources import sample_source  # noqa: E402
from sparrow_jax.training.checkpoint_guard import CheckpointDamagedError, NonFiniteError  # noqa: E402
from sparrow_jax.training.features import extract_features  # noqa: E402
from sparrow_jax.training.target_trainer import TargetTrainer  # noqa: E402
from sparrow_jax.training.trainer import Trainer, TrainConfig, load_target  # noqa: E402

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON/YAML file with TrainConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--extract-features", metavar="DIR", help="write offline feature shards to DIR and exit")
    ap.add_argument("--num-samples", type=int, default=None, help="synthetic samples (default: config num_samples)")
    ap.add_argument("--regenerate", type=int, default=None, help="extraction: responses = target's greedy answer")
    ap.add_argument("--extract-batch", type=int, default=8, metavar="N",
                    help="extraction: samples per target forward (a batch is padded to its longest video, so mixed "
                         "or long videos extract faster at 1)")
    ap.add_argument("--shard-size", type=int, default=64, metavar="N",
                    help="extraction: records per shard (the unit of resumption)")
    ap.add_argument("--export", metavar="DIR", help="after training, save the draft: ours in DIR, and the official "
                    "layout it can be expressed in (Sparrow for a draft with the embedding norm, else EAGLE-2, with "
                    "the target's embedding) in DIR-sparrow / DIR-eagle2; task=target: a HF checkpoint directory DIR")
    ap.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (auto-detect)")
    ap.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process)")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                    help="stop at this step (checkpointed; the learning-rate schedule stays the config's)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()

    try:
        cfg = TrainConfig.from_file_and_overrides(args.config, args.set)
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: error: {e}")
    n = args.num_samples or cfg.num_samples
    try:
        make_samples = sample_source(cfg.data)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")
    if cfg.task == "target":
        train_target(dataclasses.replace(cfg, num_samples=n), args)
        return
    if args.extract_features:
        if args.extract_batch < 1 or args.shard_size < 1:
            sys.exit(f"train.py: error: --extract-batch {args.extract_batch} / --shard-size {args.shard_size}: "
                     "both must be >= 1")
        target = load_target(cfg)
        samples = make_samples(target.cfg, n, seed=cfg.data_seed, **cfg.data_options)
        m_star = default_m_star(target.cfg.num_layers) if cfg.m_star is None else cfg.m_star
        index = extract_features(target, samples, args.extract_features, spec=cfg.feature_spec(m_star),
                                 regenerate=args.regenerate, progress=not args.no_progress,
                                 batch_size=args.extract_batch, shard_size=args.shard_size)
        print(f"[train] {sum(s['records'] for s in index['shards'])} records in {len(index['shards'])} shards "
              f"-> {args.extract_features}")
        return
    samples = None
    if cfg.online:
        samples = make_samples(load_target(cfg).cfg, n, seed=cfg.data_seed, **cfg.data_options)
    try:
        trainer = Trainer(cfg, samples=samples)
    except (ValueError, OSError) as e:  # a config that cannot be run: init_draft, features, target, view
        sys.exit(f"train.py: error: {e}")
    history = run_or_exit(trainer, args)
    if history and jax.process_index() == 0:
        print(f"[train] step {trainer.step}: " + json.dumps({k: round(v, 5) for k, v in history[-1].items()}))
    if args.export and jax.process_index() == 0:

        try:
            trainer.check_finite_params("draft")
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")
        draft = trainer.draft()
        save_draft(draft, args.export)
        fmt = "sparrow" if draft.cfg.normalize_embeddings else "eagle2"  # the one official layout it fits
        official = f"{args.export.rstrip('/')}-{fmt}"
        export_official(draft, official, format=fmt, embed_tokens=target_embedding(trainer.target))
        print(f"[train] draft saved to {args.export} (ours) and {official} (official {fmt} layout)")


def train_target(cfg, args):
    """task=target: train the target itself (vision tower + LM) on answer tokens; --export writes a HF
    checkpoint directory (config.json, model.safetensors, generation_config.json, tokenizer files)."""


    trainer = TargetTrainer(cfg)
    history = run_or_exit(trainer, args)
    if history and jax.process_index() == 0:
        print(f"[train] step {trainer.step}: " + json.dumps({k: round(v, 5) for k, v in history[-1].items()}))
    if args.export and jax.process_index() == 0:
        try:
            print(f"[train] target saved to {trainer.export(args.export)} (HF checkpoint directory)")
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")


def run_or_exit(trainer, args):
    """trainer.run; a run that cannot resume (no checkpoint verifies) or that turned non-finite ends with
    one line (exit 1), nothing exported."""

    try:
        return trainer.run(progress=not args.no_progress, stop_at=args.stop_at)
    except (CheckpointDamagedError, NonFiniteError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
