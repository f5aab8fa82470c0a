"""Training a network with cross-entropy (a teacher, or a student alone), data-parallel over the `data` mesh.

- `train_step`: the whole step on one device's shard (forward, loss, backward, gradient all-reduce, optimizer update,
  batch-norm statistics), written for `jax.shard_map` over the `data` axis; a feed (`wcord_jax.feeds`) builds the
  batch on the device and `wcord_jax.step` compiles both into one dispatch;
- `train_and_evaluate`: the network trained alone, through the run loop (`wcord_jax.loop`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from wcord_jax import core, feeds, loop, models, optim
from wcord_jax import views as views_lib
from wcord_jax.core import AXIS
from wcord_jax.core import INIT_STREAM as _INIT_STREAM
from wcord_jax.losses.ce import cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken so far
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's key; every random draw is folded from it


# --------------------------------------------------------------------------------------------------------------------
# State


def input_shape(dataset, view_spec) -> tuple[int, int, int]:
    """(H, W, C) of what a network sees of `dataset` through the view `view_spec`."""
    h, w, _ = dataset.image_shape
    return h, w, feeds.view_channels(views_lib.parse(view_spec), dataset)


def create_train_state(key: jax.Array, model, tx, image_shape) -> TrainState:
    init_key = jax.random.fold_in(key, _INIT_STREAM)
    variables = jax.jit(functools.partial(model.init, train=False))(init_key, jnp.zeros((1, *image_shape)))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=key)


# --------------------------------------------------------------------------------------------------------------------
# The step


def train_step(state: TrainState, batch: dict, *, model, tx, local_bn: bool = False) -> tuple[TrainState, dict]:
    """One SGD step on this device's shard of the global batch (inside shard_map over `data`).

    The model's batch norm averages its statistics over the axis (sync BN) and the loss is the mean over the whole
    global batch (`pmean` of the shard means). Under shard_map the gradient of that device-invariant loss with respect
    to the replicated parameters is already the global gradient (the transpose of the implicit broadcast of the
    parameters is a `psum`), so D devices compute exactly what one device computes on the whole global batch.
    `local_bn` (bn_sync='local', with a model whose BatchNorm has no axis): each device normalises with its own
    shard's statistics and the new running averages are averaged over the devices.
    """

    def loss_fn(params):
        (logits, _), new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                            train=True, mutable=["batch_stats"])
        loss = lax.pmean(cross_entropy(logits, batch["label"]).mean(), AXIS)
        return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if local_bn:
        batch_stats = lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    top1 = lax.pmean(jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)), AXIS)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "ce": loss, "top1": top1}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.model` on `config.dataset` with cross-entropy; returns the final eval metrics.

    Re-running with the same workdir resumes from the latest checkpoint and ends with the same weights as an
    uninterrupted run.
    """
    mesh, dtype, dataset, feed = loop.setup_run(config, loop.validate_config)
    model = models.get_model(config.model, dataset.num_classes, dtype=dtype, axis_name=core.bn_axis(config))
    tx = optim.make_optimizer(config, feed.steps_per_epoch)
    state = create_train_state(jax.random.PRNGKey(config.seed), model, tx, input_shape(dataset, config.get("view")))
    step = functools.partial(train_step, model=model, tx=tx, local_bn=core.bn_axis(config) is None)
    run_steps = feed.make_runner(step, dtype, nonfinite=config.get("nonfinite", "stop"))
    evaluate = feed.make_evaluator(lambda v, x: model.apply(v, x, train=False)[0], dtype)
    return loop.run_training(config, workdir, mesh, feed, state, run_steps,
                             lambda st: evaluate({"params": st.params, "batch_stats": st.batch_stats}),
                             optim.learning_rate_schedule(config, feed.steps_per_epoch),
                             describe=f"{config.model} on {dataset.name}")
