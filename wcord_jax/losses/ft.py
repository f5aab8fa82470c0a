"""Factor transfer (Kim et al., NeurIPS 2018) as RepDistiller implements it (`distiller_zoo/FT.py`,
`FactorTransfer`): L1 distance between normalised, channel-averaged factors."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32, attention_map, match_spatial


def ft_loss(factor_s: jax.Array, factor_t: jax.Array, p1: float = 2, p2: float = 1,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Factor transfer as RepDistiller implements it (`FactorTransfer`, p1 = 2, p2 = 1).

    After `match_spatial`, with φ the attention-style factor normalisation:

    .. math::
        \phi(F) = \mathrm{normalize}\Big(\mathrm{flatten}_{hw}\,\frac1C\sum_c F_{hwc}^{p_1}\Big),\qquad
        \mathcal{L} = \frac{1}{B\,HW}\sum |\phi(F_s) - \phi(F_t)|  \quad (p_2 = 1)

    (for p2 != 1, the mean of (φ_s - φ_t)^p2, without absolute value, as RepDistiller). normalize is `F.normalize`
    (eps 1e-12). This differs from the FT paper, whose factors are normalised as whole flattened (C·H·W) vectors
    and are not averaged over channels: RepDistiller reuses the AT map here. factor_s = `Translator(f_s)` and
    factor_t = the frozen `Paraphraser`'s encoder output on the teacher, both from `features[-2]`; weight 200.

    Args:
      factor_s, factor_t: [B, H, W, C] factors (channel counts may differ).
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    f_s, f_t = match_spatial(_f32(factor_s), _f32(factor_t))
    d = attention_map(f_s, p1) - attention_map(f_t, p1)
    loss = jnp.mean(jnp.abs(d)) if p2 == 1 else jnp.mean(d ** p2)
    return _parallel.pmean(loss, axis_name)


__all__ = ["ft_loss"]
