"""FitNet hint loss (Romero et al., ICLR 2015): mean squared error between the regressed student map and the
teacher map, as RepDistiller's `distiller_zoo/FitNet.py` (`HintLoss`)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32


def fitnet_loss(s: jax.Array, t: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""FitNet hint loss (RepDistiller `HintLoss`): mean squared error.

    .. math:: \mathcal{L} = \frac{1}{BHWC} \sum (s - t)^2

    `s` must already be the regressor output (`distill_modules.ConvReg` applied to the student's
    `features[hint_layer]`, hint_layer = 2 by default), of the teacher map's shape. RepDistiller trains the regressor
    jointly with the student in a single stage (loss weight 100, no CE-free hint-pretraining stage), which differs
    from the two-stage training of the FitNets paper.

    Args:
      s: [B, H, W, C] regressed student map. t: [B, H, W, C] teacher map.
      axis_name: batch mesh axis inside `jax.shard_map` (per-example mean: pmean), or None.
    """
    if s.shape != t.shape:
        raise ValueError(f"fitnet_loss: regressed student map {s.shape} and teacher map {t.shape} differ")
    d = _f32(s) - _f32(t)
    return _parallel.pmean(jnp.mean(d * d), axis_name)


__all__ = ["fitnet_loss"]
