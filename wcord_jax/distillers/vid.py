"""VID (Ahn et al., CVPR 2019): variational information distillation; per intermediate layer a regressor of the
teacher's map from the student's with a learned variance (`VIDRegressor`), RepDistiller's `VIDLoss`."""
from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp

from wcord_jax import distill_modules as dm
from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


class VIDRegressors(flax.linen.Module):
    """One `VIDRegressor` per distilled layer (RepDistiller's ModuleList of VIDLoss), student maps -> (mu, var)."""

    s_shapes: Any
    t_shapes: Any

    @flax.linen.compact
    def __call__(self, s_list):
        mus, variances = [], []
        for i, (x, t) in enumerate(zip(s_list, self.t_shapes)):
            mu, var = dm.VIDRegressor(t[-1], t[-1], name=f"layer{i}")(x, target_size=t[1])
            mus.append(mu)
            variances.append(var)
        return mus, variances


class VID(Distiller):
    description = "variational information distillation: Gaussian likelihood of teacher maps given student maps"
    weights = (1.0, 0.0, 1.0)

    def modules(self, config, s_shapes, t_shapes):
        return {"vid": (VIDRegressors(s_shapes[1:-1], t_shapes[1:-1]), ([jnp.zeros(x) for x in s_shapes[1:-1]],))}

    def term(self, inputs: StepInputs) -> Term:
        mus, variances = inputs.modules["vid"].apply({"params": inputs.params["vid"]}, inputs.s_feats[1:-1])
        loss = losses.vid_loss(mus, variances, inputs.t_feats[1:-1], axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("vid", VID())
