#!/usr/bin/env bash
# The whole story on offline Fashion-MNIST, on a fresh machine: install, train a small teacher (resnet14), distil a
# resnet8 student from it with WCoRD, train the same student alone for comparison, and print the three accuracies.
# One epoch each: about ten minutes on 2 CPU cores. Extra arguments go to every run (e.g. --config.num_epochs=3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist
fi
python -m pip install -q -e '.[test]'
WORKDIR=${WORKDIR:-runs/demo}
TEACHER=${TEACHER:-resnet14}
STUDENT=${STUDENT:-resnet8}
COMMON=(--config.dataset.name=fashion_mnist --config.num_epochs=1)
python -m wcord_jax.main --config "configs/teacher.py:$TEACHER" --workdir "$WORKDIR/teacher" "${COMMON[@]}" "$@"
python -m wcord_jax.main --config "configs/distill.py:wcord,$TEACHER,$STUDENT" --workdir "$WORKDIR/wcord" \
  --config.teacher.checkpoint="$WORKDIR/teacher" "${COMMON[@]}" "$@"
python -m wcord_jax.main --config "configs/distill.py:none,$TEACHER,$STUDENT" --workdir "$WORKDIR/alone" \
  --config.teacher.checkpoint="$WORKDIR/teacher" "${COMMON[@]}" "$@"
python -m wcord_jax.tools.summary "$WORKDIR/teacher" "$WORKDIR/wcord" "$WORKDIR/alone"
