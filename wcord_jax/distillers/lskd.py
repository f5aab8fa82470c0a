"""Logit-standardised KD (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): `lskd`.

Hinton's KD applied to Z-scores of the logits: each example's student and teacher logits are standardised,
(z - mean(z)) / (std(z) + 1e-7) with the unbiased std over classes, before the temperature-softened KL, so the
student matches the teacher's logit *relations* rather than their range. Defaults from the authors' CIFAR-100
command (`--logit-stand --base-temp 2 --kd-weight 9`, on mdistiller's KD with cross-entropy weight 0.1):
temperature 2, beta 9, gamma 0.1. Settings `config.lskd.*`.

This file is the worked example of docs/adding-a-distiller.md: a pure loss function and one registered object.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


def standardize(logits: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Per-example Z-score over classes: (z - mean) / (std + eps), std unbiased (PyTorch's `Tensor.std`)."""
    z = logits.astype(jnp.float32)
    return (z - z.mean(-1, keepdims=True)) / (jnp.std(z, axis=-1, ddof=1, keepdims=True) + eps)


def lskd_loss(s_logits: jax.Array, t_logits: jax.Array, temperature: float = 2.0,
              axis_name: Optional[str] = None) -> jax.Array:
    """KD (`losses.kd_loss`: batch-mean KL(teacher || student) at temperature T, times T²) of standardised logits;
    the global-batch loss inside shard_map over `axis_name`."""
    return losses.kd_loss(standardize(s_logits), standardize(t_logits), temperature, axis_name=axis_name)


class LSKD(Distiller):
    description = "logit-standardised KD: KD between per-example Z-scores of the logits (Sun et al.)"
    weights = (0.1, 0.0, 9.0)
    config_section = "lskd"
    ensemble = "logits"  # an ensemble's logits: the log of its averaged probabilities
    uses_teacher_logits = True

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.temperature = 2.0  # the base temperature, applied to the standardised logits
        return c

    def term(self, inputs: StepInputs) -> Term:
        loss = lskd_loss(inputs.s_logits, inputs.t_logits, inputs.config.lskd.temperature, inputs.axis_name)
        return Term(loss, {self.name: loss})


register("lskd", LSKD())
