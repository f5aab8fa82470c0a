"""Embedding heads for the contrastive distillers (CRD, WCoRD)."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

SPECTRAL_COLLECTION = "spectral"


def torch_linear_init(fan_in: int):
    """PyTorch's default `nn.Linear` initialiser for both weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (kaiming_uniform with a = sqrt(5) on the weight reduces to this bound.)
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Embed(nn.Module):
    """RepDistiller's `Embed`: flatten, Linear(dim -> features), then L2 normalisation.

    `y = W x + b`, then `y / sqrt(sum(y²))` along the feature axis. RepDistiller's `Normalize` has no epsilon and
    neither has this one, so an exactly-zero pre-activation gives NaN (as in RepDistiller). Weight and bias use
    PyTorch's default Linear initialisation (`torch_linear_init`). features = 128 is RepDistiller's `--feat_dim`.

    With `spectral_norm=True` (WCoRD's Lipschitz critic) the kernel is divided by its largest singular value,
    estimated by power iteration (`flax.linen.SpectralNorm`, `power_iterations` steps per call). The power-iteration
    vector `u` and the estimate `sigma` live in the variable collection `spectral` and are only written when
    `update_stats=True` (then apply with `mutable=['spectral']`); pass the collection in the variables in every
    call. Each training step therefore refines the estimate by `power_iterations` steps, and the effective kernel
    W / sigma has spectral norm close to 1, so the linear map is (about) 1-Lipschitz. The bias is not normalised.
    The parameters are `params/linear/{kernel,bias}` with or without spectral normalisation; the statistics are
    `spectral/spectral_norm/{linear/kernel/u, linear/kernel/sigma}`.

    Attributes:
      features: output dimension.
      normalize: apply the L2 normalisation (RepDistiller's heads always do).
      spectral_norm: divide the kernel by its estimated largest singular value.
      power_iterations: power-iteration steps per call when `spectral_norm`.
      dtype: computation dtype of the linear layer (None: inferred); the output is float32.
    """

    features: int = 128
    normalize: bool = True
    spectral_norm: bool = False
    power_iterations: int = 1
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        init = torch_linear_init(x.shape[-1])
        dense = nn.Dense(self.features, kernel_init=init, bias_init=init, dtype=self.dtype, name="linear")
        if self.spectral_norm:
            y = nn.SpectralNorm(dense, n_steps=self.power_iterations, collection_name=SPECTRAL_COLLECTION,
                                name="spectral_norm")(x, update_stats=update_stats)
        else:
            y = dense(x)
        y = y.astype(jnp.float32)
        if self.normalize:
            y = y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True))
        return y


def apply_embed(module: Embed, params, spectral, x: jax.Array, update: bool):
    """`module` applied to `x`: (embedding, spectral-norm statistics after the call). With spectral normalisation
    (`spectral` non-empty) and `update`, the power iteration advances and the new statistics are returned."""
    variables = {"params": params}
    if spectral:
        variables[SPECTRAL_COLLECTION] = spectral
        out, new = module.apply(variables, x, update_stats=update, mutable=[SPECTRAL_COLLECTION])
        return out, new[SPECTRAL_COLLECTION]
    return module.apply(variables, x), spectral


def embedding_health(emb_s: jax.Array, emb_t: jax.Array, axis_name: Optional[str]) -> dict:
    """Health of the heads over the global batch: the mean cosine of positive pairs (alignment) and the mean
    cosine between different examples' student / teacher embeddings (near 1: the heads have collapsed)."""
    from wcord_jax.losses import _parallel

    s = jax.lax.stop_gradient(_parallel.gather(emb_s.astype(jnp.float32), axis_name))
    t = jax.lax.stop_gradient(_parallel.gather(emb_t.astype(jnp.float32), axis_name))
    b = s.shape[0]

    def off_diagonal_mean(e):
        g = e @ e.T
        return (jnp.sum(g) - jnp.trace(g)) / max(b * (b - 1), 1)

    return {"emb_pos_cos": jnp.mean(jnp.sum(s * t, axis=1)), "emb_student_cos": off_diagonal_mean(s),
            "emb_teacher_cos": off_diagonal_mean(t)}
