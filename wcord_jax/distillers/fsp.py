"""FSP (Yim et al., CVPR 2017): flow of solution procedure matrices between consecutive feature maps. RepDistiller's
two stages: the init stage trains the student's feature layers on the FSP loss; the main stage trains with CE (+ KD)
only. The student's and teacher's maps must have equal channel counts."""
from __future__ import annotations

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term, f32, zero_term
from wcord_jax.losses.fsp import check_fsp_shapes
from wcord_jax.core import ConfigError


class FSP(Distiller):
    description = "flow of solution procedure: an init stage matches Gram matrices between layers, then CE"
    weights = (1.0, 0.0, 50.0)
    init_parts = ("student_features",)

    def modules(self, config, s_shapes, t_shapes):
        try:
            check_fsp_shapes(s_shapes[:-1], t_shapes[:-1])
        except ValueError as e:
            raise ConfigError(f"fsp cannot pair {config.teacher.model} with {config.model}: {e}") from e
        return {}

    def term(self, inputs: StepInputs) -> Term:
        return zero_term()  # the main stage has no term of its own (RepDistiller)

    def init_term(self, inputs: StepInputs) -> Term:
        return Term(losses.fsp_loss(f32(inputs.s_feats)[:-1], inputs.t_feats[:-1], axis_name=inputs.axis_name))


register("fsp", FSP())
