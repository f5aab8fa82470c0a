"""Shared building blocks for the model zoo.

Every model is a ``flax.linen`` module written in NHWC layout.  The helpers below create
sub-modules inside a ``@nn.compact`` method (so they must be called from one) and follow
PyTorch's defaults, which is what the RepDistiller reference networks were trained with:

* convolutions use explicit symmetric padding (PyTorch ``padding=p``), never ``'SAME'``,
  because ``'SAME'`` pads stride-2 layers asymmetrically;
* batch norm uses PyTorch's ``momentum=0.1`` (Flax ``momentum=0.9``) and ``eps=1e-5`` and
  takes an optional ``axis_name`` so statistics can be averaged across devices (sync BN);
* parameters are always float32, ``dtype`` only sets the computation/activation dtype.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# ``nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')``: N(0, 2 / (k*k*Cout)).
# (In this JAX, distribution "normal" is the plain, untruncated normal.)
# Flax counts fan_out of a (kh, kw, Cin/groups, Cout) kernel as kh*kw*Cout, like PyTorch.
# The same law is the explicit ``normal_(0, sqrt(2 / (k*k*Cout)))`` used by wrn/vgg/mobilenet.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal"
)

# PyTorch's default Conv/Linear weight init, ``kaiming_uniform_(a=sqrt(5))``,
# is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance scaling with scale 1/3.
torch_default_kernel: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)

# ``nn.init.normal_(w, 0, 0.01)`` used for the classifier of vgg and MobileNetV2.
normal_001: Initializer = nn.initializers.normal(stddev=0.01)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init for Conv/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = False,
    init: str = "kaiming",
    dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> jax.Array:
    """Apply a PyTorch-style ``Conv2d`` to NHWC ``x``.

    ``init='kaiming'`` gives kaiming-normal (fan_out, relu) weights and zero bias;
    ``init='torch'`` gives PyTorch's default uniform weight and bias init.
    """
    if init == "kaiming":
        kernel_init, bias_init = kaiming_normal_fan_out, nn.initializers.zeros
    elif init == "torch":
        fan_in = (x.shape[-1] // groups) * kernel_size * kernel_size
        kernel_init, bias_init = torch_default_kernel, torch_default_bias(fan_in)
    else:
        raise ValueError(f"unknown conv init {init!r}")
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def make_batch_norm(
    *,
    axis_name: Optional[str] = None,
    dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> nn.BatchNorm:
    """An unapplied ``BatchNorm2d``/``BatchNorm1d`` with PyTorch defaults (gamma=1, beta=0).

    Call it as ``bn(x, use_running_average=not train)``.  Useful where one BN layer is applied
    twice (WideResNet's ``preact`` features) or created in ``setup``.
    """
    return nn.BatchNorm(
        use_running_average=None,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def batch_norm(
    x: jax.Array,
    train: bool,
    *,
    axis_name: Optional[str] = None,
    dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> jax.Array:
    """Apply a PyTorch-default BatchNorm to ``x`` (created in the calling compact method).

    In train mode the batch statistics are used (and averaged over ``axis_name`` when given)
    and the running averages in the ``batch_stats`` collection are updated.
    """
    bn = make_batch_norm(axis_name=axis_name, dtype=dtype, name=name)
    return bn(x, use_running_average=not train)


def linear(
    x: jax.Array,
    features: int,
    *,
    kernel_init: Optional[Initializer] = None,
    zero_bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> jax.Array:
    """PyTorch ``nn.Linear``; default init unless ``kernel_init``/``zero_bias`` override it."""
    fan_in = x.shape[-1]
    return nn.Dense(
        features,
        kernel_init=torch_default_kernel if kernel_init is None else kernel_init,
        bias_init=nn.initializers.zeros if zero_bias else torch_default_bias(fan_in),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W of an NHWC map (accumulated in float32), returning (N, C)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def pooled_head(x: jax.Array, feats: list, pre_feats: list, num_classes: int, *, preact: bool, dtype: Dtype,
                name: str, **linear_kwargs):
    """The common end of the zoo's networks: global-average pool, append the pooled vector to both feature lists,
    classify with `linear` (named `name`); returns (float32 logits, `pre_feats` if `preact` else `feats`)."""
    x = global_avg_pool(x)
    feats.append(x)
    pre_feats.append(x)
    logits = linear(x, num_classes, dtype=dtype, name=name, **linear_kwargs)
    return logits_f32(logits), (pre_feats if preact else feats)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch ``MaxPool2d(kernel, stride, padding)`` (padding counts as -inf)."""
    return nn.max_pool(
        x,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch ``AvgPool2d(kernel, stride, padding)`` with ``count_include_pad=True``."""
    return nn.avg_pool(
        x,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        count_include_pad=True,
    )


def logits_f32(x: jax.Array) -> jax.Array:
    """Logits are always returned in float32, whatever the computation dtype."""
    return x.astype(jnp.float32)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet channel shuffle on NHWC: channels (g, C/g) -> (C/g, g), as the NCHW reference."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)
