"""Hinton knowledge distillation: temperature-softened KL between teacher and student logits."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import jax.scipy.special

from wcord_jax.losses import _parallel


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""RepDistiller's `DistillKL`: batch-mean KL(teacher || student) at temperature T, times T².

    .. math::
        \mathcal{L} = \frac{T^2}{B} \sum_{i=1}^{B} \sum_c p^t_{ic} \left(\log p^t_{ic} - \log p^s_{ic}\right),
        \qquad p^t_i = \mathrm{softmax}(t_i / T),\; p^s_i = \mathrm{softmax}(s_i / T).

    The KL is summed over classes and averaged over the batch (RepDistiller: `KLDivLoss(size_average=False)` divided by
    the batch size), not averaged over classes. T = 4 is RepDistiller's `--kd_T` default. Both distributions come from
    `log_softmax` in float32, whatever the logits' dtype; a teacher probability that underflows to 0 contributes 0, as
    in PyTorch's KLDivLoss.

    The teacher logits are not stopped here: pass the frozen teacher's outputs (RepDistiller computes them under
    `no_grad`).

    Args:
      student_logits: [B, C] student logits (this device's shard inside shard_map).
      teacher_logits: [B, C] teacher logits.
      temperature: softening temperature T.
      axis_name: mesh axis of the batch when called inside `jax.shard_map`; the shards must have equal size. The
        result is then the loss on the global batch, identical (and typed invariant) on every device.

    Returns:
      Scalar float32 loss.
    """
    t = jnp.asarray(temperature, jnp.float32)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return _parallel.pmean(jnp.mean(kl), axis_name) * t * t


def ensemble_probs(teacher_logits: list, temperature: float = 1.0) -> jax.Array:
    """The ensemble's predictive distribution: the arithmetic mean of the members' softmax(logits / T)."""
    t = jnp.asarray(temperature, jnp.float32)
    return jnp.mean(jnp.stack([jax.nn.softmax(z.astype(jnp.float32) / t, axis=-1) for z in teacher_logits]), axis=0)


def ensemble_logits(teacher_logits: list) -> jax.Array:
    """Logits of the ensemble's averaged probabilities at T = 1: log(mean_m softmax(z_m)), a stable logsumexp."""
    stacked = jnp.stack([jax.nn.log_softmax(z.astype(jnp.float32), axis=-1) for z in teacher_logits])
    return jax.nn.logsumexp(stacked, axis=0) - jnp.log(float(len(teacher_logits)))


def kd_loss_ensemble(student_logits: jax.Array, teacher_logits: list, temperature: float = 4.0,
                     axis_name: Optional[str] = None) -> jax.Array:
    r"""KD from an ensemble of M teachers: `kd_loss` with the teacher distribution replaced by the members'
    averaged temperature-softened probabilities,

    .. math::
        \bar p_i = \frac{1}{M} \sum_m \mathrm{softmax}(t^{(m)}_i / T), \qquad
        \mathcal{L} = \frac{T^2}{B} \sum_i \sum_c \bar p_{ic} \left(\log \bar p_{ic} - \log p^s_{ic}\right).

    The arithmetic mean is the ensemble's own predictive distribution (a mixture), as in Hinton et al.'s ensemble
    distillation: it keeps the mass every member puts on a class, where averaging logits (a geometric mean of the
    distributions) lets one confident member veto the others. With M = 1 (or M copies of one teacher) it is
    `kd_loss`. Classes of probability 0 contribute 0.
    """
    t = jnp.asarray(temperature, jnp.float32)
    p_t = ensemble_probs(teacher_logits, temperature)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jax.scipy.special.xlogy(p_t, p_t) - p_t * log_p_s, axis=-1)
    return _parallel.pmean(jnp.mean(kl), axis_name) * t * t
