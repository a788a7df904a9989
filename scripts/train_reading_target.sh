#!/usr/bin/env bash
# The shipped target's reading curriculum (BENCHMARKS.md "Why the tiny target does not read the video yet"):
# configs/target_curriculum/NN_*.json in order, each starting from the previous stage's HF export, each
# probed after training (bench/answer_loss_by_kind.py, real vs blank video, held-out scenes rendered the way
# the stage was trained). Resumable: a stage with an export is skipped; an interrupted stage resumes from its
# checkpoints. Log: runs/target_curriculum/log.txt; probes: bench/results/target_curriculum.jsonl.
#
#   bash scripts/train_reading_target.sh [FIRST_STAGE_PREFIX]     # e.g. 03 to start at stage 3
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
mkdir -p runs/target_curriculum
LOG=runs/target_curriculum/log.txt
start="${1:-00}"
for cfg in configs/target_curriculum/[0-9][0-9]_*.json; do
  name=$(basename "$cfg" .json)
  [[ "$name" < "$start" ]] && continue
  out="runs/target_curriculum/$name/hf"
  if [[ ! -f "$out/model.safetensors" ]]; then
    t0=$(date +%s)
    echo "$(date -u +%FT%TZ) $name: python train.py --config $cfg --export $out" | tee -a "$LOG"
    python train.py --config "$cfg" --export "$out" --no-progress 2>&1 | grep -v Warning >> "$LOG"
    echo "$(date -u +%FT%TZ) $name: trained in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  fi
  # the probe: the stage's question kinds (all of them for the full mix) on scenes of the stage's world
  # (the export's world.json), with the attribute-word loss for captions
  kinds=$(python -c 'import json, sys; c = json.load(open(sys.argv[1]))["data_options"]
print(",".join(c.get("kinds") or ["background", "colour", "shape", "size", "count", "motion", "yesno"]))' "$cfg")
  python bench/answer_loss_by_kind.py --target "$out" --kinds "$kinds" --content \
      --jsonl bench/results/target_curriculum.jsonl 2>&1 | grep -v Warning | tee -a "$LOG"
done
