"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): squared distance between normalised spatial attention
maps, as RepDistiller's `distiller_zoo/AT.py` (`Attention`)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _check_same_length, _f32, attention_map, match_spatial


def at_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], p: float = 2,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Attention transfer (RepDistiller `Attention`), summed over layers.

    For each pair of maps, after `match_spatial` (the taller map adaptive-avg-pooled to the smaller height):

    .. math::
        a(f) = \frac{v}{\max(\lVert v\rVert_2, 10^{-12})},\quad v_{hw} = \frac1C \sum_c f_{hwc}^p, \qquad
        \mathcal{L} = \sum_l \frac{1}{B\,H_lW_l} \sum_{b,hw} \big(a(f^s_l)_{b,hw} - a(f^t_l)_{b,hw}\big)^2

    p = 2. RepDistiller applies it to `features[1:-1]` with weight 1000.

    Args:
      s_list, t_list: equally long sequences of [B, H, W, C] maps (channel counts may differ).
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    _check_same_length("at_loss", s_list, t_list)
    total = jnp.zeros((), jnp.float32)
    for f_s, f_t in zip(s_list, t_list):
        f_s, f_t = match_spatial(_f32(f_s), _f32(f_t))
        d = attention_map(f_s, p) - attention_map(f_t, p)
        total = total + jnp.mean(d * d)
    return _parallel.pmean(total, axis_name)


__all__ = ["at_loss"]
