"""FT (Kim et al., NeurIPS 2018): factor transfer. RepDistiller's two stages: the init stage trains a paraphraser
(an auto-encoder of the teacher's `features[-2]`, mean squared reconstruction error) on the teacher alone; the main
stage trains the student and a translator so that the translator's factor of the student's map matches the frozen
paraphraser's factor of the teacher's (`ft_loss`)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from wcord_jax import distill_modules as dm
from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, apply_with_batch_stats
from wcord_jax.core import AXIS


class FT(Distiller):
    description = "factor transfer: match a translator's factors of student maps to a paraphraser's of the teacher's"
    weights = (1.0, 0.0, 200.0)
    init_parts = ("paraphraser",)
    init_trains_student = False  # the init stage only evaluates the student
    frozen_in_main = ("paraphraser",)

    def modules(self, config, s_shapes, t_shapes):
        return {"paraphraser": (dm.Paraphraser(t_shapes[-2]), (jnp.zeros(t_shapes[-2]),)),
                "translator": (dm.Translator(s_shapes[-2], t_shapes[-2], axis_name=AXIS),
                               (jnp.zeros(s_shapes[-2]), False))}

    def init_learning_rate(self, config):
        if config.get("init_learning_rate") is None and config.model.startswith(("resnet", "wrn")):
            return 0.01  # RepDistiller's paraphraser pre-training rate for resnet / wrn students
        return super().init_learning_rate(config)

    def term(self, inputs: StepInputs) -> Term:
        state = inputs.method_state
        stats = state["module_stats"]
        factor_t = inputs.modules["paraphraser"].apply({"params": inputs.params["paraphraser"]}, inputs.t_feats[-2],
                                                       is_factor=True)
        factor_s, new = apply_with_batch_stats(inputs.modules["translator"], inputs.params["translator"],
                                               stats["translator"], inputs.s_feats[-2], train=True)
        loss = losses.ft_loss(factor_s, lax.stop_gradient(factor_t), axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss}, {}, {**state, "module_stats": {**stats, "translator": new}})

    def init_term(self, inputs: StepInputs) -> Term:
        t = inputs.t_feats[-2]
        _, rec = inputs.modules["paraphraser"].apply({"params": inputs.params["paraphraser"]}, t)
        return Term(lax.pmean(jnp.mean((rec.astype(jnp.float32) - t) ** 2), inputs.axis_name))


register("ft", FT())
