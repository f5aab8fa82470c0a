"""Neuron selectivity transfer (Huang & Wang, 2017) with the degree-2 polynomial kernel: an MMD between the
student's and teacher's channel vectors, as RepDistiller's `distiller_zoo/NST.py` (`NSTLoss`)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _check_same_length, _f32, _normalize, match_spatial


def nst_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], axis_name: Optional[str] = None) -> jax.Array:
    r"""Neuron selectivity transfer with the degree-2 polynomial kernel (RepDistiller `NSTLoss`), summed over layers.

    After `match_spatial`, each channel's spatial map of each example is flattened to an HW-vector and L2-normalised
    (`F.normalize`, eps 1e-12): u^s_{b,i} (C_s of them), u^t_{b,j} (C_t). With k(x, y) = (x·y)²:

    .. math::
        \mathcal{L} = \sum_l \operatorname{mean}_{b,i,j} k(u^t_{bi}, u^t_{bj})
                    + \operatorname{mean}_{b,i,j} k(u^s_{bi}, u^s_{bj})
                    - 2 \operatorname{mean}_{b,i,j} k(u^s_{bi}, u^t_{bj})

    (a squared MMD between the two sets of channel vectors, per example, without the bias term), the teacher-teacher
    term under stop_gradient. The kernels only pair channels of the same example, so the loss is a per-example mean.
    RepDistiller applies it to `features[1:-1]` with weight 50.
    """
    _check_same_length("nst_loss", s_list, t_list)

    def poly(a, b):  # mean over (b, i, j) of (a_{b,:,i} . b_{b,:,j})^2
        return jnp.mean(jnp.einsum("bxi,bxj->bij", a, b) ** 2)

    total = jnp.zeros((), jnp.float32)
    for f_s, f_t in zip(s_list, t_list):
        f_s, f_t = match_spatial(_f32(f_s), _f32(f_t))
        u_s = _normalize(f_s.reshape(f_s.shape[0], -1, f_s.shape[-1]), axis=1)  # [B, HW, C], normalised over HW
        u_t = _normalize(f_t.reshape(f_t.shape[0], -1, f_t.shape[-1]), axis=1)
        total = total + lax.stop_gradient(poly(u_t, u_t)) + poly(u_s, u_s) - 2.0 * poly(u_s, u_t)
    return _parallel.pmean(total, axis_name)


__all__ = ["nst_loss"]
