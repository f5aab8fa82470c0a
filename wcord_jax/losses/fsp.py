"""Flow of solution procedure (Yim et al., CVPR 2017): squared distance between the Gram matrices of consecutive
feature maps, as RepDistiller's `distiller_zoo/FSP.py` (`FSP`), with its channel check."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32, match_spatial


def check_fsp_shapes(s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
    """RepDistiller `FSP.__init__`'s check: equally many maps and equal channel counts (NHWC: last axis) at every level.

    Raises:
      ValueError naming the first mismatch.
    """
    if len(s_shapes) != len(t_shapes):
        raise ValueError(f"fsp: {len(s_shapes)} student maps but {len(t_shapes)} teacher maps")
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if s[-1] != t[-1]:
            raise ValueError(f"fsp: channel counts differ at feature {i}: student {s[-1]} vs teacher {t[-1]} "
                             f"(shapes {tuple(s)} vs {tuple(t)}); FSP needs equal channels at every level")


def fsp_matrices(maps: Sequence[jax.Array]) -> list[jax.Array]:
    r"""FSP (Gram) matrices of consecutive maps (RepDistiller `FSP.compute_fsp`).

    For each consecutive pair (bottom, top), after `match_spatial` (the taller one pooled to the smaller height):
    G_{b, j, i} = (1/HW) Σ_{hw} top_{b,hw,j} · bottom_{b,hw,i}, shape [B, C_top, C_bottom].
    """
    out = []
    for bot, top in zip(maps[:-1], maps[1:]):
        bot, top = match_spatial(_f32(bot), _f32(top))
        hw = bot.shape[1] * bot.shape[2]
        out.append(jnp.einsum("bhwj,bhwi->bji", top, bot) / hw)
    return out


def fsp_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], axis_name: Optional[str] = None) -> jax.Array:
    r"""Flow-of-solution-procedure loss (RepDistiller `FSP`), summed over consecutive pairs.

    .. math:: \mathcal{L} = \sum_{l} \frac{1}{B\,C_{l+1}C_l} \sum (G^s_l - G^t_l)^2

    with G_l the FSP matrix of maps l and l+1 (`fsp_matrices`). RepDistiller applies it to `features[:-1]` (stem
    included) in its 30-epoch init stage only (main stage: no FSP term). Channel counts must match level by level.

    Raises:
      ValueError if the lists differ in length or in a channel count (`check_fsp_shapes`).
    """
    check_fsp_shapes([f.shape for f in s_list], [f.shape for f in t_list])
    total = jnp.zeros((), jnp.float32)
    for g_s, g_t in zip(fsp_matrices(s_list), fsp_matrices(t_list)):
        d = g_s - g_t
        total = total + jnp.mean(d * d)
    return _parallel.pmean(total, axis_name)


__all__ = ["check_fsp_shapes", "fsp_loss", "fsp_matrices"]
