"""Distilling a frozen teacher into a student: KD, CRD and WCoRD through one train step.

`distill_step` is the whole step on one device's shard of the global batch (inside `jax.shard_map` over `data`):
the teacher forward in inference mode, the student forward and backward, the embedding heads, every loss term, the
optimizer update (student and heads only) and the state updates (CRD memories, WCoRD queues, spectral-norm vectors).
Every loss is the global-batch loss, identical on every device, so 1 and D devices take the same step.

Total loss, as RepDistiller: gamma * CE + alpha * KD + beta * method, where method is CRD's NCE loss or WCoRD's
global + lambda_local * local.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from wcord_jax import checkpoint as ckpt_lib
from wcord_jax import feeds, heads, losses, models, parallel, train
from wcord_jax.data import augment
from wcord_jax.losses import _parallel
from wcord_jax.configs import METHOD_WEIGHTS
from wcord_jax.train import AXIS, ConfigError

log = logging.getLogger("wcord_jax")
METHODS = tuple(METHOD_WEIGHTS)
CRD_METHODS = ("crd", "crdkd")
WCORD_METHODS = ("wcord", "wcordkd")
_METHOD_STREAM, _HEADS_STREAM, _STATE_STREAM = 3, 4, 5
_LIPSCHITZ = ("spectral", "gradient_penalty", "none")
_LOCAL_GRADIENTS = {"implicit": "dense", "unrolled": False, "stop_plan": None}


@flax.struct.dataclass
class DistillState:
    step: jax.Array
    params: Any  # {'student': ..., 'embed_s': ..., 'embed_t': ...} (heads only for CRD / WCoRD)
    batch_stats: Any  # the student's
    spectral: Any  # power-iteration vectors of spectrally normalised heads ({} otherwise)
    opt_state: Any
    rng: jax.Array
    method_state: Any  # CRDState (crd, wcord with memory), QueueState (wcord with queue), or {}


def uses_heads(method: str) -> bool:
    return method in CRD_METHODS + WCORD_METHODS


def _method_config(config):
    return config.wcord if config.method in WCORD_METHODS else config.crd


def validate(config, num_devices: int) -> None:
    train.validate_config(config, num_devices)
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; valid: {', '.join(METHODS)}")
    if config.teacher.model not in models.list_models():
        raise ConfigError(f"unknown teacher model {config.teacher.model!r}; valid: {', '.join(models.list_models())}")
    if not config.teacher.checkpoint:
        raise ConfigError("--config.teacher.checkpoint=DIR is required: the workdir of a trained teacher run "
                          f"(python -m wcord_jax.main --config configs/teacher.py:{config.teacher.model} --workdir DIR)")
    w = config.wcord
    if w.lipschitz not in _LIPSCHITZ:
        raise ConfigError(f"unknown wcord.lipschitz {w.lipschitz!r}; valid: {', '.join(_LIPSCHITZ)}")
    if w.local_gradient not in _LOCAL_GRADIENTS:
        raise ConfigError(f"unknown wcord.local_gradient {w.local_gradient!r}; valid: {', '.join(_LOCAL_GRADIENTS)}")
    if w.local_scope not in ("global", "device"):
        raise ConfigError(f"unknown wcord.local_scope {w.local_scope!r}; valid: global, device")
    if w.negatives not in ("queue", "memory"):
        raise ConfigError(f"unknown wcord.negatives {w.negatives!r}; valid: queue, memory")
    if w.queue_init not in ("empty", "random"):
        raise ConfigError(f"unknown wcord.queue_init {w.queue_init!r}; valid: empty, random")
    if config.method in WCORD_METHODS and w.negatives == "queue":
        if w.num_negatives % num_devices or w.num_negatives < config.batch_size:
            raise ConfigError(f"wcord.num_negatives={w.num_negatives} must be a multiple of the device count "
                              f"({num_devices}) and at least batch_size ({config.batch_size})")


# --------------------------------------------------------------------------------------------------------------------
# Teacher


def load_teacher(config, num_classes: int, image_shape, dtype):
    """The frozen teacher module and its variables, restored from a teacher run's checkpoint; clear errors."""
    path = config.teacher.checkpoint
    teacher = models.get_model(config.teacher.model, num_classes, dtype=dtype)
    try:
        meta = ckpt_lib.load_meta(path)
        variables = ckpt_lib.load_variables(path)
    except FileNotFoundError as e:
        raise ConfigError(f"teacher checkpoint not found: {e}; train one with --config configs/teacher.py:"
                          f"{config.teacher.model} --workdir {path}") from e
    if meta.get("model") not in (None, config.teacher.model):
        raise ConfigError(f"{path} holds a {meta['model']} checkpoint, but teacher.model is {config.teacher.model}")
    expected = jax.eval_shape(functools.partial(teacher.init, train=False), jax.random.PRNGKey(0),
                              jnp.zeros((1, *image_shape)))
    got_shapes = jax.tree.map(lambda x: tuple(x.shape), {k: variables[k] for k in ("params", "batch_stats")})
    want_shapes = jax.tree.map(lambda x: tuple(x.shape), {k: expected[k] for k in ("params", "batch_stats")})
    if got_shapes != want_shapes:
        raise ConfigError(f"{path} does not hold a {config.teacher.model} for {num_classes} classes and "
                          f"{image_shape[-1]}-channel images (its parameters have other shapes)")
    return teacher, jax.tree.map(jnp.asarray, variables)


# --------------------------------------------------------------------------------------------------------------------
# State


def _heads(config):
    """(embed_s, embed_t) modules for the method, or (None, None)."""
    if not uses_heads(config.method):
        return None, None
    mc = _method_config(config)
    spectral = config.method in WCORD_METHODS and config.wcord.lipschitz == "spectral"
    make = functools.partial(heads.Embed, features=mc.feat_dim, spectral_norm=spectral,
                             power_iterations=config.wcord.power_iterations)
    return make(), make()


def create_state(config, key, student, embed_s, embed_t, tx, image_shape, s_dim, t_dim, n_data):
    init = jax.jit(functools.partial(student.init, train=False))(jax.random.fold_in(key, 0),
                                                                 jnp.zeros((1, *image_shape)))
    params = {"student": init["params"]}
    spectral = {}
    if embed_s is not None:
        k_s, k_t = jax.random.split(jax.random.fold_in(key, _HEADS_STREAM))
        for name, module, k, dim in (("embed_s", embed_s, k_s, s_dim), ("embed_t", embed_t, k_t, t_dim)):
            v = module.init(k, jnp.zeros((1, dim)))
            params[name] = v["params"]
            if heads.SPECTRAL_COLLECTION in v:
                spectral[name] = v[heads.SPECTRAL_COLLECTION]
    state_key = jax.random.fold_in(key, _STATE_STREAM)
    method_state = {}
    if config.method in CRD_METHODS or (config.method in WCORD_METHODS and config.wcord.negatives == "memory"):
        method_state = losses.init_crd_state(state_key, n_data, _method_config(config).feat_dim)
    elif config.method in WCORD_METHODS:
        method_state = losses.init_queue_state(state_key, config.wcord.num_negatives, config.wcord.feat_dim,
                                               empty=config.wcord.queue_init == "empty")
    return DistillState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=init.get("batch_stats", {}),
                        spectral=spectral, opt_state=tx.init(params), rng=key, method_state=method_state)


def state_spec(config) -> Any:
    """PartitionSpecs of the state: all replicated except a WCoRD queue, split over the devices."""
    method_state = P()
    if config.method in WCORD_METHODS and config.wcord.negatives == "queue":
        method_state = losses.queue_state_specs(AXIS)
    return DistillState(step=P(), params=P(), batch_stats=P(), spectral=P(), opt_state=P(), rng=P(),
                        method_state=method_state)


# --------------------------------------------------------------------------------------------------------------------
# The step


def _contrast_idx(key, batch, class_index, config):
    """CRD negatives for this device's anchors; each row's draw is keyed by its global batch position, so 1 and D
    devices draw the same negatives."""
    local = batch["index"].shape[0]
    keys = augment.example_keys(key, lax.axis_index(AXIS) * local, local)
    k, replace = config.crd.nce_k, config.crd.sample_with_replacement

    def one(kk, i, y):
        return losses.sample_contrast_idx(kk, i[None], y[None], class_index, k, replace)[0]

    return jax.vmap(one)(keys, batch["index"], batch["label"])


def _embed(module, params, spectral, x, update: bool):
    variables = {"params": params}
    if spectral:
        variables[heads.SPECTRAL_COLLECTION] = spectral
        out, new = module.apply(variables, x, update_stats=update, mutable=[heads.SPECTRAL_COLLECTION])
        return out, new[heads.SPECTRAL_COLLECTION]
    return module.apply(variables, x), spectral


def _gradient_penalty(embed_s, embed_t, params, feat_s, feat_t, tau):
    """mean_i (|| d f(t_i, s_i) / d(s_i, t_i) ||_2 - 1)^2 for the critic f(t, s) = <g_t(t), g_s(s)> / tau."""

    def critic(fs, ft):
        es = embed_s.apply({"params": params["embed_s"]}, fs[None])[0]
        et = embed_t.apply({"params": params["embed_t"]}, ft[None])[0]
        return jnp.dot(es, et) / tau

    gs, gt = jax.vmap(jax.grad(critic, argnums=(0, 1)))(feat_s, feat_t)
    norms = jnp.sqrt(jnp.sum(gs ** 2, -1) + jnp.sum(gt ** 2, -1))
    return lax.pmean(jnp.mean((norms - 1.0) ** 2), AXIS)


def _embedding_stats(emb_s, emb_t) -> dict:
    """Health of the heads over the global batch: the mean cosine of positive pairs (alignment) and the mean
    cosine between different examples' student / teacher embeddings (near 1: the heads have collapsed)."""
    s = lax.stop_gradient(_parallel.gather(emb_s.astype(jnp.float32), AXIS))
    t = lax.stop_gradient(_parallel.gather(emb_t.astype(jnp.float32), AXIS))
    b = s.shape[0]

    def off_diagonal_mean(e):
        g = e @ e.T
        return (jnp.sum(g) - jnp.trace(g)) / max(b * (b - 1), 1)

    return {"emb_pos_cos": jnp.mean(jnp.sum(s * t, axis=1)), "emb_student_cos": off_diagonal_mean(s),
            "emb_teacher_cos": off_diagonal_mean(t)}


def distill_step(state: DistillState, batch: dict, teacher_vars, class_index, *, config, student, teacher, embed_s,
                 embed_t, tx, n_data: int):
    """One distillation step on this device's shard (inside shard_map over `data`); see the module docstring."""
    method = config.method
    x = batch["image"]
    t_logits, t_feats = teacher.apply(teacher_vars, x, train=False)
    t_logits = lax.stop_gradient(t_logits)
    t_feat = lax.stop_gradient(t_feats[-1].astype(jnp.float32))
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _METHOD_STREAM), state.step)
    contrast_idx = None
    if method in CRD_METHODS or (method in WCORD_METHODS and config.wcord.negatives == "memory"):
        contrast_idx = _contrast_idx(key, batch, class_index, config)

    def loss_fn(params):
        (s_logits, s_feats), new_vars = student.apply({"params": params["student"], "batch_stats": state.batch_stats},
                                                      x, train=True, mutable=["batch_stats"])
        terms = {"ce": lax.pmean(feeds.cross_entropy(s_logits, batch["label"]).mean(), AXIS),
                 "kd": losses.kd_loss(s_logits, t_logits, config.kd_temperature, axis_name=AXIS)}
        method_state, spectral, extra = state.method_state, state.spectral, {}
        term = jnp.zeros((), jnp.float32)
        if uses_heads(method):
            s_feat = s_feats[-1].astype(jnp.float32)
            emb_s, spec_s = _embed(embed_s, params["embed_s"], state.spectral.get("embed_s"), s_feat, True)
            emb_t, spec_t = _embed(embed_t, params["embed_t"], state.spectral.get("embed_t"), t_feat, True)
            if state.spectral:
                spectral = {"embed_s": spec_s, "embed_t": spec_t}
            extra.update(_embedding_stats(emb_s, emb_t))
        if method in CRD_METHODS:
            c = config.crd
            term, method_state = losses.crd_loss(state.method_state, emb_s, emb_t, batch["index"], contrast_idx,
                                                 c.nce_t, c.nce_m, axis_name=AXIS)
            terms["crd"] = term
        elif method in WCORD_METHODS:
            w = config.wcord
            if w.negatives == "queue":
                glob, method_state = losses.wcord_global_loss(state.method_state, emb_s, emb_t, w.tau, axis_name=AXIS)
            else:
                glob, method_state = losses.wcord_global_loss_memory(state.method_state, emb_s, emb_t,
                                                                     batch["index"], contrast_idx, w.tau,
                                                                     config.crd.nce_m, axis_name=AXIS)
            mode = _LOCAL_GRADIENTS[w.local_gradient]
            per_device = w.local_scope == "device"
            local, aux = losses.wcord_local_loss(
                emb_s, emb_t, epsilon=w.epsilon, max_iterations=w.sinkhorn_iterations,
                threshold=w.sinkhorn_threshold, implicit_diff=mode if mode is not None else False,
                stop_plan_gradient=mode is None, axis_name=None if per_device else AXIS)
            if per_device:
                local = lax.pmean(local, AXIS)
                aux = {k: lax.pmean(jnp.asarray(v, jnp.float32), AXIS) for k, v in aux.items()}
            term = glob + w.lambda_local * local
            terms.update({"wcord_global": glob, "wcord_local": local})
            extra["sinkhorn_converged"] = jnp.asarray(aux["converged"], jnp.float32)
            if w.lipschitz == "gradient_penalty":
                gp = _gradient_penalty(embed_s, embed_t, params, s_feat, t_feat, w.tau)
                terms["wcord_gp"] = gp
                term = term + w.gp_weight * gp
        total = config.gamma * terms["ce"] + config.alpha * terms["kd"] + config.beta * term
        return total, (terms, extra, new_vars["batch_stats"], method_state, spectral, s_logits)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    terms, extra, batch_stats, method_state, spectral, s_logits = aux
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if config.heads_lr_scale != 1.0:
        updates = {k: jax.tree.map(lambda u: u * config.heads_lr_scale, v) if k.startswith("embed") else v
                   for k, v in updates.items()}
    params = optax.apply_updates(state.params, updates)
    top1 = lax.pmean(jnp.mean((jnp.argmax(s_logits, -1) == batch["label"]).astype(jnp.float32)), AXIS)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, spectral=spectral,
                              opt_state=opt_state, method_state=method_state)
    return new_state, {"loss": loss, "top1": top1, **terms, **extra}


# --------------------------------------------------------------------------------------------------------------------
# The run


def _feature_dim(module, image_shape) -> int:
    shapes = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                                           train=False)[0])
    return int(np.prod(shapes[1][-1].shape[1:]))


def distill_and_evaluate(config, workdir: str) -> dict:
    """Distils `config.teacher` into `config.model` with `config.method`; returns the student's final eval metrics."""
    mesh, dtype, dataset, feed = train.setup_run(config, validate)
    if not dataset.in_memory and (config.method in CRD_METHODS or config.wcord.negatives == "memory"):
        raise ConfigError("CRD's memory bank needs the labels of the whole training set: use an in-memory data set")
    teacher, teacher_vars = load_teacher(config, dataset.num_classes, dataset.image_shape, dtype)
    student = models.get_model(config.model, dataset.num_classes, dtype=dtype, axis_name=AXIS)
    embed_s, embed_t = _heads(config)
    tx = train.make_optimizer(config, feed.steps_per_epoch)
    key = jax.random.PRNGKey(config.seed)
    state = create_state(config, key, student, embed_s, embed_t, tx, dataset.image_shape,
                         _feature_dim(student, dataset.image_shape), _feature_dim(teacher, dataset.image_shape),
                         dataset.num_train)
    class_index = {}
    if dataset.in_memory:
        class_index = losses.build_class_index(dataset.train.labels, dataset.num_classes)
        if (config.method in CRD_METHODS and not config.crd.sample_with_replacement
                and config.crd.nce_k > class_index.min_others):
            raise ConfigError(f"crd.nce_k={config.crd.nce_k} exceeds the {class_index.min_others} examples of the "
                              "other classes: lower it or set crd.sample_with_replacement=True")
    spec = state_spec(config)
    step_fn = functools.partial(distill_step, config=config, student=student, teacher=teacher, embed_s=embed_s,
                                embed_t=embed_t, tx=tx, n_data=dataset.num_train)
    runner = feed.make_runner(step_fn, dtype, num_extra=2, state_spec=spec)
    teacher_vars = parallel.replicate(teacher_vars, mesh)
    class_index = parallel.replicate(class_index, mesh)

    def run_steps(st, *args):
        return runner(st, teacher_vars, class_index, *args)

    evaluate = feed.make_evaluator(lambda v, x: student.apply(v, x, train=False)[0], dtype)
    evaluate_teacher = feed.make_evaluator(lambda v, x: teacher.apply(v, x, train=False)[0], dtype)

    def teacher_metrics():
        result = {f"teacher/{k.split('/')[1]}": v for k, v in evaluate_teacher(teacher_vars).items()}
        log.info("teacher %s: eval top1 %.4f top5 %.4f", config.teacher.model, result["teacher/top1"],
                 result["teacher/top5"])
        return result

    return train.run_training(
        config, workdir, mesh, feed, state, run_steps,
        lambda st: evaluate({"params": st.params["student"], "batch_stats": st.batch_stats}),
        train.learning_rate_schedule(config, feed.steps_per_epoch),
        describe=f"{config.method}: {config.teacher.model} -> {config.model} on {dataset.name}",
        state_spec=spec, before_training=teacher_metrics)
