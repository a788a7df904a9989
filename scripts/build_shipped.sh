#!/usr/bin/env bash
# Rebuild the shipped tiny video world from scratch with the project's own code (2-core CPU machine).
# Each step's command and measured duration are in BENCHMARKS.md ("The shipped tiny world: how it is built").
#
#   bash scripts/build_shipped.sh            # everything below, in order (about 3 hours on 2 cores)
#
# Stages (each resumes from its own checkpoints if interrupted; rerun the script):
#  1. tokenizer (byte-level BPE, Qwen special tokens)                     -> shipped/tiny-qwen2.5-vl/tokenizer*
#  2. the target: the reading curriculum (scripts/train_reading_target.sh, configs/target_curriculum/*.json):
#     LM + vision tower from scratch on detailed captions of static one-object scenes (sprites x2), then
#     more steps on the same data, then the same captions at 8/32/64 s so it keeps reading long videos,
#     then at 8 s to 1,024 s (frames capped at 1,024) so it reads at 16k visual tokens;
#     each stage probed real vs blank video (65 + 59 min on 2 cores)       -> shipped/tiny-qwen2.5-vl
#     (+ world.json: the scene settings it was trained on, which the demo, the drafts and the benches use)
#  3. drafts on the final target: Sparrow (text-only view, IVSB + MTP), MSD-style (full visual view), plain
#     EAGLE (text-only view, no IVSB, no MTP) and pruned-visual (10 % of the visual tokens): 300 steps online
#     on 8 s clips, then 36 offline steps on 8 s / 256 s / 1,024 s clips (about 40 min in all)
#                                                   -> shipped/drafts/{sparrow,msd,eagle,pruned_visual}
#  4. per-length tree choice for this backend       -> shipped/drafts/*/tree_choice.json
#  5. the acceptance check: greedy captions/answers with the real, a blank and a shuffled video
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

python -m sparrow_jax.synthetic.tokenizer
bash scripts/train_reading_target.sh
final=runs/target_curriculum/$(basename "$(ls configs/target_curriculum/[0-9][0-9]_*.json | tail -1)" .json)/
cp "$final"hf/{config.json,model.safetensors,generation_config.json,world.json} shipped/tiny-qwen2.5-vl/
cat runs/target_curriculum/[0-9][0-9]_*/metrics.jsonl > shipped/tiny-qwen2.5-vl/training_metrics.jsonl
# config name:shipped directory
for pair in sparrow:sparrow msd:msd eagle:eagle pruned:pruned_visual; do
  c=${pair%%:*} d=${pair#*:}
  python train.py --config "configs/train_tiny_draft_$c.json" --export "runs/draft_$c/export"
done
# stage 2 of every draft: 36 steps on long clips (8 s / 256 s / 1,024 s) from stage 1's export, offline: the
# target's features extracted once per view (text-only: Sparrow, EAGLE; visual embeddings: MSD-style, pruned)
python train.py --config configs/train_tiny_draft_sparrow_long.json --extract-features runs/long_clips/features_text \
    --extract-batch 1 --shard-size 32
python train.py --config configs/train_tiny_draft_msd_long.json --extract-features runs/long_clips/features_embed \
    --extract-batch 1 --shard-size 32
for pair in sparrow:sparrow msd:msd eagle:eagle pruned:pruned_visual; do
  c=${pair%%:*} d=${pair#*:}
  python train.py --config "configs/train_tiny_draft_${c}_long.json" --export "runs/long_clips/draft_$c/export"
  mkdir -p "shipped/drafts/$d" && cp "runs/long_clips/draft_$c/export"/* "shipped/drafts/$d/"
  cat "runs/draft_$c/metrics.jsonl" "runs/long_clips/draft_$c/metrics.jsonl" > "shipped/drafts/$d/training_metrics.jsonl"
done
for d in sparrow msd eagle pruned_visual; do
  python bench/tree_search.py --draft "shipped/drafts/$d" --lengths 8,32,256,1024 --scenes 2 \
      --candidates 8-3-2,16-4-4,48-5-10,chain2,chain3,chain4,chain5
done
python bench/target_reads_video.py --target shipped/tiny-qwen2.5-vl --lengths 8,32,256,1024 --scenes 16,8,4,4 \
    --conditions real,blank
