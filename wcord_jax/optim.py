"""RepDistiller's optimizer: SGD with PyTorch's weight decay and heavy-ball momentum, on a step schedule of the
learning rate; the cross-entropy trainer and distillation share it."""
from __future__ import annotations

import optax


def decay_epochs(config) -> tuple[float, ...]:
    """The epochs after which the learning rate drops, scaled to this run's length (see `lr_schedule_epochs`)."""
    scale = config.num_epochs / config.lr_schedule_epochs if config.lr_schedule_epochs else 1.0
    return tuple(float(e) * scale for e in config.lr_decay_epochs)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """RepDistiller's step schedule: lr * rate^(number of decay epochs passed), changing at the step that starts
    epoch e (e * steps_per_epoch, rounded for fractional epochs)."""
    boundaries = {}
    for e in decay_epochs(config):
        step = int(round(e * steps_per_epoch))
        boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay_rate
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """PyTorch SGD: weight decay added to the gradient of every parameter, then heavy-ball momentum."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
    )
