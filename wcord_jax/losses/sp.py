"""Similarity-preserving KD (Tung & Mori, ICCV 2019): distance between the row-normalised batch Gram matrices of
student and teacher maps, as RepDistiller's `distiller_zoo/SP.py` (`Similarity`). Batch-coupled."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32, _normalize


def sp_loss(s: jax.Array, t: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""Similarity-preserving KD (RepDistiller `Similarity`) on one pair of maps.

    For student and teacher maps s, t ([B, H, W, C]), with Q = a map flattened to [B, HWC] (the flattening order
    does not matter for Q Qᵀ):

    .. math::
        G = \mathrm{rownorm}(Q Q^\top), \qquad
        \mathcal{L} = \frac{1}{B^2} \lVert G^t - G^s \rVert_F^2

    where rownorm divides each row by max(||row||_2, 1e-12) (`F.normalize`, dim 1). Spatial sizes and channel
    counts of the two maps may differ. RepDistiller applies it to `[features[-2]]` with weight 3000.

    Batch-coupled: with `axis_name`, the maps are gathered over the axis; each device builds the rows of G anchored
    at its own examples ([b, B] blocks, each row normalised on its own) and the row sums of squares are psum'd.
    """
    b = s.shape[0]
    q_s = _f32(s).reshape(b, -1)
    q_t = _f32(t).reshape(b, -1)
    all_s = _parallel.gather(q_s, axis_name)
    all_t = _parallel.gather(q_t, axis_name)
    g_s = _normalize(q_s @ all_s.T, axis=1)
    g_t = _normalize(q_t @ all_t.T, axis=1)
    d = g_t - g_s
    b_global = all_s.shape[0]
    return _parallel.psum(jnp.sum(d * d), axis_name) / (b_global * b_global)


__all__ = ["sp_loss"]
