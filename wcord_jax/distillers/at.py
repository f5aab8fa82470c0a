"""AT (Zagoruyko & Komodakis, ICLR 2017): attention transfer between the intermediate feature maps
(`features[1:-1]`), RepDistiller's `Attention`."""
from __future__ import annotations

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, f32


class AT(Distiller):
    description = "attention transfer: match normalised spatial attention maps of the intermediate layers"
    weights = (1.0, 0.0, 1000.0)

    def term(self, inputs: StepInputs) -> Term:
        loss = losses.at_loss(f32(inputs.s_feats)[1:-1], inputs.t_feats[1:-1], axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("at", AT())
