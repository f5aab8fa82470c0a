"""Hinton knowledge distillation: temperature-softened KL between teacher and student logits."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

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
