"""VGG-BN networks of RepDistiller's ``models/vgg.py`` (vgg8/11/13/16/19 = ``vgg*_bn``).

Five conv blocks of conv3x3 (with bias) + BN + ReLU, the last ReLU of each block applied in the
forward pass so that pre-ReLU features exist; max-pool after blocks 0, 1, 2 and after block 3
only for 64x64 inputs; global average pool; Linear(512, classes).
Convs: N(0, sqrt(2 / (k*k*Cout))), bias 0; BN (1, 0); classifier N(0, 0.01), bias 0.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import batch_norm, conv2d, max_pool, normal_001, pooled_head

Dtype = Any

CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
    """VGG with batch norm; ``cfg`` lists the conv widths of the five blocks.

    Features: [f0..f4, f5] = the five block outputs after ReLU (f1..f4 before it when
    ``preact``; f0 is always post-ReLU) and the pooled 512-vector.
    """

    cfg: Sequence[Sequence[int]]
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None

    def _block(self, x: jax.Array, idx: int, train: bool) -> jax.Array:
        """conv-BN(-ReLU) stack of block ``idx``; returns the last BN output (before ReLU)."""
        widths = self.cfg[idx]
        for j, width in enumerate(widths):
            x = conv2d(x, width, 3, padding=1, use_bias=True, dtype=self.dtype,
                       name=f"block{idx}_conv{j}")
            x = batch_norm(x, train, axis_name=self.axis_name, dtype=self.dtype,
                           name=f"block{idx}_bn{j}")
            if j < len(widths) - 1:
                x = nn.relu(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        height = x.shape[1]
        x = nn.relu(self._block(x, 0, train))
        feats, pre_feats = [x], [x]
        for idx in range(1, 5):
            if idx < 4 or height == 64:  # pool0..pool2 always, pool3 only for 64x64 inputs
                x = max_pool(x, 2, 2)
            pre = self._block(x, idx, train)
            x = nn.relu(pre)
            feats.append(x)
            pre_feats.append(pre)
        return pooled_head(x, feats, pre_feats, self.num_classes, preact=preact, kernel_init=normal_001,
                           zero_bias=True, dtype=self.dtype, name="classifier")


def _factory(cfg_name: str, depth: int):
    def make(num_classes: int = 100, *, dtype: Dtype = jnp.float32,
             axis_name: Optional[str] = None) -> VGG:
        return VGG(CFGS[cfg_name], num_classes=num_classes, dtype=dtype, axis_name=axis_name)

    make.__doc__ = f"VGG-{depth} with batch norm (configuration {cfg_name!r})."
    return make


vgg8 = _factory("S", 8)
vgg11 = _factory("A", 11)
vgg13 = _factory("B", 13)
vgg16 = _factory("D", 16)
vgg19 = _factory("E", 19)
