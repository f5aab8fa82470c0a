"""Distilling a frozen teacher into a student: the method-independent engine.

`distill_step` is the whole step on one device's shard of the global batch (inside `jax.shard_map` over `data`):
the teacher forward in inference mode, the student forward and backward, the distiller's term (its modules, state
and loss: `wcord_jax.distillers`), the optimizer update (student and trainable modules only) and the distiller's own
state after the step (opaque here: memories, queues, momentum key heads, spectral-norm vectors, its modules' BatchNorm
statistics, whatever the method keeps).
Every loss is the global-batch loss, identical on every device, so 1 and D devices take the same step.

Total loss, as RepDistiller: gamma * CE + alpha * KD + beta * term, where term is the distiller's own term. A
distiller with an init stage (`Distiller.init_parts`) first runs `init_epochs` of it, with its own optimizer over
what that stage trains and the stage's loss alone.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from wcord_jax import core, distillers, feeds, loop, losses, models, optim, parallel, rundir, train
from wcord_jax.losses import ce
from wcord_jax import views as views_lib
from wcord_jax.distillers._ensemble import PerTeacher
from wcord_jax.distillers.base import StepInputs
from wcord_jax.core import AXIS, ConfigError
from wcord_jax.core import HEADS_STREAM as _HEADS_STREAM
from wcord_jax.core import METHOD_STREAM as _METHOD_STREAM
from wcord_jax.core import STATE_STREAM as _STATE_STREAM

log = logging.getLogger("wcord_jax")
# The student's classifier, by the zoo's parameter names; an init stage with 'student_features' trains all else.


@flax.struct.dataclass
class DistillState:
    step: jax.Array
    params: Any  # {'student': ..., <module name>: ...}: the student and the distiller's modules
    batch_stats: Any  # the student's
    opt_state: Any  # the main stage's optimizer
    init_opt_state: Any  # the init stage's optimizer (() without an init stage)
    rng: jax.Array
    method: Any  # the distiller's state, opaque to the engine (`Distiller.method_state`)


def distiller_of(config) -> distillers.Distiller:
    """The distiller of `config.method`; ConfigError naming the valid methods otherwise."""
    try:
        return distillers.get(config.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def init_epochs(config) -> int:
    """Epochs of the distiller's init stage (0 without one)."""
    return int(config.get("init_epochs", 0) or 0) if distiller_of(config).init_parts else 0


def validate(config, num_devices: int) -> None:
    loop.validate_config(config, num_devices)
    distiller = distiller_of(config)
    if config.teacher.model not in models.list_models():
        raise ConfigError(f"unknown teacher model {config.teacher.model!r}; valid: {', '.join(models.list_models())}")
    if not config.teacher.checkpoint:
        raise ConfigError("--config.teacher.checkpoint=DIR is required: the workdir of a trained teacher run "
                          f"(python -m wcord_jax.main --config configs/teacher.py:{config.teacher.model} --workdir DIR)")
    if config.get("init_epochs", 0) < 0:
        raise ConfigError(f"init_epochs must be >= 0, got {config.init_epochs}")
    if config.teacher.get("view"):
        loop.parse_view(config.teacher.view, "teacher.view")
    distiller.validate(config, num_devices)


# --------------------------------------------------------------------------------------------------------------------
# Teachers


@dataclasses.dataclass
class Teacher:
    """A frozen teacher: its run's workdir, network, variables, checkpoint metadata and number of classes;
    `same_task` says whether it was trained on the student's classes (else its logits are of another label space)."""

    path: str
    module: Any
    variables: Any
    meta: dict
    num_classes: int
    same_task: bool


def teacher_paths(config) -> list[str]:
    """The teachers' workdirs: `teacher.checkpoint` is one workdir or several, comma-separated (an ensemble)."""
    return [p.strip() for p in str(config.teacher.checkpoint or "").split(",") if p.strip()]


def _teacher_error(config, path: str, e: rundir.RunDirError) -> ConfigError:
    """A teacher's checkpoint error with what to do about it."""
    if isinstance(e, rundir.CheckpointDamaged):
        return ConfigError(f"{e}: copy the teacher run again or retrain it")
    return ConfigError(f"{e}; train one with --config configs/teacher.py:{config.teacher.model} --workdir {path}")


@dataclasses.dataclass
class TeacherRun:
    """A teacher run's newest checkpoint, read once: its metadata (model, data set, classes, view) and variables."""

    path: str
    meta: dict
    variables: dict  # {'params', 'batch_stats'} as host arrays


def read_teacher(config, path: str) -> TeacherRun:
    """The teacher run in `path` (metadata and variables from the same checkpoint); clear errors."""
    try:
        meta, variables = rundir.read_checkpoint(path, role="teacher ")
    except rundir.RunDirError as e:
        raise _teacher_error(config, path, e) from e
    if meta.get("model") not in (None, config.teacher.model):
        raise ConfigError(f"{path} holds a {meta['model']} checkpoint, but teacher.model is {config.teacher.model}")
    return TeacherRun(path, meta, variables)


def teacher_view(config, metas: list) -> views_lib.View:
    """`teacher.view`, or (None) the view the teachers were trained on, as their checkpoints say."""
    if config.teacher.get("view"):
        return loop.parse_view(config.teacher.view, "teacher.view")
    specs = sorted({m.get("view") or "identity" for m in metas}) or ["identity"]
    if len(specs) > 1:
        raise ConfigError(f"the teachers were trained on different views ({', '.join(specs)}): one teacher.view "
                          "serves them all")
    return loop.parse_view(specs[0], "teacher.view")


def teacher_view_input(view: views_lib.View, dataset, metas: list) -> feeds.ViewInput:
    """The teacher's view with its normalisation: the data set's constants for the views that keep the image's
    statistics, else the statistics the teacher was trained with (its checkpoint), else measured here."""
    stats = (None, None)
    meta = metas[0] if metas else {}
    if not view.keeps_image_stats and meta.get("view") == view.spec and meta.get("view_mean") is not None:
        stats = (meta["view_mean"], meta["view_std"])
    try:
        return feeds.view_input(view, dataset, *stats)
    except views_lib.ViewError as e:
        raise ConfigError(f"teacher.view: {e}") from None


def _same_task(meta: dict, num_classes: int, config, dataset) -> bool:
    if num_classes != dataset.num_classes:
        return False
    if meta.get("dataset") not in (None, config.dataset.name):
        return False
    if "classes" in meta:
        mine = config.dataset.get("classes")
        return (list(meta["classes"]) if meta["classes"] is not None else None) == (
            [int(c) for c in mine] if mine is not None else None)
    return True


def load_teacher(config, run: TeacherRun, dataset, image_shape, dtype, view_spec: str = "identity") -> Teacher:
    """The frozen teacher of a teacher run for inputs of `image_shape`; clear errors."""
    path, meta, variables = run.path, run.meta, run.variables
    num_classes = rundir.classifier_size(variables) or dataset.num_classes
    teacher = models.get_model(config.teacher.model, num_classes, dtype=dtype)
    if not rundir.check_network(teacher, variables, image_shape):
        trained = meta.get("view") or "identity"
        raise ConfigError(f"{path} does not hold a {config.teacher.model} for {num_classes} classes and "
                          f"{image_shape[-1]}-channel images (teacher.view {view_spec} gives {image_shape[-1]} "
                          f"channels; that teacher was trained on view {trained}): its parameters have other shapes")
    return Teacher(path, teacher, jax.tree.map(jnp.asarray, variables), meta, num_classes,
                   _same_task(meta, num_classes, config, dataset))


def check_teachers(config, distiller, teachers: list) -> None:
    """One-line ConfigErrors for an ensemble the method cannot distil and for logits of another label space."""
    if len(teachers) > 1 and not distiller.ensemble:
        able = ", ".join(n for n in distillers.names() if distillers.get(n).ensemble)
        raise ConfigError(f"method {config.method} cannot distil an ensemble of {len(teachers)} teachers (its term "
                          f"pairs one teacher's features with the student's); methods that can: {able}")
    other = [t for t in teachers if not t.same_task]
    if other and (config.alpha != 0 or distiller.uses_teacher_logits):
        t = other[0]
        why = f"alpha={config.alpha} weights KD" if config.alpha != 0 else f"{config.method} reads the teacher's logits"
        raise ConfigError(f"the teacher in {t.path} was trained on another task ({teacher_task(t)}), the student on "
                          f"{dataset_task(config)}: {why}, but their logits are of different label spaces; use a "
                          "representation-level method (crd, wcord, or a feature baseline) with alpha=0")


def teacher_task(t: Teacher) -> str:
    classes = t.meta.get("classes")
    what = f"classes {','.join(map(str, classes))}" if classes else f"{t.num_classes} classes"
    return f"{t.meta.get('dataset', 'its data set')}, {what}"


def dataset_task(config) -> str:
    classes = config.dataset.get("classes")
    return f"{config.dataset.name}, {'classes ' + ','.join(map(str, classes)) if classes is not None else 'all classes'}"


# --------------------------------------------------------------------------------------------------------------------
# Modules and state


def feature_shapes(module, image_shape, preact: bool = False) -> list[tuple[int, ...]]:
    """The shapes of `module`'s feature list for one image (batch dimension 1)."""
    out = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                                         train=False, preact=preact)[0])
    return [tuple(f.shape) for f in out[1]]


def make_modules(config, s_shapes, t_shapes, distiller=None) -> dict:
    """The distiller's extra flax modules by name, with example inputs for their initialisation: {name: (module,
    args)}. Raises ConfigError when the method cannot pair these two networks. For a `PerTeacher` distiller
    `t_shapes` is the list of the teachers' feature shapes."""
    return (distiller or distiller_of(config)).modules(config, s_shapes, t_shapes)


def for_teachers(distiller, num_teachers: int):
    """The distiller the engine runs for `num_teachers` teachers: itself for one teacher or a method that reads
    the ensemble's logits, `PerTeacher` (modules and state per teacher) for 'per_teacher' methods."""
    if num_teachers > 1 and distiller.ensemble == "per_teacher":
        return PerTeacher(distiller, num_teachers)
    return distiller


def _classifier_name(student_params) -> str:
    names = [k for k in student_params if k in rundir.CLASSIFIER_NAMES]
    if len(names) != 1:
        raise ValueError(f"cannot tell the classifier among the student's parameters {sorted(student_params)}")
    return names[0]


def trainable_mask(params, stage: str, distiller):
    """A pytree of booleans over `params`: what the optimizer of `stage` ('init' or 'main') trains."""
    if stage == "main":
        return {k: jax.tree.map(lambda _: k not in distiller.frozen_in_main, v) for k, v in params.items()}
    parts = distiller.init_parts
    mask = {k: jax.tree.map(lambda _: k in parts, v) for k, v in params.items()}
    if "student_features" in parts:
        head = _classifier_name(params["student"])
        mask["student"] = {k: jax.tree.map(lambda _: k != head, v) for k, v in params["student"].items()}
    return mask


def make_optimizers(config, masks: dict, steps_per_epoch: int):
    """(main, init) optimizers: RepDistiller's SGD over each stage's trainable parameters (`masks[stage]`). The
    init stage's learning rate is constant; `init` is None without an init stage."""
    main = optax.masked(optim.make_optimizer(config, steps_per_epoch), masks["main"])
    if not init_epochs(config):
        return main, None
    lr = distiller_of(config).init_learning_rate(config)
    init = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr, momentum=config.momentum))
    return main, optax.masked(init, masks["init"])


def init_learning_rate(config) -> float:
    return distiller_of(config).init_learning_rate(config)


def create_state(config, key, student, modules: dict, image_shape, n_data: int, steps_per_epoch: int,
                 distiller=None):
    """The initial state, the (main, init) optimizers and the trainable masks {'main': ..., 'init': ...}."""
    distiller = distiller or distiller_of(config)
    init = jax.jit(functools.partial(student.init, train=False))(jax.random.fold_in(key, 0),
                                                                 jnp.zeros((1, *image_shape)))
    params = {"student": init["params"]}
    variables = {}
    keys = jax.random.split(jax.random.fold_in(key, _HEADS_STREAM), max(len(modules), 1))
    for k, (name, (module, args)) in zip(keys, sorted(modules.items())):
        variables[name] = jax.jit(lambda kk, m=module, a=args: m.init(kk, *a))(k)
        params[name] = variables[name].get("params", {})
    method = distiller.method_state(config, jax.random.fold_in(key, _STATE_STREAM), n_data, variables)
    masks = {"main": trainable_mask(params, "main", distiller)}
    if init_epochs(config):
        masks["init"] = trainable_mask(params, "init", distiller)
    tx, init_tx = make_optimizers(config, masks, steps_per_epoch)
    state = DistillState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=init.get("batch_stats", {}),
                         opt_state=tx.init(params), init_opt_state=init_tx.init(params) if init_tx is not None else (),
                         rng=key, method=method)
    return state, tx, init_tx, masks


def state_spec(config, distiller=None) -> Any:
    """PartitionSpecs of the state: all replicated except what the distiller shards (`Distiller.state_spec`)."""
    distiller = distiller or distiller_of(config)
    return DistillState(step=P(), params=P(), batch_stats=P(), opt_state=P(), init_opt_state=P(), rng=P(),
                        method=distiller.method_state_spec(config, AXIS))


# --------------------------------------------------------------------------------------------------------------------
# The step


def _teacher_forward(teacher, teacher_vars, x, preact: bool):
    t_logits, t_feats = teacher.apply(teacher_vars, x, train=False, preact=preact)
    return lax.stop_gradient(t_logits), [lax.stop_gradient(f.astype(jnp.float32)) for f in t_feats]


def _teachers_forward(teacher, teacher_vars, batch: dict, preact: bool):
    """(t_logits, t_feats, per-teacher outputs) of one teacher (`teacher` a module, `teacher_vars` its variables;
    per-teacher outputs ()) or an ensemble (lists: t_logits the log of the averaged probabilities, t_feats the first
    teacher's). The teachers see `batch['teacher_image']`, or the student's image when the views agree."""
    x = batch.get("teacher_image", batch["image"])
    if not isinstance(teacher, (list, tuple)):
        return (*_teacher_forward(teacher, teacher_vars, x, preact), ())
    outs = tuple(_teacher_forward(t, v, x, preact) for t, v in zip(teacher, teacher_vars))
    if len(outs) == 1:
        return (*outs[0], ())
    return losses.ensemble_logits([o[0] for o in outs]), outs[0][1], outs


def _kd_term(s_logits, t_logits, teachers: tuple, config, logits_comparable: bool):
    if not logits_comparable:  # a teacher of another label space: no KD (refused when weighted)
        return jnp.zeros((), jnp.float32)
    if teachers:
        return losses.kd_loss_ensemble(s_logits, [t[0] for t in teachers], config.kd_temperature, axis_name=AXIS)
    return losses.kd_loss(s_logits, t_logits, config.kd_temperature, axis_name=AXIS)


def _top1(logits, labels):
    return lax.pmean(jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)), AXIS)


STAGES = ("main", "init")


def distill_step(state: DistillState, batch: dict, teacher_vars, class_index, *, stage: str = "main", config,
                 distiller, student, teacher, modules, tx, mask, steps_per_epoch: int, first_main_step: int = 0,
                 logits_comparable: bool = True):
    """One distillation step on this device's shard (inside shard_map over `data`), of either stage.

    `stage='main'`: the loss gamma * CE + alpha * KD + beta * the distiller's `term`; `stage='init'` (RepDistiller's
    helper/pretrain.py, for distillers with an init stage): the distiller's `init_term` alone, and the student runs
    in training mode (updating its BatchNorm statistics) unless `Distiller.init_trains_student` says otherwise.
    `tx` and `mask` are that stage's optimizer and `trainable_mask`; `modules` is `make_modules`' dict. `teacher` is
    a module (`teacher_vars` its variables) or a list of them (an ensemble); `logits_comparable` is False when a
    teacher was trained on other classes (the KD term is then 0)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    main = stage == "main"
    x = batch["image"]
    # The student alone (`none` with alpha = 0) needs no teacher pass: none runs, and no KD term is logged.
    needs_teacher = distiller.uses_teacher or config.alpha != 0
    t_logits, t_feats, teachers = (_teachers_forward(teacher, teacher_vars, batch, distiller.preact)
                                   if needs_teacher else (None, None, ()))
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _METHOD_STREAM), state.step)
    flax_modules = {name: m for name, (m, _) in modules.items()}
    train_student = main or distiller.init_trains_student

    def loss_fn(params):
        variables = {"params": params["student"], "batch_stats": state.batch_stats}
        if train_student:
            (s_logits, s_feats), new_vars = student.apply(variables, x, train=True, preact=distiller.preact,
                                                          mutable=["batch_stats"])
            batch_stats = new_vars["batch_stats"]
        else:
            s_logits, s_feats = student.apply(variables, x, train=False, preact=distiller.preact)
            batch_stats = state.batch_stats
        inputs = StepInputs(
            config=config, params=params, state=state, modules=flax_modules, s_logits=s_logits, s_feats=s_feats,
            t_logits=t_logits, t_feats=t_feats, batch=batch, class_index=class_index, key=key, axis_name=AXIS,
            steps_per_epoch=steps_per_epoch, first_main_step=first_main_step if main else 0,
            teachers=teachers if main else (), method_state=state.method)
        if not main:
            out = distiller.init_term(inputs)
            return out.value, ({f"init_{config.method}": out.value}, {}, batch_stats, out.state, s_logits)
        terms = {"ce": lax.pmean(ce.cross_entropy(s_logits, batch["label"]).mean(), AXIS)}
        if needs_teacher:
            terms["kd"] = _kd_term(s_logits, t_logits, teachers, config, logits_comparable)
        out = distiller.term(inputs)
        terms.update(out.logged)
        kd = terms["kd"] if needs_teacher else 0.0
        total = config.gamma * terms["ce"] + config.alpha * kd + config.beta * out.value
        return total, (terms, out.metrics, batch_stats, out.state, s_logits)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    terms, metrics, batch_stats, method, s_logits = aux
    if train_student and core.bn_axis(config) is None:  # bn_sync='local': the devices' running averages, averaged
        batch_stats = lax.pmean(batch_stats, AXIS)
    method = state.method if method is None else method
    if main:
        params, opt_state = _update(tx, grads, state.opt_state, state.params, mask, config.heads_lr_scale)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                                  method=distiller.after_update(config, method, params))
    else:
        params, init_opt_state = _update(tx, grads, state.init_opt_state, state.params, mask)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  init_opt_state=init_opt_state, method=method)
    return new_state, {"loss": loss, "top1": _top1(s_logits, batch["label"]), **terms, **metrics}


def _update(tx, grads, opt_state, params, mask, heads_lr_scale: float = 1.0):
    """The optimizer step over the trainable parameters only (`optax.masked` passes the others' gradients through:
    they are dropped here, so frozen parameters stay bit-identical). `heads_lr_scale` scales the updates of the
    embedding heads (modules named `embed*`)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, mask)
    if heads_lr_scale != 1.0:
        updates = {k: jax.tree.map(lambda u: u * heads_lr_scale, v) if k.startswith("embed") else v
                   for k, v in updates.items()}
    return optax.apply_updates(params, updates), opt_state


# --------------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Engine:
    """The pieces of a distillation run, built once by `build_engine`.

    `main_step` / `init_step` are `distill_step` bound to its stage: the per-device step functions for
    `feed.make_runner(..., num_extra=2, state_spec=spec)`, called as `runner(state, teacher_vars, class_index,
    *feed_args)`; `init_step` is None without an init stage. `teacher_vars` and `class_index` are unreplicated.
    With several teachers (an ensemble) `teacher` and `teacher_vars` are lists; `teachers` describes them all.
    """

    student: Any
    teacher: Any
    teacher_vars: Any
    modules: dict
    state: DistillState
    spec: Any
    main_step: Any
    init_step: Any
    class_index: Any
    init_epochs: int
    teachers: list = dataclasses.field(default_factory=list)
    distiller: Any = None


def build_engine(config, dataset, steps_per_epoch: int, dtype, teacher_vars=None, student_shape=None,
                 teacher_shape=None, runs=None) -> Engine:
    """Teachers (restored from `config.teacher.checkpoint` unless `teacher_vars` is given), student, the
    distiller's modules, the initial state, the optimizers and the step functions, with the configuration checks
    that need the networks' shapes. `student_shape` / `teacher_shape` are the (H, W, C) each network sees (their
    views; default the data set's images); `runs` the teachers' checkpoints (`read_teacher`) if already read."""
    student_shape = tuple(student_shape or dataset.image_shape)
    teacher_shape = tuple(teacher_shape or dataset.image_shape)
    inner = distiller_of(config)
    if teacher_vars is None:
        runs = runs if runs is not None else [read_teacher(config, p) for p in teacher_paths(config)]
        spec = teacher_view(config, [r.meta for r in runs]).spec
        teachers = [load_teacher(config, r, dataset, teacher_shape, dtype, spec) for r in runs]
    else:
        module = models.get_model(config.teacher.model, dataset.num_classes, dtype=dtype)
        teachers = [Teacher("(given)", module, teacher_vars, {}, dataset.num_classes, True)]
    check_teachers(config, inner, teachers)
    distiller = for_teachers(inner, len(teachers))
    if len(teachers) == 1:
        teacher, teacher_vars = teachers[0].module, teachers[0].variables
    else:
        teacher, teacher_vars = [t.module for t in teachers], [t.variables for t in teachers]
    student = models.get_model(config.model, dataset.num_classes, dtype=dtype, axis_name=core.bn_axis(config))
    s_shapes = feature_shapes(student, student_shape, distiller.preact)
    t_shapes = [feature_shapes(t.module, teacher_shape, distiller.preact) for t in teachers]
    modules = make_modules(config, s_shapes, t_shapes if isinstance(distiller, PerTeacher) else t_shapes[0],
                           distiller)
    n_init = init_epochs(config)
    state, tx, init_tx, masks = create_state(config, jax.random.PRNGKey(config.seed), student, modules,
                                             student_shape, dataset.num_train, steps_per_epoch, distiller)
    class_index = {}
    if dataset.in_memory:
        class_index = losses.build_class_index(dataset.train.labels, dataset.num_classes)
        distiller.check_data(config, class_index)
    common = dict(config=config, distiller=distiller, student=student, teacher=teacher, modules=modules,
                  steps_per_epoch=steps_per_epoch, logits_comparable=all(t.same_task for t in teachers))
    main_step = functools.partial(distill_step, tx=tx, mask=masks["main"], first_main_step=n_init * steps_per_epoch,
                                  **common)
    init_step = None
    if n_init:
        init_step = functools.partial(distill_step, stage="init", tx=init_tx, mask=masks["init"], **common)
    return Engine(student=student, teacher=teacher, teacher_vars=teacher_vars, modules=modules, state=state,
                  spec=state_spec(config, distiller), main_step=main_step, init_step=init_step,
                  class_index=class_index, init_epochs=n_init, teachers=teachers, distiller=distiller)


def setup(config) -> tuple:
    """The pieces of a distillation run: (mesh, dtype, dataset, feed, engine, the teacher's view input or None).

    The feed gives the student `config.view` and the teachers `teacher.view` (or the view they were trained on);
    each network is built for its view's channels."""
    loop.validate_config(config, 1)  # the view keys, before reading the teachers' checkpoints
    runs = [read_teacher(config, p) for p in teacher_paths(config)] if config.teacher.checkpoint else []
    metas = [r.meta for r in runs]
    t_view = teacher_view(config, metas)
    mesh, dtype, dataset, feed = loop.setup_run(config, validate, extra_features=(t_view.feature,))
    if not dataset.in_memory and distiller_of(config).needs_all_labels(config):
        raise ConfigError(f"{config.method}'s memory bank needs the labels of the whole training set: use an "
                          "in-memory data set")
    if not t_view.is_identity and not dataset.in_memory:
        raise ConfigError(f"teacher.view={t_view.spec}: views other than identity need an in-memory data set")
    t_input = teacher_view_input(t_view, dataset, metas) if dataset.in_memory else None
    if t_input is not None:
        feed.set_teacher_view(t_input)
    spe = feed.steps_per_epoch
    h, w, _ = dataset.image_shape
    eng = build_engine(config, dataset, spe, dtype, student_shape=train.input_shape(dataset, config.get("view")),
                       teacher_shape=(h, w, feeds.view_channels(t_view, dataset)), runs=runs)
    return mesh, dtype, dataset, feed, eng, t_input


def distill_and_evaluate(config, workdir: str) -> dict:
    """Distils `config.teacher` (one teacher run's workdir, or several: an ensemble) into `config.model` with
    `config.method`, each network seeing its view; returns the student's final eval metrics (on the student's
    view)."""
    mesh, dtype, dataset, feed, eng, t_input = setup(config)
    spe = feed.steps_per_epoch
    n_init = eng.init_epochs
    guard = config.get("nonfinite", "stop")
    main_runner = feed.make_runner(eng.main_step, dtype, num_extra=2, state_spec=eng.spec, nonfinite=guard)
    init_runner = (feed.make_runner(eng.init_step, dtype, num_extra=2, state_spec=eng.spec, nonfinite=guard)
                   if n_init else None)
    teacher_vars = parallel.replicate(eng.teacher_vars, mesh)
    class_index = parallel.replicate(eng.class_index, mesh)

    def runner_for_epoch(epoch: int):
        runner = init_runner if epoch < n_init else main_runner
        return lambda st, *args: runner(st, teacher_vars, class_index, *args)

    main_schedule = optim.learning_rate_schedule(config, spe)
    init_lr = init_learning_rate(config) if n_init else 0.0

    def schedule(step):
        return init_lr if step < n_init * spe else main_schedule(step - n_init * spe)

    student = eng.student
    evaluate = feed.make_evaluator(lambda v, x: student.apply(v, x, train=False)[0], dtype)
    teacher_metrics = _teacher_evaluation(config, feed, eng, teacher_vars, dtype)
    describe_teacher = config.teacher.model if len(eng.teachers) == 1 else \
        f"an ensemble of {len(eng.teachers)} {config.teacher.model}"
    if t_input is not None and (t_input.view.spec != feed.view_meta()["view"]):
        describe_teacher += f" [{t_input.view.spec}]"
    student_view = feed.view_meta()["view"]
    describe_student = config.model + (f" [{student_view}]" if student_view != "identity" else "")

    stages = f" ({n_init} init-stage epochs first)" if n_init else ""
    return loop.run_training(
        config, workdir, mesh, feed, eng.state, None,
        lambda st: evaluate({"params": st.params["student"], "batch_stats": st.batch_stats}), schedule,
        describe=f"{config.method}: {describe_teacher} -> {describe_student} on {dataset.name}{stages}",
        state_spec=eng.spec, before_training=teacher_metrics, runner_for_epoch=runner_for_epoch,
        extra_epochs=n_init)


def _teacher_evaluation(config, feed, eng: Engine, teacher_vars, dtype):
    """`teacher_metrics()`: the teachers' test accuracy on their view, logged at step 0: `teacher/top1` (/top5) of
    the one teacher or of the ensemble (its averaged probabilities), and `teacher_<i>/top1` of each member of an
    ensemble. Teachers trained on other classes are not evaluated on the student's labels."""
    teachers = eng.teachers
    if not all(t.same_task for t in teachers):
        def skipped():
            log.info("teacher %s: trained on another task (%s), not evaluated on %s", config.teacher.model,
                     "; ".join(teacher_task(t) for t in teachers), dataset_task(config))
            return {}
        return skipped
    modules = [t.module for t in teachers]

    def ensemble_apply(variables, x):
        if len(modules) == 1:
            return modules[0].apply(variables, x, train=False)[0]
        return losses.ensemble_logits([m.apply(v, x, train=False)[0] for m, v in zip(modules, variables)])

    evaluate_all = feed.make_evaluator(ensemble_apply, dtype, slot=feeds.TEACHER)
    members = []
    if len(modules) > 1:
        members = [feed.make_evaluator(lambda v, x, m=m: m.apply(v, x, train=False)[0], dtype, slot=feeds.TEACHER)
                   for m in modules]

    def teacher_metrics():
        result = {f"teacher/{k.split('/')[1]}": v for k, v in evaluate_all(teacher_vars).items()}
        for i, evaluate in enumerate(members):
            one = evaluate(teacher_vars[i])
            result.update({f"teacher_{i}/{k.split('/')[1]}": v for k, v in one.items()})
            log.info("teacher %d (%s): eval top1 %.4f", i, teachers[i].path, one["eval/top1"])
        what = config.teacher.model if len(modules) == 1 else f"ensemble of {len(modules)}"
        log.info("teacher %s: eval top1 %.4f top5 %.4f", what, result["teacher/top1"], result["teacher/top5"])
        return result

    return teacher_metrics
