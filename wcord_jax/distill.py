"""Distilling a frozen teacher into a student: KD, CRD, WCoRD and RepDistiller's baselines through one train step.

`distill_step` is the whole step on one device's shard of the global batch (inside `jax.shard_map` over `data`):
the teacher forward in inference mode, the student forward and backward, the method's extra modules (embedding
heads, regressors, connectors, ...), every loss term, the optimizer update (student and trainable modules only) and
the state updates (CRD memories, WCoRD queues and momentum key heads, spectral-norm vectors, the modules' BatchNorm
statistics). Every loss is the global-batch loss, identical on every device, so 1 and D devices take the same step.

Total loss, as RepDistiller: gamma * CE + alpha * KD + beta * method, where method is the method's own term (CRD's
NCE loss, WCoRD's lambda_global * global + lambda_local * local, a baseline's loss). AB, FT and FSP first run
RepDistiller's init stage (`init_epochs`, its own optimizer over its own parameters, see `INIT_STAGE`); their main
stage then trains with CE (+ KD) only (AB, FSP) or with the FT term through the frozen paraphraser.
"""
from __future__ import annotations

import dataclasses
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
from wcord_jax import distill_modules as dm
from wcord_jax import feeds, heads, losses, models, parallel, train
from wcord_jax.configs import METHOD_WEIGHTS, STAGED_METHODS
from wcord_jax.data import augment
from wcord_jax.losses import _parallel
from wcord_jax.train import AXIS, ConfigError

log = logging.getLogger("wcord_jax")
METHODS = tuple(METHOD_WEIGHTS)
CRD_METHODS = ("crd", "crdkd")
WCORD_METHODS = ("wcord", "wcordkd")
_METHOD_STREAM, _HEADS_STREAM, _STATE_STREAM = 3, 4, 5
_LIPSCHITZ = ("spectral", "gradient_penalty", "none")
_NEGATIVES = ("queue", "batch", "memory")
_KEY_HEADS = ("ema", "trained")
_DIRECTIONS = ("both", "student")
_LOCAL_GRADIENTS = {"implicit": "dense", "unrolled": False, "stop_plan": None}
# The student's classifier, by the zoo's parameter names; the init stages of AB and FSP train everything else.
CLASSIFIER_NAMES = ("fc", "linear", "classifier")
# What each init stage trains (RepDistiller helper/pretrain.py): the student's feature layers (all but the
# classifier) and AB's connector; FSP's student feature layers; FT's paraphraser (on the teacher alone).
INIT_STAGE = {"ab": ("student_features", "connector"), "fsp": ("student_features",), "ft": ("paraphraser",)}
# Modules frozen in the main stage (RepDistiller: AB's connector and FT's paraphraser are set to eval and are not in
# the trainable list).
FROZEN_IN_MAIN = ("connector", "paraphraser")


@flax.struct.dataclass
class DistillState:
    step: jax.Array
    params: Any  # {'student': ..., <module name>: ...}: the student and the method's extra modules
    batch_stats: Any  # the student's
    module_stats: Any  # BatchNorm statistics of the extra modules that have BatchNorm ({name: ...}; {} otherwise)
    spectral: Any  # power-iteration vectors of spectrally normalised heads ({} otherwise)
    opt_state: Any  # the main stage's optimizer
    init_opt_state: Any  # the init stage's optimizer (AB, FT, FSP; () otherwise)
    rng: jax.Array
    method_state: Any  # CRDState (crd, wcord with memory), QueueState (wcord with queue), or {}
    key_params: Any  # WCoRD's momentum key heads ({'embed_s': ..., 'embed_t': ...}; {} otherwise)


def uses_heads(method: str) -> bool:
    return method in CRD_METHODS + WCORD_METHODS


def _method_config(config):
    return config.wcord if config.method in WCORD_METHODS else config.crd


def _wcord_memory(config) -> bool:
    return config.method in WCORD_METHODS and config.wcord.negatives == "memory"


def _wcord_queue(config) -> bool:
    return config.method in WCORD_METHODS and config.wcord.negatives == "queue"


def _key_heads(config) -> bool:
    """Whether the run keeps momentum key heads (WCoRD with key_heads=ema and a queue or memory of keys)."""
    return config.method in WCORD_METHODS and config.wcord.key_heads == "ema" and config.wcord.negatives != "batch"


def _student_queue_size(w):
    """Rows of the student queue that teacher anchors score: the newest `student_queue_fraction` of K (None: all)."""
    return None if w.student_queue_fraction >= 1.0 else max(1, round(w.num_negatives * w.student_queue_fraction))


def init_epochs(config) -> int:
    return int(config.get("init_epochs", 0) or 0) if config.method in STAGED_METHODS else 0


def validate(config, num_devices: int) -> None:
    train.validate_config(config, num_devices)
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; valid: {', '.join(METHODS)}")
    if config.teacher.model not in models.list_models():
        raise ConfigError(f"unknown teacher model {config.teacher.model!r}; valid: {', '.join(models.list_models())}")
    if not config.teacher.checkpoint:
        raise ConfigError("--config.teacher.checkpoint=DIR is required: the workdir of a trained teacher run "
                          f"(python -m wcord_jax.main --config configs/teacher.py:{config.teacher.model} --workdir DIR)")
    if config.get("init_epochs", 0) < 0:
        raise ConfigError(f"init_epochs must be >= 0, got {config.init_epochs}")
    w = config.wcord
    if w.lipschitz not in _LIPSCHITZ:
        raise ConfigError(f"unknown wcord.lipschitz {w.lipschitz!r}; valid: {', '.join(_LIPSCHITZ)}")
    if w.local_gradient not in _LOCAL_GRADIENTS:
        raise ConfigError(f"unknown wcord.local_gradient {w.local_gradient!r}; valid: {', '.join(_LOCAL_GRADIENTS)}")
    if w.local_scope not in ("global", "device"):
        raise ConfigError(f"unknown wcord.local_scope {w.local_scope!r}; valid: global, device")
    for key, valid in (("negatives", _NEGATIVES), ("key_heads", _KEY_HEADS), ("directions", _DIRECTIONS)):
        if w[key] not in valid:
            raise ConfigError(f"unknown wcord.{key} {w[key]!r}; valid: {', '.join(valid)}")
    if not 0.0 <= w.key_momentum < 1.0:
        raise ConfigError(f"wcord.key_momentum must be in [0, 1), got {w.key_momentum}")
    if not 0.0 < w.student_queue_fraction <= 1.0:
        raise ConfigError(f"wcord.student_queue_fraction must be in (0, 1], got {w.student_queue_fraction}")
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
# Extra modules and state


class _VIDRegressors(flax.linen.Module):
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


def feature_shapes(module, image_shape, preact: bool = False) -> list[tuple[int, ...]]:
    """The shapes of `module`'s feature list for one image (batch dimension 1)."""
    out = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                                         train=False, preact=preact)[0])
    return [tuple(f.shape) for f in out[1]]


def make_modules(config, s_shapes, t_shapes) -> dict:
    """The method's extra flax modules by name, with example inputs for their initialisation: {name: (module, args)}.

    Raises ConfigError when the method cannot pair these two networks (FitNet's regressor rule, FSP's channels).
    """
    method, modules = config.method, {}
    if uses_heads(method):
        mc = _method_config(config)
        spectral = method in WCORD_METHODS and config.wcord.lipschitz == "spectral"
        make = functools.partial(heads.Embed, features=mc.feat_dim, spectral_norm=spectral,
                                 power_iterations=config.wcord.power_iterations)
        modules["embed_s"] = (make(), (jnp.zeros((1, int(np.prod(s_shapes[-1][1:])))),))
        modules["embed_t"] = (make(), (jnp.zeros((1, int(np.prod(t_shapes[-1][1:])))),))
    elif method == "cc":
        modules["embed_s"] = (dm.LinearEmbed(config.crd.feat_dim), (jnp.zeros(s_shapes[-1]),))
        modules["embed_t"] = (dm.LinearEmbed(config.crd.feat_dim), (jnp.zeros(t_shapes[-1]),))
    elif method == "fitnet":
        h = config.fitnet.hint_layer
        if not 0 <= h < len(s_shapes) - 1:
            raise ConfigError(f"fitnet.hint_layer={h} is not a feature map index (0..{len(s_shapes) - 2})")
        try:
            reg = dm.ConvReg(s_shapes[h], t_shapes[h], axis_name=AXIS)
            jax.eval_shape(lambda: reg.init(jax.random.PRNGKey(0), jnp.zeros(s_shapes[h]), train=False))
        except ValueError as e:
            raise ConfigError(f"fitnet: {e}") from e
        modules["conv_reg"] = (reg, (jnp.zeros(s_shapes[h]), False))
    elif method == "vid":
        modules["vid"] = (_VIDRegressors(s_shapes[1:-1], t_shapes[1:-1]), ([jnp.zeros(x) for x in s_shapes[1:-1]],))
    elif method == "ab":
        modules["connector"] = (dm.Connector(s_shapes[1:-1], t_shapes[1:-1], axis_name=AXIS),
                                ([jnp.zeros(x) for x in s_shapes[1:-1]], False))
    elif method == "ft":
        modules["paraphraser"] = (dm.Paraphraser(t_shapes[-2]), (jnp.zeros(t_shapes[-2]),))
        modules["translator"] = (dm.Translator(s_shapes[-2], t_shapes[-2], axis_name=AXIS),
                                 (jnp.zeros(s_shapes[-2]), False))
    elif method == "fsp":
        try:
            losses.baselines.check_fsp_shapes(s_shapes[:-1], t_shapes[:-1])
        except ValueError as e:
            raise ConfigError(f"fsp cannot pair {config.teacher.model} with {config.model}: {e}") from e
    return modules


def _classifier_name(student_params) -> str:
    names = [k for k in student_params if k in CLASSIFIER_NAMES]
    if len(names) != 1:
        raise ValueError(f"cannot tell the classifier among the student's parameters {sorted(student_params)}")
    return names[0]


def trainable_mask(params, stage: str, method: str):
    """A pytree of booleans over `params`: what the optimizer of `stage` ('init' or 'main') trains."""
    if stage == "main":
        return {k: jax.tree.map(lambda _: k not in FROZEN_IN_MAIN, v) for k, v in params.items()}
    parts = INIT_STAGE[method]
    mask = {k: jax.tree.map(lambda _: k in parts, v) for k, v in params.items()}
    if "student_features" in parts:
        head = _classifier_name(params["student"])
        mask["student"] = {k: jax.tree.map(lambda _: k != head, v) for k, v in params["student"].items()}
    return mask


def make_optimizers(config, params, steps_per_epoch: int):
    """(main, init) optimizers: RepDistiller's SGD over each stage's trainable parameters (`trainable_mask`). The
    init stage's learning rate is constant; `init` is None for methods without an init stage."""
    main = optax.masked(train.make_optimizer(config, steps_per_epoch), trainable_mask(params, "main", config.method))
    if not init_epochs(config):
        return main, None
    lr = init_learning_rate(config)
    init = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr, momentum=config.momentum))
    return main, optax.masked(init, trainable_mask(params, "init", config.method))


def init_learning_rate(config) -> float:
    if config.get("init_learning_rate") is not None:
        return float(config.init_learning_rate)
    if config.method == "ft" and config.model.startswith(("resnet", "wrn")):
        return 0.01  # RepDistiller's paraphraser pre-training rate for resnet / wrn students
    return float(config.learning_rate)


def create_state(config, key, student, modules: dict, image_shape, n_data: int, steps_per_epoch: int):
    """The initial state and the (main, init) optimizers."""
    init = jax.jit(functools.partial(student.init, train=False))(jax.random.fold_in(key, 0),
                                                                 jnp.zeros((1, *image_shape)))
    params = {"student": init["params"]}
    module_stats, spectral = {}, {}
    keys = jax.random.split(jax.random.fold_in(key, _HEADS_STREAM), max(len(modules), 1))
    for k, (name, (module, args)) in zip(keys, sorted(modules.items())):
        v = jax.jit(lambda kk, m=module, a=args: m.init(kk, *a))(k)
        params[name] = v.get("params", {})
        if "batch_stats" in v:
            module_stats[name] = v["batch_stats"]
        if heads.SPECTRAL_COLLECTION in v:
            spectral[name] = v[heads.SPECTRAL_COLLECTION]
    state_key = jax.random.fold_in(key, _STATE_STREAM)
    method_state = {}
    if config.method in CRD_METHODS or _wcord_memory(config):
        method_state = losses.init_crd_state(state_key, n_data, _method_config(config).feat_dim)
    elif _wcord_queue(config):
        method_state = losses.init_queue_state(state_key, config.wcord.num_negatives, config.wcord.feat_dim,
                                               empty=config.wcord.queue_init == "empty")
    # The key heads start as copies of the trained heads (MoCo).
    key_params = {k: jax.tree.map(jnp.copy, params[k]) for k in ("embed_s", "embed_t")} if _key_heads(config) else {}
    tx, init_tx = make_optimizers(config, params, steps_per_epoch)
    state = DistillState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=init.get("batch_stats", {}),
                         module_stats=module_stats, spectral=spectral, opt_state=tx.init(params),
                         init_opt_state=init_tx.init(params) if init_tx is not None else (), rng=key,
                         method_state=method_state, key_params=key_params)
    return state, tx, init_tx


def state_spec(config) -> Any:
    """PartitionSpecs of the state: all replicated except a WCoRD queue, split over the devices."""
    method_state = P()
    if _wcord_queue(config):
        method_state = losses.queue_state_specs(AXIS)
    return DistillState(step=P(), params=P(), batch_stats=P(), module_stats=P(), spectral=P(), opt_state=P(),
                        init_opt_state=P(), rng=P(), method_state=method_state, key_params=P())


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


def _apply_bn_module(module, params, stats, *args, train: bool):
    """Applies a module with BatchNorm; returns (output, new statistics)."""
    variables = {"params": params, "batch_stats": stats}
    if train:
        out, new = module.apply(variables, *args, True, mutable=["batch_stats"])
        return out, new.get("batch_stats", stats)
    return module.apply(variables, *args, False), stats


def _dkd_weight(config, state, steps_per_epoch: int, first_main_step: int):
    """mdistiller's warm-up min(epoch / dkd.warmup_epochs, 1), the 1-based main-stage epoch constant within an epoch.

    The warm-up is absolute, as in mdistiller: it does not scale with the run's length (unlike the learning-rate decay
    epochs). It protects a barely trained student from the beta-weighted NCKD term, and how long that takes depends on
    how much the student has trained, not on how long the run goes on; a scaled warm-up shrank to a third of an epoch
    in a 4-epoch run. A run shorter than the warm-up never reaches the full DKD weight; set dkd.warmup_epochs then.
    """
    epoch = (state.step - first_main_step) // steps_per_epoch + 1
    return losses.dkd_warmup(epoch, config.dkd.warmup_epochs)


def _baseline_term(config, params, module_stats, modules, s_feats, t_feats, s_logits, t_logits, labels, dkd_weight):
    """The main-stage term of a RepDistiller baseline or DKD: (term, {name: value}, new module statistics)."""
    method, ax = config.method, AXIS
    f32 = [f.astype(jnp.float32) for f in s_feats]
    new_stats = dict(module_stats)
    if method == "fitnet":
        h = config.fitnet.hint_layer
        reg, new_stats["conv_reg"] = _apply_bn_module(modules["conv_reg"][0], params["conv_reg"],
                                                      module_stats["conv_reg"], s_feats[h], train=True)
        term = losses.fitnet_loss(reg, t_feats[h], axis_name=ax)
    elif method == "at":
        term = losses.at_loss(f32[1:-1], t_feats[1:-1], axis_name=ax)
    elif method == "sp":
        term = losses.sp_loss(f32[-2], t_feats[-2], axis_name=ax)
    elif method == "cc":
        e_s = modules["embed_s"][0].apply({"params": params["embed_s"]}, f32[-1])
        e_t = modules["embed_t"][0].apply({"params": params["embed_t"]}, t_feats[-1])
        term = losses.cc_loss(e_s, e_t, axis_name=ax)
    elif method == "vid":
        mus, variances = modules["vid"][0].apply({"params": params["vid"]}, s_feats[1:-1])
        term = losses.vid_loss(mus, variances, t_feats[1:-1], axis_name=ax)
    elif method == "rkd":
        term = losses.rkd_loss(f32[-1], t_feats[-1], config.rkd.distance_weight, config.rkd.angle_weight,
                               axis_name=ax)
    elif method == "pkt":
        term = losses.pkt_loss(f32[-1], t_feats[-1], axis_name=ax)
    elif method == "nst":
        term = losses.nst_loss(f32[1:-1], t_feats[1:-1], axis_name=ax)
    elif method == "ft":
        factor_t = modules["paraphraser"][0].apply({"params": params["paraphraser"]}, t_feats[-2], is_factor=True)
        factor_s, new_stats["translator"] = _apply_bn_module(modules["translator"][0], params["translator"],
                                                             module_stats["translator"], s_feats[-2], train=True)
        term = losses.ft_loss(factor_s, lax.stop_gradient(factor_t), axis_name=ax)
    elif method == "dkd":
        d = config.dkd
        term = dkd_weight * losses.dkd_loss(s_logits, t_logits, labels, d.alpha, d.beta, d.temperature, axis_name=ax)
    else:  # ab, fsp: the main stage has no term of their own (RepDistiller)
        return jnp.zeros((), jnp.float32), {}, new_stats
    return term, {method: term}, new_stats


def distill_step(state: DistillState, batch: dict, teacher_vars, class_index, *, config, student, teacher, modules,
                 tx, steps_per_epoch: int, first_main_step: int = 0):
    """One main-stage distillation step on this device's shard (inside shard_map over `data`); see the module
    docstring. `modules` is `make_modules`' dict."""
    method = config.method
    preact = method == "ab"
    x = batch["image"]
    t_logits, t_feats = teacher.apply(teacher_vars, x, train=False, preact=preact)
    t_logits = lax.stop_gradient(t_logits)
    t_feats = [lax.stop_gradient(f.astype(jnp.float32)) for f in t_feats]
    t_feat = t_feats[-1]
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _METHOD_STREAM), state.step)
    contrast_idx = None
    if method in CRD_METHODS or _wcord_memory(config):
        contrast_idx = _contrast_idx(key, batch, class_index, config)
    embed_s, embed_t = (modules["embed_s"][0], modules["embed_t"][0]) if uses_heads(method) else (None, None)
    dkd_weight = _dkd_weight(config, state, steps_per_epoch, first_main_step) if method == "dkd" else None

    def loss_fn(params):
        (s_logits, s_feats), new_vars = student.apply({"params": params["student"], "batch_stats": state.batch_stats},
                                                      x, train=True, preact=preact, mutable=["batch_stats"])
        terms = {"ce": lax.pmean(feeds.cross_entropy(s_logits, batch["label"]).mean(), AXIS),
                 "kd": losses.kd_loss(s_logits, t_logits, config.kd_temperature, axis_name=AXIS)}
        method_state, spectral, module_stats, extra = state.method_state, state.spectral, state.module_stats, {}
        term = jnp.zeros((), jnp.float32)
        if uses_heads(method):
            s_feat = s_feats[-1].astype(jnp.float32)
            emb_s, spec_s = _embed(embed_s, params["embed_s"], state.spectral.get("embed_s"), s_feat, True)
            emb_t, spec_t = _embed(embed_t, params["embed_t"], state.spectral.get("embed_t"), t_feat, True)
            if state.spectral:
                spectral = {"embed_s": spec_s, "embed_t": spec_t}
            extra.update(_embedding_stats(emb_s, emb_t))
            key_s = key_t = None
            if state.key_params:  # the momentum heads' keys of the live student's and the teacher's features
                key_s = lax.stop_gradient(_embed(embed_s, state.key_params["embed_s"], state.spectral.get("embed_s"),
                                                 lax.stop_gradient(s_feat), False)[0])
                key_t = lax.stop_gradient(_embed(embed_t, state.key_params["embed_t"], state.spectral.get("embed_t"),
                                                 t_feat, False)[0])
        if method in CRD_METHODS:
            c = config.crd
            term, method_state = losses.crd_loss(state.method_state, emb_s, emb_t, batch["index"], contrast_idx,
                                                 c.nce_t, c.nce_m, axis_name=AXIS)
            terms["crd"] = term
        elif method in WCORD_METHODS:
            w = config.wcord
            both = w.directions == "both"
            if w.negatives == "batch":
                glob = losses.wcord_global_loss_batch(emb_s, emb_t, w.tau, axis_name=AXIS, teacher_anchors=both)
            elif w.negatives == "queue":
                glob, method_state = losses.wcord_global_loss(
                    state.method_state, emb_s, emb_t, w.tau, axis_name=AXIS, key_s=key_s, key_t=key_t,
                    teacher_anchors=both, student_queue_size=_student_queue_size(w))
            else:
                glob, method_state = losses.wcord_global_loss_memory(
                    state.method_state, emb_s, emb_t, batch["index"], contrast_idx, w.tau, config.crd.nce_m,
                    axis_name=AXIS, key_s=key_s, key_t=key_t, teacher_anchors=both)
            mode = _LOCAL_GRADIENTS[w.local_gradient]
            per_device = w.local_scope == "device"
            local, aux = losses.wcord_local_loss(
                emb_s, emb_t, epsilon=w.epsilon, max_iterations=w.sinkhorn_iterations,
                threshold=w.sinkhorn_threshold, implicit_diff=mode if mode is not None else False,
                stop_plan_gradient=mode is None, axis_name=None if per_device else AXIS)
            if per_device:
                local = lax.pmean(local, AXIS)
                aux = {k: lax.pmean(jnp.asarray(v, jnp.float32), AXIS) for k, v in aux.items()}
            term = w.lambda_global * glob + w.lambda_local * local
            terms.update({"wcord_global": glob, "wcord_local": local})
            extra["sinkhorn_converged"] = jnp.asarray(aux["converged"], jnp.float32)
            if w.lipschitz == "gradient_penalty":
                gp = _gradient_penalty(embed_s, embed_t, params, s_feat, t_feat, w.tau)
                terms["wcord_gp"] = gp
                term = term + w.gp_weight * gp
        elif method not in ("none", "kd"):
            term, named, module_stats = _baseline_term(config, params, state.module_stats, modules, s_feats, t_feats,
                                                       s_logits, t_logits, batch["label"], dkd_weight)
            terms.update(named)
        total = config.gamma * terms["ce"] + config.alpha * terms["kd"] + config.beta * term
        return total, (terms, extra, new_vars["batch_stats"], method_state, spectral, module_stats, s_logits)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    terms, extra, batch_stats, method_state, spectral, module_stats, s_logits = aux
    params, opt_state = _update(tx, grads, state.opt_state, state.params, trainable_mask(state.params, "main", method),
                                config.heads_lr_scale)
    top1 = lax.pmean(jnp.mean((jnp.argmax(s_logits, -1) == batch["label"]).astype(jnp.float32)), AXIS)
    key_params = state.key_params
    if key_params:
        m = config.wcord.key_momentum
        key_params = {k: jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, v, params[k]) for k, v in key_params.items()}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, module_stats=module_stats,
                              spectral=spectral, opt_state=opt_state, method_state=method_state, key_params=key_params)
    return new_state, {"loss": loss, "top1": top1, **terms, **extra}


def _update(tx, grads, opt_state, params, mask, heads_lr_scale: float = 1.0):
    """The optimizer step over the trainable parameters only (`optax.masked` passes the others' gradients through:
    they are dropped here, so frozen parameters stay bit-identical)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, mask)
    if heads_lr_scale != 1.0:
        updates = {k: jax.tree.map(lambda u: u * heads_lr_scale, v) if k.startswith("embed") else v
                   for k, v in updates.items()}
    return optax.apply_updates(params, updates), opt_state


def init_stage_step(state: DistillState, batch: dict, teacher_vars, class_index, *, config, student, teacher,
                    modules, init_tx):
    """One step of RepDistiller's init stage (helper/pretrain.py) for AB, FSP or FT, on this device's shard.

    AB: the student's feature layers and the connector are trained on the AB loss between the connector's output on
    the student's pre-activation maps and the teacher's. FSP: the student's feature layers on the FSP loss. FT: the
    paraphraser on reconstructing the teacher's `features[-2]` (mean squared error); the student is only evaluated.
    The loss is the term alone (no gamma / alpha / beta); the student's classifier is not trained.
    """
    del class_index
    method = config.method
    preact = method == "ab"
    x = batch["image"]
    _, t_feats = teacher.apply(teacher_vars, x, train=False, preact=preact)
    t_feats = [lax.stop_gradient(f.astype(jnp.float32)) for f in t_feats]

    def loss_fn(params):
        module_stats = state.module_stats
        if method == "ft":
            s_logits = student.apply({"params": params["student"], "batch_stats": state.batch_stats}, x,
                                     train=False)[0]
            batch_stats = state.batch_stats
            _, rec = modules["paraphraser"][0].apply({"params": params["paraphraser"]}, t_feats[-2])
            term = lax.pmean(jnp.mean((rec.astype(jnp.float32) - t_feats[-2]) ** 2), AXIS)
        else:
            (s_logits, s_feats), new_vars = student.apply(
                {"params": params["student"], "batch_stats": state.batch_stats}, x, train=True, preact=preact,
                mutable=["batch_stats"])
            batch_stats = new_vars["batch_stats"]
            if method == "ab":
                g_s, stats = _apply_bn_module(modules["connector"][0], params["connector"],
                                              module_stats.get("connector", {}), s_feats[1:-1], train=True)
                if stats:  # (a connector of identities only has no BatchNorm)
                    module_stats = {**module_stats, "connector": stats}
                term = losses.ab_loss(g_s, t_feats[1:-1], axis_name=AXIS)
            else:
                term = losses.fsp_loss([f.astype(jnp.float32) for f in s_feats[:-1]], t_feats[:-1], axis_name=AXIS)
        return term, (batch_stats, module_stats, s_logits)

    (loss, (batch_stats, module_stats, s_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, init_opt_state = _update(init_tx, grads, state.init_opt_state, state.params,
                                     trainable_mask(state.params, "init", method))
    top1 = lax.pmean(jnp.mean((jnp.argmax(s_logits, -1) == batch["label"]).astype(jnp.float32)), AXIS)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, module_stats=module_stats,
                              init_opt_state=init_opt_state)
    return new_state, {"loss": loss, "top1": top1, f"init_{method}": loss}


# --------------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Engine:
    """The pieces of a distillation run, built once by `build_engine`.

    `main_step` / `init_step` are the per-device step functions for `feed.make_runner(..., num_extra=2,
    state_spec=spec)`, called as `runner(state, teacher_vars, class_index, *feed_args)`; `init_step` is None
    without an init stage. `teacher_vars` and `class_index` are unreplicated.
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


def build_engine(config, dataset, steps_per_epoch: int, dtype, teacher_vars=None) -> Engine:
    """Teacher (restored from `config.teacher.checkpoint` unless `teacher_vars` is given), student, the method's
    modules, the initial state, the optimizers and the step functions, with the configuration checks that need the
    networks' shapes."""
    if teacher_vars is None:
        teacher, teacher_vars = load_teacher(config, dataset.num_classes, dataset.image_shape, dtype)
    else:
        teacher = models.get_model(config.teacher.model, dataset.num_classes, dtype=dtype)
    student = models.get_model(config.model, dataset.num_classes, dtype=dtype, axis_name=AXIS)
    preact = config.method == "ab"
    modules = make_modules(config, feature_shapes(student, dataset.image_shape, preact),
                           feature_shapes(teacher, dataset.image_shape, preact))
    n_init = init_epochs(config)
    state, tx, init_tx = create_state(config, jax.random.PRNGKey(config.seed), student, modules, dataset.image_shape,
                                      dataset.num_train, steps_per_epoch)
    class_index = {}
    if dataset.in_memory:
        class_index = losses.build_class_index(dataset.train.labels, dataset.num_classes)
        if (config.method in CRD_METHODS and not config.crd.sample_with_replacement
                and config.crd.nce_k > class_index.min_others):
            raise ConfigError(f"crd.nce_k={config.crd.nce_k} exceeds the {class_index.min_others} examples of the "
                              "other classes: lower it or set crd.sample_with_replacement=True")
    main_step = functools.partial(distill_step, config=config, student=student, teacher=teacher, modules=modules,
                                  tx=tx, steps_per_epoch=steps_per_epoch, first_main_step=n_init * steps_per_epoch)
    init_step = None
    if n_init:
        init_step = functools.partial(init_stage_step, config=config, student=student, teacher=teacher,
                                      modules=modules, init_tx=init_tx)
    return Engine(student=student, teacher=teacher, teacher_vars=teacher_vars, modules=modules, state=state,
                  spec=state_spec(config), main_step=main_step, init_step=init_step, class_index=class_index,
                  init_epochs=n_init)


def distill_and_evaluate(config, workdir: str) -> dict:
    """Distils `config.teacher` into `config.model` with `config.method`; returns the student's final eval metrics."""
    mesh, dtype, dataset, feed = train.setup_run(config, validate)
    if not dataset.in_memory and (config.method in CRD_METHODS or _wcord_memory(config)):
        raise ConfigError("CRD's memory bank needs the labels of the whole training set: use an in-memory data set")
    spe = feed.steps_per_epoch
    eng = build_engine(config, dataset, spe, dtype)
    n_init = eng.init_epochs
    main_runner = feed.make_runner(eng.main_step, dtype, num_extra=2, state_spec=eng.spec)
    init_runner = feed.make_runner(eng.init_step, dtype, num_extra=2, state_spec=eng.spec) if n_init else None
    teacher_vars = parallel.replicate(eng.teacher_vars, mesh)
    class_index = parallel.replicate(eng.class_index, mesh)

    def runner_for_epoch(epoch: int):
        runner = init_runner if epoch < n_init else main_runner
        return lambda st, *args: runner(st, teacher_vars, class_index, *args)

    main_schedule = train.learning_rate_schedule(config, spe)
    init_lr = init_learning_rate(config) if n_init else 0.0

    def schedule(step):
        return init_lr if step < n_init * spe else main_schedule(step - n_init * spe)

    student, teacher = eng.student, eng.teacher
    evaluate = feed.make_evaluator(lambda v, x: student.apply(v, x, train=False)[0], dtype)
    evaluate_teacher = feed.make_evaluator(lambda v, x: teacher.apply(v, x, train=False)[0], dtype)

    def teacher_metrics():
        result = {f"teacher/{k.split('/')[1]}": v for k, v in evaluate_teacher(teacher_vars).items()}
        log.info("teacher %s: eval top1 %.4f top5 %.4f", config.teacher.model, result["teacher/top1"],
                 result["teacher/top5"])
        return result

    stages = f" ({n_init} init-stage epochs first)" if n_init else ""
    return train.run_training(
        config, workdir, mesh, feed, eng.state, None,
        lambda st: evaluate({"params": st.params["student"], "batch_stats": st.batch_stats}), schedule,
        describe=f"{config.method}: {config.teacher.model} -> {config.model} on {dataset.name}{stages}",
        state_spec=eng.spec, before_training=teacher_metrics, runner_for_epoch=runner_for_epoch,
        extra_epochs=n_init)
