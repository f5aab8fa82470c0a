"""Teacher (or any network alone) trained with cross-entropy: RepDistiller's CIFAR-100 recipe.

Usage: python -m wcord_jax.main --config configs/teacher.py:resnet32x4 --workdir runs/resnet32x4
Any key can be overridden, e.g. --config.num_epochs=2 --config.dataset.name=fashion_mnist.
"""
from wcord_jax import configs as base


def get_config(arg: str = "resnet32x4"):
    return base.teacher_config(arg or "resnet32x4")
