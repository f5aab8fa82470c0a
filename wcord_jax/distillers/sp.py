"""SP (Tung & Mori, ICCV 2019): similarity-preserving distillation of the batch's pairwise similarities of the last
feature map (`features[-2]`), RepDistiller's `Similarity`."""
from __future__ import annotations

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, f32


class SP(Distiller):
    description = "similarity-preserving: match the batch's normalised Gram matrices of the last feature map"
    weights = (1.0, 0.0, 3000.0)

    def term(self, inputs: StepInputs) -> Term:
        loss = losses.sp_loss(f32(inputs.s_feats)[-2], inputs.t_feats[-2], axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("sp", SP())
