"""Activation-boundary distillation (Heo et al., AAAI 2019): hinge-like margin loss on the neurons' activation
boundaries, as RepDistiller's `distiller_zoo/AB.py` (`ABLoss`)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _check_same_length, _f32


def ab_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], margin: float = 1.0,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Activation-boundary loss (RepDistiller `ABLoss`), weighted sum over the n layers.

    For layer l = 0..n-1 (s: connector output, t: teacher pre-ReLU map, same shape), m = margin:

    .. math::
        \ell_l = \sum_{b,h,w,c} (s+m)^2\,[s > -m \wedge t \le 0] + (s-m)^2\,[s \le m \wedge t > 0], \qquad
        \mathcal{L} = \sum_l \Big(\frac{2^{\,l-n+1}\,\ell_l}{B}\Big) / 1000 \cdot 3

    So each layer's sum over all elements is weighted by 2^(l-n+1) (for n = 3: 1/4, 1/2, 1; for n = 4: 1/8 ... 1),
    divided by the batch size B, then by 1000 and multiplied by 3, in that order as in RepDistiller. RepDistiller uses
    it only in its 30-epoch init stage, on `features[1:-1]` computed with `preact=True`, the student maps passed
    through `distill_modules.Connector`; its main stage then uses no AB term.

    Args:
      s_list, t_list: equally long sequences of [B, H, W, C] maps, pairwise of equal shape.
      margin: m.
      axis_name: batch mesh axis (per-example sum over B: pmean of the local value), or None.
    """
    _check_same_length("ab_loss", s_list, t_list)
    n = len(s_list)
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if s.shape != t.shape:
            raise ValueError(f"ab_loss: layer {i}: student map {s.shape} and teacher map {t.shape} differ "
                             "(apply the Connector first)")
        s, t = _f32(s), _f32(t)
        below = ((s > -margin) & (t <= 0)).astype(jnp.float32)
        above = ((s <= margin) & (t > 0)).astype(jnp.float32)
        layer = jnp.sum(jnp.abs((s + margin) ** 2 * below + (s - margin) ** 2 * above))
        weight = 2.0 ** (i - n + 1)
        total = total + weight * layer / s.shape[0] / 1000.0 * 3.0
    return _parallel.pmean(total, axis_name)


__all__ = ["ab_loss"]
