"""Correlation congruence (Peng et al., ICCV 2019) in RepDistiller's consecutive-sample form
(`distiller_zoo/CC.py`, `Correlation`). Batch-coupled."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32


def cc_loss(s_emb: jax.Array, t_emb: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""Correlation congruence as RepDistiller implements it (`Correlation`, "code emailed by the author").

    With δ_i = |s_emb_i - t_emb_i| (elementwise, [B, D]) for the embeddings of consecutive batch rows:

    .. math:: \mathcal{L} = \frac{1}{B-1} \sum_{i=1}^{B-1} \sum_d \delta_{i,d}\, \delta_{i+1,d}

    This consecutive-sample form is not the paper's Gaussian-RBF/Taylor correlation matrix loss. The embeddings are
    `LinearEmbed(dim -> 128)` outputs (no normalisation) of `features[-1]` for both nets (both embeddings trainable);
    weight 0.02. The value depends on the order of the batch.

    Batch-coupled: with `axis_name`, δ is gathered (in global batch order, so pairs straddling two shards are
    included) and the whole loss is evaluated on every device.
    """
    delta = jnp.abs(_f32(s_emb) - _f32(t_emb)).reshape(s_emb.shape[0], -1)
    delta = _parallel.gather(delta, axis_name)
    return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


__all__ = ["cc_loss"]
