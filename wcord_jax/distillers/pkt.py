"""PKT (Passalis & Tefas, ECCV 2018): probabilistic knowledge transfer of the pooled features' cosine-similarity
distributions, RepDistiller's `PKT`."""
from __future__ import annotations

import jax.numpy as jnp

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


class PKT(Distiller):
    description = "probabilistic knowledge transfer: match the batch's cosine-similarity distributions"
    weights = (1.0, 0.0, 30000.0)

    def term(self, inputs: StepInputs) -> Term:
        loss = losses.pkt_loss(inputs.s_feats[-1].astype(jnp.float32), inputs.t_feats[-1],
                               axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("pkt", PKT())
