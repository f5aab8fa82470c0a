"""Linear-probe transfer of a trained network (CRD, Table 4): configs/linear_probe.py:DATASET.

DATASET is stl10, tiny_imagenet, fashion_mnist_heldout (offline), or one of the library's in-memory data sets. The
network is a finished teacher or distillation run's (the student of a distillation run). Example:

  python -m wcord_jax.main --config configs/linear_probe.py:stl10 --workdir runs/probe_stl10 \\
      --config.student.checkpoint=runs/student

Offline, with a network trained on Fashion-MNIST classes 0-4 only:

  python -m wcord_jax.main --config configs/teacher.py:resnet8 --workdir runs/t04 --config.dataset.name=fashion_mnist \\
      --config.dataset.classes=0,1,2,3,4
  python -m wcord_jax.main --config configs/linear_probe.py:fashion_mnist_heldout --workdir runs/probe59 \\
      --config.student.checkpoint=runs/t04
"""
from wcord_jax.tools.probe import probe_config


def get_config(arg: str = "stl10"):
    return probe_config(arg or "stl10")
