"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): KL divergence between the cosine-similarity
distributions of student and teacher, as RepDistiller's `distiller_zoo/PKT.py` (`PKT.cosine_similarity_loss`).
Batch-coupled."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from wcord_jax.losses import _parallel
from wcord_jax.losses._common import _f32, _safe_norm

PKT_EPS = 1e-7  # RepDistiller PKT.cosine_similarity_loss


def pkt_loss(s: jax.Array, t: jax.Array, eps: float = PKT_EPS, axis_name: Optional[str] = None) -> jax.Array:
    r"""Probabilistic knowledge transfer (RepDistiller `PKT.cosine_similarity_loss`).

    With x̂_i = x_i / (||x_i||_2 + eps) (NaN entries set to 0), eps = 1e-7:

    .. math::
        c_{ij} = \frac{\hat x_i\cdot\hat x_j + 1}{2}, \qquad P_{ij} = \frac{c_{ij}}{\sum_k c_{ik}}, \qquad
        \mathcal{L} = \frac{1}{B^2} \sum_{ij} P^t_{ij} \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    for the student (s) and teacher (t) vectors (`features[-1]`, weight 30000 in RepDistiller). The norm's gradient
    at an all-zero vector is taken as 0 (PyTorch's sqrt would give NaN there).

    Batch-coupled: with `axis_name`, the normalised vectors are gathered; each device computes the rows of P
    anchored at its own examples and the row sums are psum'd.
    """
    b = s.shape[0]

    def unit(x):
        x = _f32(x).reshape(b, -1)
        x = x / (_safe_norm(x, axis=1) + eps)
        return jnp.where(jnp.isnan(x), 0.0, x)

    def probs(x):
        sim = (x @ _parallel.gather(x, axis_name).T + 1.0) / 2.0
        return sim / jnp.sum(sim, axis=1, keepdims=True)

    p_s = probs(unit(s))
    p_t = probs(unit(t))
    b_global = b * _parallel.axis_size(axis_name)
    kl = p_t * jnp.log((p_t + eps) / (p_s + eps))
    return _parallel.psum(jnp.sum(kl), axis_name) / (b_global * b_global)


__all__ = ["pkt_loss"]
