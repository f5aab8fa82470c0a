"""DKD (Zhao et al., CVPR 2022): decoupled KD, the target-class (TCKD) and non-target-class (NCKD) parts of KD
weighted by `dkd.alpha` and `dkd.beta`, with mdistiller's linear warm-up over the first `dkd.warmup_epochs`
main-stage epochs."""
from __future__ import annotations

import ml_collections

from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


def warmup_weight(config, step, steps_per_epoch: int, first_main_step: int):
    """mdistiller's warm-up min(epoch / dkd.warmup_epochs, 1), the 1-based main-stage epoch constant within an epoch.

    The warm-up is absolute, as in mdistiller: it does not scale with the run's length (unlike the learning-rate decay
    epochs). It protects a barely trained student from the beta-weighted NCKD term, and how long that takes depends on
    how much the student has trained, not on how long the run goes on; a scaled warm-up shrank to a third of an epoch
    in a 4-epoch run. A run shorter than the warm-up never reaches the full DKD weight; set dkd.warmup_epochs then.
    """
    epoch = (step - first_main_step) // steps_per_epoch + 1
    return losses.dkd_warmup(epoch, config.dkd.warmup_epochs)


class DKD(Distiller):
    description = "decoupled KD: target-class and non-target-class KD weighted apart (mdistiller)"
    weights = (1.0, 0.0, 1.0)
    config_section = "dkd"
    ensemble = "logits"  # an ensemble's logits: the log of its averaged probabilities
    uses_teacher_logits = True

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.alpha = 1.0  # weight of the target-class term (TCKD)
        c.beta = 8.0  # weight of the non-target term (NCKD)
        c.temperature = 4.0
        c.warmup_epochs = 20.0  # linear warm-up of the DKD term, in main-stage epochs (absolute, as mdistiller)
        return c

    def term(self, inputs: StepInputs) -> Term:
        d = inputs.config.dkd
        weight = warmup_weight(inputs.config, inputs.state.step, inputs.steps_per_epoch, inputs.first_main_step)
        loss = weight * losses.dkd_loss(inputs.s_logits, inputs.t_logits, inputs.batch["label"], d.alpha, d.beta,
                                        d.temperature, axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("dkd", DKD())
