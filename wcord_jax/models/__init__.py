"""Model zoo: RepDistiller's CIFAR-100 networks plus torchvision ResNet-18/34, in flax.linen.

``get_model(name, num_classes)`` returns a module whose
``apply(variables, x, train=..., preact=..., mutable=['batch_stats'] if train else False)``
takes NHWC images and returns ``(logits_float32, features)``, ``features`` being the list
RepDistiller's ``forward(x, is_feat=True, preact=preact)`` returns (converted to NHWC).
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

# name -> (family module, constructor); table order follows RepDistiller's model_dict.
_REGISTRY: dict[str, tuple[str, str]] = {
    "resnet8": ("resnet", "resnet8"),
    "resnet14": ("resnet", "resnet14"),
    "resnet20": ("resnet", "resnet20"),
    "resnet32": ("resnet", "resnet32"),
    "resnet44": ("resnet", "resnet44"),
    "resnet56": ("resnet", "resnet56"),
    "resnet110": ("resnet", "resnet110"),
    "resnet8x4": ("resnet", "resnet8x4"),
    "resnet32x4": ("resnet", "resnet32x4"),
    "ResNet50": ("resnetv2", "ResNet50"),
    "wrn_16_1": ("wrn", "wrn_16_1"),
    "wrn_16_2": ("wrn", "wrn_16_2"),
    "wrn_40_1": ("wrn", "wrn_40_1"),
    "wrn_40_2": ("wrn", "wrn_40_2"),
    "vgg8": ("vgg", "vgg8"),
    "vgg11": ("vgg", "vgg11"),
    "vgg13": ("vgg", "vgg13"),
    "vgg16": ("vgg", "vgg16"),
    "vgg19": ("vgg", "vgg19"),
    "MobileNetV2": ("mobilenetv2", "MobileNetV2"),
    "ShuffleV1": ("shufflenetv1", "ShuffleV1"),
    "ShuffleV2": ("shufflenetv2", "ShuffleV2"),
    "resnet18": ("imagenet_resnet", "resnet18"),
    "resnet34": ("imagenet_resnet", "resnet34"),
}


def list_models() -> list[str]:
    """All model names accepted by :func:`get_model`, in table order."""
    return list(_REGISTRY)


def get_model(
    name: str,
    num_classes: int,
    *,
    dtype: Any = jnp.float32,
    axis_name: Optional[str] = None,
) -> nn.Module:
    """Build the model called ``name``.

    Args:
      name: one of :func:`list_models`.
      num_classes: size of the classifier output.
      dtype: computation/activation dtype (parameters stay float32, logits are float32).
      axis_name: mesh/pmap axis over which BatchNorm averages batch statistics (sync BN).

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}"
        )
    module_name, attr = _REGISTRY[name]
    family = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(family, attr)(num_classes, dtype=dtype, axis_name=axis_name)


__all__ = ["get_model", "list_models"]
