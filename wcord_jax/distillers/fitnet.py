"""FitNet (Romero et al., ICLR 2015): a regressor (`ConvReg`) maps the student's `fitnet.hint_layer` feature map onto
the teacher's, trained with the student on their mean squared error (RepDistiller's `HintLoss`; its one-stage form,
as RepDistiller's CIFAR-100 scripts run it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from wcord_jax import distill_modules as dm
from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, apply_with_batch_stats
from wcord_jax.core import AXIS, ConfigError


class FitNet(Distiller):
    description = "FitNets: a regressor maps a student feature map onto the teacher's, mean squared error"
    weights = (1.0, 0.0, 100.0)
    config_section = "fitnet"

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.hint_layer = 2  # the feature whose map the regressor matches (RepDistiller --hint_layer)
        return c

    def modules(self, config, s_shapes, t_shapes):
        h = config.fitnet.hint_layer
        if not 0 <= h < len(s_shapes) - 1:
            raise ConfigError(f"fitnet.hint_layer={h} is not a feature map index (0..{len(s_shapes) - 2})")
        try:
            reg = dm.ConvReg(s_shapes[h], t_shapes[h], axis_name=AXIS)
            jax.eval_shape(lambda: reg.init(jax.random.PRNGKey(0), jnp.zeros(s_shapes[h]), train=False))
        except ValueError as e:
            raise ConfigError(f"fitnet: {e}") from e
        return {"conv_reg": (reg, (jnp.zeros(s_shapes[h]), False))}

    def term(self, inputs: StepInputs) -> Term:
        h, state = inputs.config.fitnet.hint_layer, inputs.method_state
        stats = state["module_stats"]
        reg, new = apply_with_batch_stats(inputs.modules["conv_reg"], inputs.params["conv_reg"], stats["conv_reg"],
                                          inputs.s_feats[h], train=True)
        loss = losses.fitnet_loss(reg, inputs.t_feats[h], axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss}, {}, {**state, "module_stats": {**stats, "conv_reg": new}})


register("fitnet", FitNet())
