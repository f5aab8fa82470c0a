"""CIFAR ResNets of RepDistiller's ``models/resnet.py``.

resnet8/14/20/32/44/56/110 (widths 16-16-32-64), resnet8x4 and resnet32x4 (32-64-128-256).

Three stages of ``BasicBlock`` (n = (depth - 2) / 6 blocks each) after a 3x3 conv-BN-ReLU stem.
Convs: kaiming-normal (fan_out, relu), no bias; BN (1, 0); classifier: PyTorch default init.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, pooled_head

Dtype = Any


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Returns ``(relu(out + residual), out + residual)``; the second value is the
    pre-activation used for ``preact=True`` features.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        kw = dict(dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        out = conv2d(x, self.planes, 3, stride=self.stride, padding=1, name="conv1", **kw)
        out = nn.relu(batch_norm(out, train, name="bn1", **bn))
        out = conv2d(out, self.planes, 3, padding=1, name="conv2", **kw)
        out = batch_norm(out, train, name="bn2", **bn)
        residual = x
        if self.downsample:
            residual = conv2d(x, self.planes, 1, stride=self.stride, name="down_conv", **kw)
            residual = batch_norm(residual, train, name="down_bn", **bn)
        preact = out + residual
        return nn.relu(preact), preact


class ResNet(nn.Module):
    """CIFAR ResNet; ``num_filters`` = (stem, stage1, stage2, stage3) widths.

    ``__call__(x, train, preact)`` returns ``(logits, [f0, f1, f2, f3, f4])`` with
    f0 the stem output, f1..f3 the stage outputs (pre-ReLU sums when ``preact``),
    f4 the pooled feature vector.
    """

    depth: int
    num_filters: Sequence[int]
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        if (self.depth - 2) % 6 != 0:
            raise ValueError("BasicBlock ResNet depth must be 6n+2")
        n = (self.depth - 2) // 6
        x = conv2d(x, self.num_filters[0], 3, padding=1, dtype=self.dtype, name="conv1")
        x = batch_norm(x, train, axis_name=self.axis_name, dtype=self.dtype, name="bn1")
        x = nn.relu(x)
        feats, pre_feats = [x], [x]
        inplanes = self.num_filters[0]
        for stage, planes in enumerate(self.num_filters[1:]):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                block = BasicBlock(
                    planes,
                    stride=stride,
                    downsample=(stride != 1 or inplanes != planes),
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"layer{stage + 1}_{i}",
                )
                x, pre = block(x, train)
                inplanes = planes
            feats.append(x)
            pre_feats.append(pre)
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, dtype=self.dtype, name="fc")


def _factory(depth: int, filters: Sequence[int]):
    def make(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> ResNet:
        return ResNet(depth, tuple(filters), num_classes=num_classes,
                      dtype=dtype, axis_name=axis_name)

    make.__doc__ = f"CIFAR ResNet-{depth} with widths {list(filters)}."
    return make


resnet8 = _factory(8, (16, 16, 32, 64))
resnet14 = _factory(14, (16, 16, 32, 64))
resnet20 = _factory(20, (16, 16, 32, 64))
resnet32 = _factory(32, (16, 16, 32, 64))
resnet44 = _factory(44, (16, 16, 32, 64))
resnet56 = _factory(56, (16, 16, 32, 64))
resnet110 = _factory(110, (16, 16, 32, 64))
resnet8x4 = _factory(8, (32, 64, 128, 256))
resnet32x4 = _factory(32, (32, 64, 128, 256))
