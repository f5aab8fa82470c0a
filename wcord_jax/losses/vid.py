"""Variational information distillation (Ahn et al., CVPR 2019): Gaussian negative log-likelihood of the teacher
map under the student regressor's prediction, as RepDistiller's `distiller_zoo/VID.py` (`VIDLoss`)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _check_same_length, _f32, match_spatial


def vid_loss(mu_list: Sequence[jax.Array], var_list: Sequence[jax.Array], t_list: Sequence[jax.Array],
             axis_name: Optional[str] = None) -> jax.Array:
    r"""Variational information distillation (RepDistiller `VIDLoss`), summed over layers.

    For each layer, μ = the student regressor's prediction and σ² the per-channel variance
    (`distill_modules.VIDRegressor`: σ² = softplus(log_scale) + 1e-5, initialised to 5):

    .. math::
        \mathcal{L} = \sum_l \frac{1}{BHWC} \sum_{b,h,w,c}
            \frac12\Big(\frac{(\mu_{bhwc} - t_{bhwc})^2}{\sigma^2_c} + \log \sigma^2_c\Big)

    Pooling as RepDistiller: a student map taller than the teacher's is pooled *before* the regressor (pass
    `target_size=t.shape[1]` to `VIDRegressor`); a teacher map taller than μ is pooled here to μ's height.
    RepDistiller applies it to `features[1:-1]` with weight 1.

    Args:
      mu_list: [B, h, w, C_t] regressor outputs. var_list: [C_t] variances. t_list: [B, H, W, C_t] teacher maps,
        H >= h.
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    _check_same_length("vid_loss", mu_list, t_list)
    _check_same_length("vid_loss", mu_list, var_list)
    total = jnp.zeros((), jnp.float32)
    for mu, var, t in zip(mu_list, var_list, t_list):
        if mu.shape[1] > t.shape[1]:
            raise ValueError(f"vid_loss: prediction height {mu.shape[1]} exceeds the teacher's {t.shape[1]}; pool the "
                             "student map before the regressor (VIDRegressor(..., target_size=...))")
        mu, t = match_spatial(_f32(mu), _f32(t))
        var = _f32(var)
        nll = 0.5 * ((mu - t) ** 2 / var + jnp.log(var))
        total = total + jnp.mean(nll)
    return _parallel.pmean(total, axis_name)


__all__ = ["vid_loss"]
