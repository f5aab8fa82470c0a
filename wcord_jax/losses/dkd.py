"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): target-class and non-target-class KD terms weighted
separately, exactly mdistiller's `mdistiller/distillers/DKD.py` (`dkd_loss`), with its warm-up factor."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32


def dkd_loss(s_logits: jax.Array, t_logits: jax.Array, labels: jax.Array, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, axis_name: Optional[str] = None) -> jax.Array:
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), exactly mdistiller's `dkd_loss`.

    With p = softmax(z / T) for student (s) and teacher (t) logits z, y the label, g the one-hot mask of y:

    .. math::
        b = (p_y,\; 1 - p_y)\ \text{computed as}\ (\textstyle\sum_c p_c g_c,\ \sum_c p_c (1 - g_c)), \qquad
        \mathrm{TCKD} = \frac{T^2}{B} \sum_i \sum_{k} b^t_{ik} (\log b^t_{ik} - \log b^s_{ik})

    .. math::
        \hat p = \mathrm{softmax}(z / T - 1000\, g), \qquad
        \mathrm{NCKD} = \frac{T^2}{B} \sum_i \sum_c \hat p^t_{ic} (\log \hat p^t_{ic} - \log \hat p^s_{ic}), \qquad
        \mathcal{L} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

    The "-1000·g" trick removes the target class from the non-target distributions (its teacher probability
    underflows to 0 and contributes 0, as `F.kl_div` treats 0·log 0). log b^s is the log of the summed softmax
    probabilities, as mdistiller (not a log-sum-exp). Sums over classes, mean over the batch (mdistiller:
    `kl_div(size_average=False) * T² / B`). Defaults are mdistiller's CIFAR-100 values (α = 1, β = 8, T = 4). The
    warm-up factor multiplying the loss is `dkd_warmup`, applied by the caller.

    Args:
      s_logits, t_logits: [B, K] logits. labels: [B] int class labels.
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    t_ = jnp.asarray(temperature, jnp.float32)
    z_s = _f32(s_logits) / t_
    z_t = _f32(t_logits) / t_
    gt = jax.nn.one_hot(labels, z_s.shape[-1], dtype=jnp.float32)
    p_s = jax.nn.softmax(z_s, axis=-1)
    p_t = jax.nn.softmax(z_t, axis=-1)
    b_s = jnp.stack([jnp.sum(p_s * gt, axis=-1), jnp.sum(p_s * (1.0 - gt), axis=-1)], axis=-1)
    b_t = jnp.stack([jnp.sum(p_t * gt, axis=-1), jnp.sum(p_t * (1.0 - gt), axis=-1)], axis=-1)
    tckd = jnp.sum(xlogy(b_t, b_t) - b_t * jnp.log(b_s), axis=-1)
    log_q_s = jax.nn.log_softmax(z_s - 1000.0 * gt, axis=-1)
    q_t = jax.nn.softmax(z_t - 1000.0 * gt, axis=-1)
    nckd = jnp.sum(xlogy(q_t, q_t) - q_t * log_q_s, axis=-1)
    local = alpha * jnp.mean(tckd) + beta * jnp.mean(nckd)
    return _parallel.pmean(local, axis_name) * t_ * t_


def dkd_warmup(epoch, warmup_epochs: float = 20):
    """mdistiller's DKD warm-up factor min(epoch / warmup_epochs, 1).

    mdistiller evaluates it with the 1-based integer epoch, constant within an epoch (1/20 in the first epoch, 1 from
    epoch 20 on); a fractional epoch gives a per-step ramp instead. Works on Python numbers and on traced arrays.
    """
    if isinstance(epoch, (int, float)):
        return min(epoch / warmup_epochs, 1.0)
    return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


__all__ = ["dkd_loss", "dkd_warmup"]
