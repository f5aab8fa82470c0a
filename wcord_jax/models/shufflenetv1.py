"""``ShuffleV1`` of RepDistiller's ``models/ShuffleNetv1.py`` (ShuffleNet v1, groups 3).

Stem conv1x1 3->24 + BN + ReLU without downsampling; three stages with out_planes
[240, 480, 960] and [4, 8, 4] blocks; the first block of each stage has stride 2 and concatenates
an average-pooled shortcut; global average pool; Linear(960, classes).
All convs and the classifier keep PyTorch's default init; convs have no bias.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import avg_pool, batch_norm, channel_shuffle, conv2d, pooled_head

Dtype = Any


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1 bottleneck.

    Stride 2 concatenates ``AvgPool2d(3, 2, 1)`` of the input; stride 1 adds the input.
    The first 1x1 conv is ungrouped when the input has 24 channels (the stem width), as in
    the reference.  Returns ``(relu(preact), preact)``.
    """

    out_planes: int
    stride: int
    groups: int
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        conv = dict(init="torch", dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        mid = int(self.out_planes / 4)
        g1 = 1 if x.shape[-1] == 24 else self.groups
        out = conv2d(x, mid, 1, groups=g1, name="conv1", **conv)
        out = nn.relu(batch_norm(out, train, name="bn1", **bn))
        out = channel_shuffle(out, g1)
        out = conv2d(out, mid, 3, stride=self.stride, padding=1, groups=mid, name="conv2", **conv)
        out = nn.relu(batch_norm(out, train, name="bn2", **bn))
        out = conv2d(out, self.out_planes, 1, groups=self.groups, name="conv3", **conv)
        out = batch_norm(out, train, name="bn3", **bn)
        if self.stride == 2:
            preact = jnp.concatenate([out, avg_pool(x, 3, 2, 1).astype(out.dtype)], axis=-1)
        else:
            preact = out + x
        return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 for 32x32 inputs.

    Features: [f0, f1, f2, f3, f4] = stem, three stage outputs (pre-ReLU when ``preact``),
    pooled vector.
    """

    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = conv2d(x, 24, 1, init="torch", dtype=self.dtype, name="conv1")
        x = nn.relu(batch_norm(x, train, axis_name=self.axis_name, dtype=self.dtype, name="bn1"))
        feats, pre_feats = [x], [x]
        for stage, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks)):
            for i in range(blocks):
                # the stride-2 block concatenates its input, so it only makes the difference
                width = planes - x.shape[-1] if i == 0 else planes
                x, pre = ShuffleBottleneck(width, 2 if i == 0 else 1, self.groups,
                                           dtype=self.dtype, axis_name=self.axis_name,
                                           name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(x)
            pre_feats.append(pre)
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, dtype=self.dtype, name="linear")


def ShuffleV1(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
              axis_name: Optional[str] = None) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: out_planes [240, 480, 960], blocks [4, 8, 4], groups 3."""
    return ShuffleNetV1(num_classes=num_classes, dtype=dtype, axis_name=axis_name)
