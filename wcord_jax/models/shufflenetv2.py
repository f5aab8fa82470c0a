"""``ShuffleV2`` of RepDistiller's ``models/ShuffleNetv2.py`` (ShuffleNet v2, net_size 1).

Stem conv1x1 3->24 + BN + ReLU without downsampling; three stages (116, 232, 464 channels),
each a stride-2 ``DownBlock`` followed by (3, 7, 3) split/shuffle ``BasicBlock``s;
conv1x1 464->1024 + BN + ReLU; global average pool; Linear(1024, classes).
All convs and the classifier keep PyTorch's default init; convs have no bias.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, channel_shuffle, conv2d, pooled_head

Dtype = Any


class SplitBlock(nn.Module):
    """Channel split (ratio 0.5): the first half passes through, the second goes through
    1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concatenate and shuffle (2 groups).

    Returns ``(shuffled output, preact)`` where ``preact`` is ``[x1, last BN output]``
    concatenated *without* the shuffle, exactly as the reference.
    """

    split_ratio: float = 0.5
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        conv = dict(init="torch", dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        c = int(x.shape[-1] * self.split_ratio)
        x1, x2 = x[..., :c], x[..., c:]
        out = conv2d(x2, c, 1, name="conv1", **conv)
        out = nn.relu(batch_norm(out, train, name="bn1", **bn))
        out = conv2d(out, c, 3, padding=1, groups=c, name="conv2", **conv)
        out = batch_norm(out, train, name="bn2", **bn)
        out = conv2d(out, c, 1, name="conv3", **conv)
        pre = batch_norm(out, train, name="bn3", **bn)
        x1 = x1.astype(pre.dtype)
        out = channel_shuffle(jnp.concatenate([x1, nn.relu(pre)], axis=-1), 2)
        return out, jnp.concatenate([x1, pre], axis=-1)


class DownBlock(nn.Module):
    """Stride-2 block: left branch dw3x3(s2)-BN-1x1-BN-ReLU, right branch
    1x1-BN-ReLU-dw3x3(s2)-BN-1x1-BN-ReLU, each to out/2 channels; concatenate and shuffle."""

    out_channels: int
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dict(init="torch", dtype=self.dtype)
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        cin = x.shape[-1]
        mid = self.out_channels // 2
        left = conv2d(x, cin, 3, stride=2, padding=1, groups=cin, name="conv1", **conv)
        left = batch_norm(left, train, name="bn1", **bn)
        left = conv2d(left, mid, 1, name="conv2", **conv)
        left = nn.relu(batch_norm(left, train, name="bn2", **bn))
        right = conv2d(x, mid, 1, name="conv3", **conv)
        right = nn.relu(batch_norm(right, train, name="bn3", **bn))
        right = conv2d(right, mid, 3, stride=2, padding=1, groups=mid, name="conv4", **conv)
        right = batch_norm(right, train, name="bn4", **bn)
        right = conv2d(right, mid, 1, name="conv5", **conv)
        right = nn.relu(batch_norm(right, train, name="bn5", **bn))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 for 32x32 inputs.

    Features: [f0, f1, f2, f3, f4] = stem, three stage outputs (the last block's unshuffled
    pre-ReLU concat when ``preact``), pooled vector after the final 1x1 conv-BN-ReLU.
    """

    out_channels: Sequence[int] = (116, 232, 464, 1024)
    num_blocks: Sequence[int] = (3, 7, 3)
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        bn = dict(axis_name=self.axis_name, dtype=self.dtype)
        x = conv2d(x, 24, 1, init="torch", dtype=self.dtype, name="conv1")
        x = nn.relu(batch_norm(x, train, name="bn1", **bn))
        feats, pre_feats = [x], [x]
        for stage, (width, blocks) in enumerate(zip(self.out_channels[:3], self.num_blocks)):
            x = DownBlock(width, dtype=self.dtype, axis_name=self.axis_name,
                          name=f"layer{stage + 1}_down")(x, train)
            for i in range(blocks):
                x, pre = SplitBlock(dtype=self.dtype, axis_name=self.axis_name,
                                    name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(x)
            pre_feats.append(pre)
        x = conv2d(x, self.out_channels[3], 1, init="torch", dtype=self.dtype, name="conv2")
        x = nn.relu(batch_norm(x, train, name="bn2", **bn))
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, dtype=self.dtype, name="linear")


def ShuffleV2(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
              axis_name: Optional[str] = None) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net_size 1: channels 116/232/464/1024, blocks 3/7/3)."""
    return ShuffleNetV2(num_classes=num_classes, dtype=dtype, axis_name=axis_name)
