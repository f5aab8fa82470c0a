#!/usr/bin/env bash
# The WCoRD key-design sweep of BENCHMARKS.md ("WCoRD keys"): a resnet8 teacher trained for one epoch on all 60,000
# Fashion-MNIST training images, then resnet8 students for one epoch of 300 steps on the first 19,200 (batch 64,
# queue K = 4096), seeds 0, 1, 2, one run per design. About 45 s a run on 2 CPU cores.
#   bash benchmarks/wcord_keys/sweep.sh [WORKDIR]      then   python benchmarks/wcord_keys/summary.py [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/wcord_keys}
mkdir -p "$OUT"
[ -e "$OUT/teacher/config.json" ] || python -m wcord_jax.main --config configs/teacher.py:resnet8 --workdir "$OUT/teacher" \
  --config.dataset.name=fashion_mnist --config.num_epochs=1 --config.progress_bar=False
run() {  # run NAME SEED METHOD [overrides...]
  local name=$1 seed=$2 method=$3; shift 3
  local dir="$OUT/$name/seed$seed"
  [ -e "$dir/done" ] && return 0
  python -m wcord_jax.main --config "configs/distill.py:$method,resnet8,resnet8" --workdir "$dir" \
    --config.teacher.checkpoint="$OUT/teacher" --config.seed="$seed" \
    --config.dataset.name=fashion_mnist --config.dataset.num_train=19200 --config.dataset.num_test=5000 \
    --config.num_epochs=1 --config.progress_bar=False --config.log_every_steps=20 \
    --config.wcord.num_negatives=4096 "$@" > "$dir.log" 2>&1 || { echo "$name seed $seed failed: see $dir.log"; return 1; }
  touch "$dir/done"
  echo "$name seed $seed done"
}
for seed in 0 1 2; do
  run none "$seed" none
  run trained_keys "$seed" wcord --config.wcord.key_heads=trained --config.wcord.ablation=True --config.wcord.student_queue_fraction=1
  run ema_0.99_whole_queue "$seed" wcord --config.wcord.key_momentum=0.99 --config.wcord.student_queue_fraction=1
  run ema_0.999_whole_queue "$seed" wcord --config.wcord.student_queue_fraction=1
  run ema_0.99_short_queue "$seed" wcord --config.wcord.key_momentum=0.99
  run ema_0.999_short_queue "$seed" wcord  # the defaults
  run ema_0.999_student_anchors "$seed" wcord --config.wcord.directions=student --config.wcord.student_queue_fraction=1
  run in_batch "$seed" wcord --config.wcord.negatives=batch
done
