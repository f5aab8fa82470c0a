#!/usr/bin/env bash
# Installs wcord_jax and trains a small teacher on offline Fashion-MNIST for one epoch (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist
fi
python -m pip install -q -e '.[test]'
WORKDIR=${WORKDIR:-runs/demo}
python -m wcord_jax.main --config configs/teacher.py:resnet8 --workdir "$WORKDIR/teacher" \
  --config.dataset.name=fashion_mnist --config.num_epochs=1 "$@"
