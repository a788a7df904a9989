#!/usr/bin/env bash
# Train the ablation drafts (issue 11 §2, the paper's Table 6 layout) on the shipped target, with the shipped drafts'
# two-stage recipe, and decode them beside the shipped Sparrow / EAGLE / MSD-style drafts at 8 s and 1,024 s.
# Table and walls: BENCHMARKS.md "Ablation" (rendered from bench/results/ablation.jsonl).
#
#   bash scripts/train_ablation.sh           # about 40 min on 2 cores (features reused if present)
#
# BENCHMARKS' 16k table is a rerun of the sweep with --lengths 1024 --scenes 1 --repeats 5 (quieter timing).
#
# Variants (each differs from the shipped Sparrow only in its stage-1 switches; stage 2 is the same for all):
#   mtp_only                   VATA + MTP 2, no IVSB
#   ivsb_only                  VATA + IVSB (bridge dropout 0.5), no MTP
#   sparrow_no_bridge_dropout  VATA + IVSB without bridge dropout + MTP 2 (the paper's IVSB as written)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
SWEEP=${SWEEP:-1}  # SWEEP=0: train only

VARIANTS="mtp_only:mtp_only ivsb_only:ivsb_only sparrow_no_bridge_dropout:sparrow_nodrop"  # config name:run name
for pair in $VARIANTS; do
  c=${pair%%:*} d=${pair#*:}
  [ -f "runs/draft_$d/export/model.safetensors" ] || \
    python train.py --config "configs/ablation/train_tiny_draft_$c.json" --export "runs/draft_$d/export"
done
[ -d runs/long_clips/features_text ] || \
  python train.py --config configs/train_tiny_draft_sparrow_long.json --extract-features runs/long_clips/features_text \
      --extract-batch 1 --shard-size 32
for pair in $VARIANTS; do
  c=${pair%%:*} d=${pair#*:}
  python train.py --config "configs/ablation/train_tiny_draft_${c}_long.json" --export "runs/long_clips/draft_$d/export"
done
[ "$SWEEP" = 1 ] || exit 0
python bench/length_sweep.py --lengths 8,1024 --scenes 4,1 --tree chain3 --repeats 3 \
    --draft sparrow=shipped/drafts/sparrow \
    --draft sparrow:no_bridge_dropout=runs/long_clips/draft_sparrow_nodrop/export \
    --draft sparrow:mtp_only=runs/long_clips/draft_mtp_only/export \
    --draft sparrow:ivsb_only=runs/long_clips/draft_ivsb_only/export \
    --draft eagle=shipped/drafts/eagle --draft msd=shipped/drafts/msd \
    --work runs/ablation_v4 --jsonl bench/results/ablation.jsonl
