"""The Fashion-MNIST distillation study (python -m wcord_jax.experiments.study --config configs/study.py).

A scaled-down copy of the CIFAR-100 protocol that fits in about an hour on 2 CPU cores: a resnet8 teacher trained on
all 60,000 training images, students (resnet8) distilled on a 3,000-image subset, every method and 3 seeds, plus a
WCoRD ablation. The step decays keep the recipe's shape (62.5%, 75%, 87.5% of training). `--config.preset=quick`
shrinks everything for a smoke run.
"""
from wcord_jax.experiments.study import study_config


def get_config(preset: str = "full"):
    return study_config(preset)
