"""Relational KD (Park et al., CVPR 2019): distance-wise and angle-wise smooth-L1 between student and teacher
relations within the batch, as RepDistiller's `distiller_zoo/RKD.py` (`RKDLoss`). Batch-coupled."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _diag_mask, _f32, _gathered_rows, _normalize, _smooth_l1

RKD_EPS = 1e-12  # RepDistiller RKDLoss.pdist clamp


def _pdist_rows(rows: jax.Array, all_rows: jax.Array, diag: jax.Array) -> jax.Array:
    """RepDistiller `RKDLoss.pdist(squared=False)` restricted to some rows.

    sqrt(clamp(|x_i|² + |x_j|² - 2 x_i.x_j, min=1e-12)), and 0 where `diag` (i == j).
    """
    sq_rows = jnp.sum(rows * rows, axis=1)
    sq_all = jnp.sum(all_rows * all_rows, axis=1)
    d2 = sq_rows[:, None] + sq_all[None, :] - 2.0 * (rows @ all_rows.T)
    d = jnp.sqrt(jnp.maximum(d2, RKD_EPS))
    return jnp.where(diag, 0.0, d)


def _rkd_angles(rows: jax.Array, all_rows: jax.Array) -> jax.Array:
    """[b, B, B] cosines of the angle at x_i between x_j and x_k: <n(x_j - x_i), n(x_k - x_i)>, n = F.normalize."""
    diff = _normalize(all_rows[None, :, :] - rows[:, None, :], axis=2)
    return jnp.einsum("ijd,ikd->ijk", diff, diff)


def rkd_loss(s: jax.Array, t: jax.Array, distance_weight: float = 25.0, angle_weight: float = 50.0,
             axis_name: Optional[str] = None) -> jax.Array:
    r"""Relational KD (RepDistiller `RKDLoss`): distance-wise plus angle-wise smooth-L1.

    On the flattened vectors x_i (B x D) of the student (s) and of the teacher (t):

    .. math::
        d_{ij} = \begin{cases} 0 & i = j \\ \sqrt{\max(\lVert x_i\rVert^2 + \lVert x_j\rVert^2 - 2 x_i\cdot x_j,\,
                 10^{-12})} & i \ne j \end{cases}, \qquad
        \hat d_{ij} = d_{ij} / \mathrm{mean}\{d_{kl} : d_{kl} > 0\}

    .. math::
        \angle_{ijk} = \langle n(x_j - x_i), n(x_k - x_i) \rangle,\quad n(v) = v / \max(\lVert v\rVert, 10^{-12})

    .. math::
        \mathcal{L} = w_d \frac{1}{B^2}\sum_{ij} \mathrm{sl1}(\hat d^s_{ij} - \hat d^t_{ij})
                    + w_a \frac{1}{B^3}\sum_{ijk} \mathrm{sl1}(\angle^s_{ijk} - \angle^t_{ijk})

    with sl1 the smooth-L1 (Huber, beta 1), w_d = 25, w_a = 50. The teacher distances and angles are computed under
    stop_gradient (RepDistiller: `no_grad`). RepDistiller applies it to `features[-1]` with weight 1.

    Batch-coupled: with `axis_name`, the batch is gathered; each device computes the distance rows and angle slabs
    anchored at its own examples ([b, B] and [b, B, B]; memory O(b·B·D) for the difference vectors), the means of
    the positive distances are psum'd sums over psum'd counts, and the smooth-L1 sums are psum'd.
    """
    b = s.shape[0]
    s = _f32(s).reshape(b, -1)
    t = lax.stop_gradient(_f32(t).reshape(b, -1))
    all_s, offset = _gathered_rows(s, axis_name)
    all_t = _parallel.gather(t, axis_name)
    b_global = all_s.shape[0]
    diag = _diag_mask(b, b_global, offset)

    def normalised_distances(rows, all_rows):
        d = _pdist_rows(rows, all_rows, diag)
        positive = d > 0
        total = _parallel.psum(jnp.sum(jnp.where(positive, d, 0.0)), axis_name)
        count = _parallel.psum(jnp.sum(positive.astype(jnp.float32)), axis_name)
        return d / (total / count)

    d_s = normalised_distances(s, all_s)
    d_t = lax.stop_gradient(normalised_distances(t, all_t))
    loss_d = _parallel.psum(jnp.sum(_smooth_l1(d_s - d_t)), axis_name) / (b_global * b_global)

    a_s = _rkd_angles(s, all_s)
    a_t = lax.stop_gradient(_rkd_angles(t, all_t))
    loss_a = _parallel.psum(jnp.sum(_smooth_l1(a_s - a_t)), axis_name) / (b_global ** 3)
    return distance_weight * loss_d + angle_weight * loss_a


__all__ = ["rkd_loss"]
