#!/usr/bin/env bash
# What an accelerator (a GPU or TPU) can tell us, in one command of under 10 minutes on one H100-class GPU:
#   (a) the step speed table (wcord_jax.tools.bench_table): CRD and WCoRD on resnet32x4 -> resnet8x4 and
#       wrn_40_2 -> wrn_16_2, float32 and bfloat16, batch 64/256/1024, 8 and 1 steps per dispatch, most important
#       rows first until --budget_s (default 200) is spent: img/s, ms/step, achieved TFLOP/s and its share of the
#       chip's peak, compile time, peak memory;
#   (b) an accuracy run on all of Fashion-MNIST (configs/study.py:accelerator: a resnet32 teacher, then resnet8
#       students of none, kd, crd and wcord, 8 epochs on the 60,000 training images, seed 0), its table printed.
#
#   bash benchmarks/accelerator.sh [--out DIR] [--budget_s S] [--fashion_mnist DIR]
#   bash benchmarks/accelerator.sh --smallest     # the CPU smoke mode: one small row per method, the quick study
#
# Installs nothing: it says what is missing (Python packages: docs/benchmark.md; Fashion-MNIST's four idx files:
# --fashion_mnist, default /usr/share/datasets/fashion-mnist) and runs what it can. Writes DIR (default
# runs/accelerator): bench_table.jsonl, study/ (results.md, results.json, the runs).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/accelerator BUDGET=200 SMALLEST=0 FMNIST=/usr/share/datasets/fashion-mnist
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --budget_s) BUDGET="$2"; shift 2 ;;
    --fashion_mnist) FMNIST="$2"; shift 2 ;;
    --smallest) SMALLEST=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1; valid: --out DIR, --budget_s S, --fashion_mnist DIR, --smallest, --help" >&2
       exit 2 ;;
  esac
done

python - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "ott", "ml_collections", "orbax.checkpoint", "absl", "matplotlib")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"error: missing Python packages {', '.join(missing)}: see docs/benchmark.md (on an accelerator)")
PY
mkdir -p "$OUT"
python -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}")'

status=0
echo "== (a) step speed"
if [[ $SMALLEST == 1 ]]; then
  python -m wcord_jax.tools.bench_table --smallest --out "$OUT/bench_table.jsonl"
else
  python -m wcord_jax.tools.bench_table --budget_s "$BUDGET" --out "$OUT/bench_table.jsonl"
fi

echo "== (b) accuracy"
if [[ $SMALLEST == 1 ]]; then
  python -m wcord_jax.tools.study --config configs/study.py:quick --workdir "$OUT/study" \
    --config.methods=none,kd,crd,wcord
elif compgen -G "$FMNIST/train-images-idx3-ubyte*" > /dev/null; then
  python -m wcord_jax.tools.study --config configs/study.py:accelerator --workdir "$OUT/study" \
    --config.data_dir="$FMNIST"
else
  echo "skipped: Fashion-MNIST's idx files are not in $FMNIST (pass --fashion_mnist DIR holding" \
       "train-images-idx3-ubyte.gz and the other three, e.g. Debian's dataset-fashion-mnist)" >&2
  status=1
fi
exit $status
