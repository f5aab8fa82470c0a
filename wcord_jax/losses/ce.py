"""Cross-entropy and the test split's counts: the loss every run trains with and what the evaluators sum."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (k capped at the number of classes)."""
    _, top = lax.top_k(logits, min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def eval_sums(logits, labels, mask) -> jax.Array:
    """[loss sum, top-1 hits, top-5 hits] over the rows where mask is 1."""
    return jnp.stack([jnp.sum(cross_entropy(logits, labels) * mask), jnp.sum(topk_correct(logits, labels, 1) * mask),
                      jnp.sum(topk_correct(logits, labels, 5) * mask)])
