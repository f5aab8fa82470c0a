"""Small trainable modules of RepDistiller's feature-based distillers (its `models/util.py`), in flax.linen, NHWC.

* `ConvReg`: FitNet's regressor (and, without ReLU, AB's connector layers).
* `Connector`: AB's per-layer connectors.
* `Paraphraser`, `Translator`: FT's teacher auto-encoder and student translator.
* `VIDRegressor`: VID's per-layer regressor and learned variance (RepDistiller keeps them inside `VIDLoss`).
* `LinearEmbed`: CC's linear embedding.
* `ConvTranspose2d`: PyTorch's transposed convolution (output size and padding semantics), used by the above.

Conventions follow `wcord_jax.models.common`: PyTorch default initialisation (weights and biases
U(±1/sqrt(fan_in)), BatchNorm gamma 1 / beta 0), BatchNorm with PyTorch's momentum 0.1 (flax 0.9) and eps 1e-5
(`common.batch_norm`), parameters in float32 and `dtype` the computation dtype. Convolution weights are drawn as a
flat vector and reshaped: with `jax_threefry_partitionable` (the default), XLA:CPU takes seconds to compile one
random draw of a 4-D shape, and a flat draw has the same distribution.

Shapes given to constructors are NHWC `(N, H, W, C)` (e.g. `features[i].shape`); only H, W and C are used. Every
module takes `axis_name`, the mesh axis over which its BatchNorm layers average batch statistics (sync BN) inside
`jax.shard_map`; for modules without BatchNorm it is accepted (so all modules can be built alike) and unused.
Modules with BatchNorm take `train`: call them with `mutable=['batch_stats']` when it is True.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from wcord_jax.losses._common import adaptive_avg_pool2d
from wcord_jax.models.common import batch_norm, linear

Dtype = Any
Shape = Sequence[int]


def _uniform(bound: float):
    """U(-bound, bound), drawn flat and reshaped (see the module docstring)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, (int(np.prod(shape)),), dtype, -bound, bound).reshape(shape)

    return init


def _conv(x: jax.Array, features: int, kernel_size, *, stride: int = 1, padding: int = 0, use_bias: bool = True,
          dtype: Dtype = jnp.float32, name: Optional[str] = None) -> jax.Array:
    """PyTorch `nn.Conv2d(Cin, features, kernel_size, stride, padding, bias=use_bias)` with its default init.

    Weight and bias U(±1/sqrt(Cin·kh·kw)); parameters `kernel` [kh, kw, Cin, features] and `bias`, as
    `common.conv2d(..., init='torch')`.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    init = _uniform(1.0 / math.sqrt(x.shape[-1] * kh * kw))
    return nn.Conv(features, (kh, kw), strides=(stride, stride), padding=((padding, padding), (padding, padding)),
                   use_bias=use_bias, kernel_init=init, bias_init=init, dtype=dtype, param_dtype=jnp.float32,
                   name=name)(x)


def _leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=0.1)


class ConvTranspose2d(nn.Module):
    """PyTorch's `nn.ConvTranspose2d(Cin, features, kernel_size, stride, padding, output_padding)` on NHWC input.

    Output size (H - 1)·stride - 2·padding + kernel_size + output_padding, as PyTorch. Each input pixel x[i] adds
    x[i]·W[k] to output position i·stride - padding + k. Computed as a convolution of the input dilated by `stride`
    and padded by (k-1-padding, k-1-padding+output_padding) with the spatially flipped kernel.

    The kernel is stored as `kernel[ky, kx, cin, cout]` = PyTorch's `weight[cin, cout, ky, kx]`. Initialisation is
    PyTorch's default, whose fan-in for a transposed convolution is computed from its weight's dimension 1, i.e.
    `cout·k·k`: weight and bias are U(±1/sqrt(cout·k·k)).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        if not 0 <= p <= k - 1:
            raise ValueError(f"ConvTranspose2d: padding {p} must be in [0, kernel_size - 1 = {k - 1}]")
        bound = 1.0 / math.sqrt(self.features * k * k)
        kernel = self.param("kernel", _uniform(bound), (k, k, x.shape[-1], self.features), jnp.float32)
        lo, hi = k - 1 - p, k - 1 - p + self.output_padding
        y = lax.conv_general_dilated(
            x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype), window_strides=(1, 1),
            padding=((lo, hi), (lo, hi)), lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", _uniform(bound), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class ConvReg(nn.Module):
    """RepDistiller's `ConvReg`: maps a student map of shape `s_shape` onto the teacher's `t_shape`, then BN (+ ReLU).

    The layer depends on the heights s_H, t_H (as RepDistiller):

    * s_H == 2·t_H: Conv 3x3, stride 2, padding 1 (with bias);
    * 2·s_H == t_H: ConvTranspose 4x4, stride 2, padding 1 (with bias), which doubles H and W;
    * s_H >= t_H otherwise: Conv with kernel (1 + s_H - t_H, 1 + s_W - t_W), stride 1, no padding (with bias);
      equal sizes give a 1x1 conv;
    * anything else raises ValueError (RepDistiller's `raise NotImplemented(...)` itself fails with a TypeError).

    followed by BatchNorm(t_C) and, if `use_relu`, ReLU. FitNet uses it with ReLU on `features[hint_layer]`; AB's
    `Connector` uses it without. PyTorch default initialisation throughout.
    """

    s_shape: Shape
    t_shape: Shape
    use_relu: bool = True
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _, s_h, s_w, s_c = self.s_shape
        _, t_h, t_w, t_c = self.t_shape
        if tuple(x.shape[1:]) != (s_h, s_w, s_c):
            raise ValueError(f"ConvReg built for student maps {tuple(self.s_shape)}, got {x.shape}")
        if s_h == 2 * t_h:
            y = _conv(x, t_c, 3, stride=2, padding=1, dtype=self.dtype, name="conv")
        elif 2 * s_h == t_h:
            y = ConvTranspose2d(t_c, 4, stride=2, padding=1, dtype=self.dtype, name="conv")(x)
        elif s_h >= t_h:
            y = _conv(x, t_c, (1 + s_h - t_h, 1 + s_w - t_w), dtype=self.dtype, name="conv")
        else:
            raise ValueError(f"ConvReg: no rule for student height {s_h} -> teacher height {t_h} (student smaller, "
                             "but not half)")
        y = batch_norm(y, train, axis_name=self.axis_name, dtype=self.dtype, name="bn")
        return nn.relu(y) if self.use_relu else y


class Connector(nn.Module):
    """RepDistiller's `Connector` for AB: one connector per feature level.

    Level i is the identity when the student and teacher maps have the same channel count and height, else a
    `ConvReg(s_shapes[i], t_shapes[i], use_relu=False)` (conv + BatchNorm, no ReLU). The identity levels have no
    parameters; the others are named `connector_{i}`. RepDistiller trains it (with the student's feature layers)
    during AB's init stage only, then freezes it.
    """

    s_shapes: Sequence[Shape]
    t_shapes: Sequence[Shape]
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, g_s: Sequence[jax.Array], train: bool) -> list[jax.Array]:
        if not len(self.s_shapes) == len(self.t_shapes) == len(g_s):
            raise ValueError(f"Connector: {len(self.s_shapes)} student shapes, {len(self.t_shapes)} teacher shapes, "
                             f"{len(g_s)} maps")
        out = []
        for i, (x, s, t) in enumerate(zip(g_s, self.s_shapes, self.t_shapes)):
            if s[-1] == t[-1] and s[1] == t[1]:
                out.append(x)
            else:
                out.append(ConvReg(tuple(s), tuple(t), use_relu=False, axis_name=self.axis_name, dtype=self.dtype,
                                   name=f"connector_{i}")(x, train))
        return out


class Paraphraser(nn.Module):
    """RepDistiller's `Paraphraser` (FT's teacher auto-encoder) for teacher maps of shape `t_shape`.

    With C = t_C and C' = int(C·k):

    * encoder: Conv3x3(C->C) [BN] LeakyReLU(0.1), Conv3x3(C->C') [BN] LeakyReLU, Conv3x3(C'->C') [BN] LeakyReLU;
    * decoder: ConvT3x3(C'->C') [BN] LeakyReLU, ConvT3x3(C'->C) [BN] LeakyReLU, ConvT3x3(C->C) [BN] LeakyReLU;

    all stride 1, padding 1, with bias, PyTorch default init. BatchNorm only if `use_bn`, which is False by default
    and in RepDistiller's use (so `train` then has no effect). Returns `(factor, reconstruction)`, or only the factor
    with `is_factor=True`. The reconstruction also ends with a LeakyReLU. RepDistiller trains it for 30 epochs on
    MSE(reconstruction, teacher `features[-2]`), then freezes it and uses the factor.
    """

    t_shape: Shape
    k: float = 0.5
    use_bn: bool = False
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, is_factor: bool = False):
        c = self.t_shape[-1]
        c_out = int(c * self.k)

        def bn_act(y, name):
            if self.use_bn:
                y = batch_norm(y, train, axis_name=self.axis_name, dtype=self.dtype, name=name)
            return _leaky_relu(y)

        y = x
        for i, ch in enumerate((c, c_out, c_out)):
            y = _conv(y, ch, 3, padding=1, dtype=self.dtype, name=f"encoder_conv{i}")
            y = bn_act(y, f"encoder_bn{i}")
        factor = y
        if is_factor:
            return factor
        for i, ch in enumerate((c_out, c, c)):
            y = ConvTranspose2d(ch, 3, stride=1, padding=1, dtype=self.dtype, name=f"decoder_convT{i}")(y)
            y = bn_act(y, f"decoder_bn{i}")
        return factor, y


class Translator(nn.Module):
    """RepDistiller's `Translator` (FT's student-side factor network), student maps `s_shape` -> teacher factors.

    With C = s_C and C' = int(t_C·k): Conv3x3(C->C) BN LeakyReLU(0.1), Conv3x3(C->C') BN LeakyReLU,
    Conv3x3(C'->C') BN LeakyReLU; stride 1, padding 1, with bias. BatchNorm by default (`use_bn=True`, unlike the
    Paraphraser). Trained jointly with the student.
    """

    s_shape: Shape
    t_shape: Shape
    k: float = 0.5
    use_bn: bool = True
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.s_shape[-1]
        c_out = int(self.t_shape[-1] * self.k)
        y = x
        for i, ch in enumerate((c, c_out, c_out)):
            y = _conv(y, ch, 3, padding=1, dtype=self.dtype, name=f"conv{i}")
            if self.use_bn:
                y = batch_norm(y, train, axis_name=self.axis_name, dtype=self.dtype, name=f"bn{i}")
            y = _leaky_relu(y)
        return y


class VIDRegressor(nn.Module):
    """The trainable part of RepDistiller's `VIDLoss` for one layer: mean regressor and per-channel variance.

    mu = Conv1x1(C_s->mid) ReLU Conv1x1(mid->mid) ReLU Conv1x1(mid->C_t), no biases, PyTorch default init;
    var = softplus(log_scale) + eps, one per target channel, log_scale initialised to log(exp(init_pred_var - eps) - 1)
    so that var starts at `init_pred_var` (5.0). RepDistiller builds it as `VIDLoss(C_s, C_t, C_t)`, i.e.
    mid = C_t. Returns `(mu, var)` for `losses.vid_loss`.

    If `target_size` (the teacher map's height) is given and the student map is taller, the student map is first
    adaptive-avg-pooled to (target_size, target_size), as RepDistiller does before its regressor.
    """

    num_mid_channel: int
    num_target_channels: int
    init_pred_var: float = 5.0
    eps: float = 1e-5
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, target_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
        if target_size is not None and x.shape[1] > target_size:
            x = adaptive_avg_pool2d(x, (target_size, target_size))
        y = nn.relu(_conv(x, self.num_mid_channel, 1, use_bias=False, dtype=self.dtype, name="conv0"))
        y = nn.relu(_conv(y, self.num_mid_channel, 1, use_bias=False, dtype=self.dtype, name="conv1"))
        mu = _conv(y, self.num_target_channels, 1, use_bias=False, dtype=self.dtype, name="conv2")
        init_value = float(np.log(np.exp(self.init_pred_var - self.eps) - 1.0))
        log_scale = self.param("log_scale", nn.initializers.constant(init_value), (self.num_target_channels,),
                               jnp.float32)
        var = jax.nn.softplus(log_scale) + self.eps
        return mu, var


class LinearEmbed(nn.Module):
    """RepDistiller's `LinearEmbed` (CC's embedding): flatten, then Linear(dim -> dim_out), no normalisation.

    PyTorch default Linear init. The flattening order of an NHWC input differs from RepDistiller's NCHW one; CC
    applies it to pooled vectors (`features[-1]`), where the two agree.
    """

    dim_out: int = 128
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return linear(x, self.dim_out, dtype=self.dtype, name="linear")


__all__ = ["Connector", "ConvReg", "ConvTranspose2d", "LinearEmbed", "Paraphraser", "Translator", "VIDRegressor"]
