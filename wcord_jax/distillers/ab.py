"""AB (Heo et al., AAAI 2019): activation boundaries. RepDistiller's two stages: the init stage trains the student's
feature layers (all but the classifier) and a connector (`Connector`) on the AB loss between the connector's output on
the student's pre-activation maps and the teacher's; the main stage then trains with CE (+ KD) only, the connector
frozen."""
from __future__ import annotations

import jax.numpy as jnp

from wcord_jax import distill_modules as dm
from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, apply_with_batch_stats, zero_term
from wcord_jax.core import AXIS


class AB(Distiller):
    description = "activation boundaries: an init stage matches the neurons' on/off pattern, then CE"
    weights = (1.0, 0.0, 1.0)
    preact = True
    init_parts = ("student_features", "connector")
    frozen_in_main = ("connector",)

    def modules(self, config, s_shapes, t_shapes):
        return {"connector": (dm.Connector(s_shapes[1:-1], t_shapes[1:-1], axis_name=AXIS),
                              ([jnp.zeros(x) for x in s_shapes[1:-1]], False))}

    def term(self, inputs: StepInputs) -> Term:
        return zero_term()  # the main stage has no term of its own (RepDistiller)

    def init_term(self, inputs: StepInputs) -> Term:
        state = inputs.method_state
        stats = state["module_stats"]
        g_s, new = apply_with_batch_stats(inputs.modules["connector"], inputs.params["connector"],
                                          stats.get("connector", {}), inputs.s_feats[1:-1], train=True)
        new_state = {**state, "module_stats": {**stats, "connector": new}} if new else None  # (identities: no BN)
        return Term(losses.ab_loss(g_s, inputs.t_feats[1:-1], axis_name=inputs.axis_name), state=new_state)


register("ab", AB())
