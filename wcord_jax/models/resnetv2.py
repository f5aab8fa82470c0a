"""``ResNet50`` of RepDistiller's ``models/resnetv2.py``: a bottleneck ResNet with a CIFAR stem.

Stem: 3x3 stride-1 conv-BN-ReLU with 64 channels and no max-pool; four stages of bottleneck
blocks (expansion 4) with [3, 4, 6, 3] blocks; global average pool; linear classifier.
Convs: kaiming-normal (fan_out, relu), no bias; BN (1, 0); classifier: PyTorch default init.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, pooled_head

Dtype = Any


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), plus a projection shortcut
    when the shape changes.  Returns ``(relu(sum), sum)``."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        kw = dict(dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        width = self.planes * self.expansion
        out = conv2d(x, self.planes, 1, name="conv1", **kw)
        out = nn.relu(batch_norm(out, train, name="bn1", **bn))
        out = conv2d(out, self.planes, 3, stride=self.stride, padding=1, name="conv2", **kw)
        out = nn.relu(batch_norm(out, train, name="bn2", **bn))
        out = conv2d(out, width, 1, name="conv3", **kw)
        out = batch_norm(out, train, name="bn3", **bn)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != width:
            shortcut = conv2d(x, width, 1, stride=self.stride, name="shortcut_conv", **kw)
            shortcut = batch_norm(shortcut, train, name="shortcut_bn", **bn)
        preact = out + shortcut
        return nn.relu(preact), preact


class ResNetV2(nn.Module):
    """Bottleneck ResNet with a CIFAR stem.

    ``__call__(x, train, preact)`` returns ``(logits, [f0, f1, f2, f3, f4, f5])``: the stem
    output, the four stage outputs (pre-ReLU sums when ``preact``; RepDistiller nests that
    list one level deeper, here it stays flat) and the pooled vector.
    """

    num_blocks: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = conv2d(x, 64, 3, padding=1, dtype=self.dtype, name="conv1")
        x = batch_norm(x, train, axis_name=self.axis_name, dtype=self.dtype, name="bn1")
        x = nn.relu(x)
        feats, pre_feats = [x], [x]
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.num_blocks)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                x, pre = Bottleneck(planes, stride, dtype=self.dtype, axis_name=self.axis_name,
                                    name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(x)
            pre_feats.append(pre)
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, dtype=self.dtype, name="linear")


def ResNet50(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> ResNetV2:
    """RepDistiller's CIFAR ``ResNet50`` (bottleneck blocks [3, 4, 6, 3])."""
    return ResNetV2((3, 4, 6, 3), num_classes=num_classes, dtype=dtype, axis_name=axis_name)
