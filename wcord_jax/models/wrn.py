"""Wide ResNets of RepDistiller's ``models/wrn.py`` (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Pre-activation blocks, n = (depth - 4) / 6 per stage, widths [16, 16w, 32w, 64w], no dropout.
Convs: N(0, sqrt(2 / (k*k*Cout))) (= kaiming-normal fan_out), no bias; BN (1, 0);
classifier: PyTorch default weight, zero bias.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, make_batch_norm, pooled_head

Dtype = Any


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut.

    When the channel count changes, the shortcut conv reads the BN-ReLU'd input (as in the
    reference).  With ``preact=True`` the block applies ``bn1`` to its input a second time, as
    RepDistiller's ``forward(preact=True)`` does (so in train mode its running statistics are
    updated twice), and returns that result; otherwise the second value is ``None``.
    """

    out_planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, preact: bool = False):
        equal_in_out = x.shape[-1] == self.out_planes
        bn1 = make_batch_norm(axis_name=self.axis_name, dtype=self.dtype, name="bn1")
        act = nn.relu(bn1(x, use_running_average=not train))
        bn1_again = bn1(x, use_running_average=not train) if preact else None
        out = conv2d(act, self.out_planes, 3, stride=self.stride, padding=1,
                     dtype=self.dtype, name="conv1")
        out = batch_norm(out, train, axis_name=self.axis_name, dtype=self.dtype, name="bn2")
        out = conv2d(nn.relu(out), self.out_planes, 3, padding=1, dtype=self.dtype, name="conv2")
        if equal_in_out:
            shortcut = x
        else:
            shortcut = conv2d(act, self.out_planes, 1, stride=self.stride,
                              dtype=self.dtype, name="conv_shortcut")
        return shortcut + out, bn1_again


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs.

    Features: f0 = raw stem conv, f1..f3 = stage outputs (f3 before the final BN-ReLU),
    f4 = pooled vector after BN-ReLU.  With ``preact`` f1, f2, f3 are passed through the BN
    that follows them (first block of the next stage / the final BN), BN only, no ReLU.
    """

    depth: int
    widen_factor: int
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        if (self.depth - 4) % 6 != 0:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (self.depth - 4) // 6
        w = self.widen_factor
        x = conv2d(x, 16, 3, padding=1, dtype=self.dtype, name="conv1")
        feats, pre_feats = [x], [x]
        for stage, planes in enumerate((16 * w, 32 * w, 64 * w)):
            for i in range(n):
                first_of_later_stage = stage > 0 and i == 0
                block = WideBasicBlock(planes, stride=2 if first_of_later_stage else 1,
                                       dtype=self.dtype, axis_name=self.axis_name,
                                       name=f"block{stage + 1}_{i}")
                x, bn_pre = block(x, train, preact and first_of_later_stage)
                if bn_pre is not None:
                    pre_feats[stage] = bn_pre  # previous stage output through this block's bn1
            feats.append(x)
            pre_feats.append(x)
        bn_final = make_batch_norm(axis_name=self.axis_name, dtype=self.dtype, name="bn1")
        out = nn.relu(bn_final(x, use_running_average=not train))
        if preact:
            pre_feats[3] = bn_final(x, use_running_average=not train)
        return pooled_head(out, feats, pre_feats, self.num_classes, preact=preact, zero_bias=True,
                           dtype=self.dtype, name="fc")


def _factory(depth: int, widen: int):
    def make(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> WideResNet:
        return WideResNet(depth, widen, num_classes=num_classes, dtype=dtype, axis_name=axis_name)

    make.__doc__ = f"WRN-{depth}-{widen}."
    return make


wrn_16_1 = _factory(16, 1)
wrn_16_2 = _factory(16, 2)
wrn_40_1 = _factory(40, 1)
wrn_40_2 = _factory(40, 2)
