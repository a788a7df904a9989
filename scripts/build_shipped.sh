#!/usr/bin/env bash
# Rebuild the shipped tiny video world from scratch with the project's own code (2-core CPU machine).
# Each step's command, step count and measured duration are in BENCHMARKS.md ("The shipped tiny world").
#
#   bash scripts/build_shipped.sh            # everything below, in order (about 3 hours on 2 cores)
#
# Stages (each resumes from its own checkpoints if interrupted; rerun the script):
#  1. tokenizer (byte-level BPE, Qwen special tokens)                     -> shipped/tiny-qwen2.5-vl/tokenizer*
#  2. target stage 1: LM + vision from scratch on captions and QA         -> runs/tiny_target/hf
#  3. target stage 2: a fresh vision tower kept informative by the linear-probe loss, many questions
#     per video, stopped at step STAGE2_STOP of its 700-step schedule    -> shipped/tiny-qwen2.5-vl
#  4. drafts on the final target: Sparrow (text-only view, IVSB + MTP) and MSD-style (full visual view)
#                                                                          -> shipped/drafts/{sparrow,msd}
#  5. per-length tree choice for this backend                             -> shipped/drafts/sparrow/tree_choice.json
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
STAGE2_STOP=${STAGE2_STOP:-@STAGE2_STOP@}

python -m sparrow_jax.synthetic.tokenizer
python train.py --config configs/train_tiny_target.json --export runs/tiny_target/hf
python train.py --config configs/train_tiny_target_reads.json --stop-at "$STAGE2_STOP" --export runs/tiny_target_reads/hf
cp runs/tiny_target_reads/hf/{config.json,model.safetensors,generation_config.json} shipped/tiny-qwen2.5-vl/
cp runs/tiny_target_reads/metrics.jsonl shipped/tiny-qwen2.5-vl/training_metrics.jsonl
for d in sparrow msd; do
  python train.py --config "configs/train_tiny_draft_$d.json" --export "runs/draft_$d/export"
  mkdir -p "shipped/drafts/$d" && cp "runs/draft_$d/export"/* "shipped/drafts/$d/"
  cp "runs/draft_$d/metrics.jsonl" "shipped/drafts/$d/training_metrics.jsonl"
done
python bench/tree_search.py
python bench/target_reads_video.py --target shipped/tiny-qwen2.5-vl
