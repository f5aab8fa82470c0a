"""torchvision ``resnet18`` / ``resnet34`` (ImageNet layout) for the ImageNet experiments.

Stem: 7x7 stride-2 conv (64, no bias) + BN + ReLU + 3x3 stride-2 max-pool; four stages of basic
blocks (64, 128, 256, 512 channels; [2, 2, 2, 2] or [3, 4, 6, 3] blocks), the stride on the
first 3x3 conv of a stage and a 1x1-conv + BN projection shortcut; global average pool; fc.
Convs: kaiming-normal (fan_out, relu); BN (1, 0); fc: PyTorch default init.

torchvision's ``forward`` returns only logits; the feature list follows RepDistiller's ResNets:
[stem (after ReLU, before the max-pool), four stage outputs (pre-ReLU sums with ``preact``),
pooled vector].
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, max_pool, pooled_head
from .resnet import BasicBlock

Dtype = Any


class ImageNetResNet(nn.Module):
    """torchvision ResNet with basic blocks; ``layers`` = blocks per stage."""

    layers: Sequence[int]
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = conv2d(x, 64, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")
        x = nn.relu(batch_norm(x, train, axis_name=self.axis_name, dtype=self.dtype, name="bn1"))
        feats, pre_feats = [x], [x]
        x = max_pool(x, 3, 2, 1)
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                x, pre = BasicBlock(planes, stride=stride,
                                    downsample=(stride != 1 or inplanes != planes),
                                    dtype=self.dtype, axis_name=self.axis_name,
                                    name=f"layer{stage + 1}_{i}")(x, train)
                inplanes = planes
            feats.append(x)
            pre_feats.append(pre)
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, dtype=self.dtype, name="fc")


def resnet18(num_classes: int = 1000, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> ImageNetResNet:
    """torchvision ResNet-18 (11,689,512 parameters with 1000 classes)."""
    return ImageNetResNet((2, 2, 2, 2), num_classes=num_classes, dtype=dtype, axis_name=axis_name)


def resnet34(num_classes: int = 1000, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> ImageNetResNet:
    """torchvision ResNet-34 (21,797,672 parameters with 1000 classes)."""
    return ImageNetResNet((3, 4, 6, 3), num_classes=num_classes, dtype=dtype, axis_name=axis_name)
