"""``MobileNetV2`` = RepDistiller's ``mobile_half`` (``models/mobilenetv2.py``: T=6, width 0.5).

Stem conv3x3 stride 2 (16 channels) + BN + ReLU; inverted-residual stages with
(t, c, n, s) = (1,8,1,1) (6,12,2,1) (6,16,3,2) (6,32,4,2) (6,48,3,1) (6,80,3,2) (6,160,1,1);
conv1x1 to 1280 + BN + ReLU; global average pool (the reference's ``AvgPool2d(2, ceil_mode=True)``
on the 2x2 map of a 32x32 input); Linear(1280, classes).
Convs: N(0, sqrt(2 / (k*k*Cout))), no bias; BN (1, 0); classifier N(0, 0.01), bias 0.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, global_avg_pool, linear, logits_f32, normal_001

Dtype = Any


class InvertedResidual(nn.Module):
    """1x1 expand (ratio t) - depthwise 3x3 (stride) - 1x1 linear projection, each with BN;
    identity residual when the stride is 1 and the widths match."""

    out_planes: int
    stride: int
    expand_ratio: int
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        hidden = x.shape[-1] * self.expand_ratio
        out = conv2d(x, hidden, 1, name="conv_pw", **kw)
        out = nn.relu(batch_norm(out, train, name="bn_pw", **bn))
        out = conv2d(out, hidden, 3, stride=self.stride, padding=1, groups=hidden,
                     name="conv_dw", **kw)
        out = nn.relu(batch_norm(out, train, name="bn_dw", **bn))
        out = conv2d(out, self.out_planes, 1, name="conv_pwl", **kw)
        out = batch_norm(out, train, name="bn_pwl", **bn)
        if self.stride == 1 and x.shape[-1] == self.out_planes:
            out = x + out
        return out


class MobileNetV2Module(nn.Module):
    """MobileNetV2 (CIFAR variant of "Route Constrained Optimization").

    Features: [f0, f1, f2, f3, f4, f5] = stem, after stage 1, after stage 2, after stage 4,
    after stage 6 (0-based stage indices), pooled vector.  ``preact`` is accepted and ignored.
    """

    expand_ratio: int = 6
    width_mult: float = 0.5
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        del preact  # the reference ignores it for this family
        t = self.expand_ratio
        setting = ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2),
                   (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1))
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        x = conv2d(x, int(32 * self.width_mult), 3, stride=2, padding=1, dtype=self.dtype,
                   name="conv1")
        x = nn.relu(batch_norm(x, train, name="bn1", **bn))
        feats = [x]
        for stage, (ratio, c, n, s) in enumerate(setting):
            for i in range(n):
                x = InvertedResidual(int(c * self.width_mult), s if i == 0 else 1, ratio,
                                     dtype=self.dtype, axis_name=self.axis_name,
                                     name=f"blocks{stage}_{i}")(x, train)
            if stage in (1, 2, 4, 6):
                feats.append(x)
        last_channel = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = conv2d(x, last_channel, 1, dtype=self.dtype, name="conv2")
        x = nn.relu(batch_norm(x, train, name="bn2", **bn))
        x = global_avg_pool(x)
        feats.append(x)
        logits = linear(x, self.num_classes, kernel_init=normal_001, zero_bias=True,
                        dtype=self.dtype, name="classifier")
        return logits_f32(logits), feats


def MobileNetV2(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
                axis_name: Optional[str] = None) -> MobileNetV2Module:
    """RepDistiller's ``mobile_half``: MobileNetV2 with T=6, width multiplier 0.5."""
    return MobileNetV2Module(6, 0.5, num_classes=num_classes, dtype=dtype, axis_name=axis_name)
