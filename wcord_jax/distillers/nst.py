"""NST (Huang & Wang, 2017): neuron selectivity transfer, an MMD with a polynomial kernel between the intermediate
feature maps' channels (`features[1:-1]`), RepDistiller's `NSTLoss`."""
from __future__ import annotations

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, f32


class NST(Distiller):
    description = "neuron selectivity transfer: polynomial-kernel MMD between channel activations"
    weights = (1.0, 0.0, 50.0)

    def term(self, inputs: StepInputs) -> Term:
        loss = losses.nst_loss(f32(inputs.s_feats)[1:-1], inputs.t_feats[1:-1], axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("nst", NST())
