"""RKD (Park et al., CVPR 2019): relational KD of the pooled features' pairwise distances and triplet angles,
RepDistiller's `RKDLoss`."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


class RKD(Distiller):
    description = "relational KD: match pairwise distances and triplet angles of the pooled features"
    weights = (1.0, 0.0, 1.0)
    config_section = "rkd"

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.distance_weight = 25.0
        c.angle_weight = 50.0
        return c

    def term(self, inputs: StepInputs) -> Term:
        r = inputs.config.rkd
        loss = losses.rkd_loss(inputs.s_feats[-1].astype(jnp.float32), inputs.t_feats[-1], r.distance_weight,
                               r.angle_weight, axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("rkd", RKD())
