"""WCoRD (Chen et al., CVPR 2021): `wcord`, and `wcordkd` (WCoRD + KD).

The term is lambda_global * global + lambda_local * local:

* global (the dual form): a Lipschitz critic f(t, s) = <g_t(t), g_s(s)> / tau over two embedding heads (spectrally
  normalised by default) in a contrastive NCE. The negatives come from a queue of past keys (`negatives=queue`,
  K = num_negatives rows split over the devices), the other examples of the global batch (`batch`, CLIP's symmetric
  InfoNCE) or CRD's memory bank (`memory`). With `key_heads=ema` the positive key of each anchor and every queued
  key come from momentum copies of both heads (MoCo), kept in its state (`key_heads`);
  `key_heads=trained` (keys from the trained heads) is the first design, kept as an ablation: it collapses.
* local (the primal form): entropic optimal transport between the batch's student and teacher embeddings (ott-jax
  Sinkhorn), over the all-gathered batch (`local_scope=global`) or per device.

Settings `config.wcord.*` (the memory bank uses `config.crd.*`); the design and the measurements behind the defaults
are in docs/wcord.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from wcord_jax import heads, losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term
from wcord_jax.distillers.crd import check_negatives, contrast_idx, embed_heads
from wcord_jax.core import ConfigError

LIPSCHITZ = ("spectral", "gradient_penalty", "none")
NEGATIVES = ("queue", "batch", "memory")
KEY_HEADS = ("ema", "trained")
DIRECTIONS = ("both", "student")
# Settings kept only to reproduce comparisons (docs/wcord.md), refused unless wcord.ablation=True: (key, value) ->
# why it is not a setting to train with.
ABLATIONS = {("key_heads", "trained"): "the first design: its heads collapse (tests/test_wcord_learns.py)",
             ("queue_init", "random"): "MoCo's start, kept for comparison: random rows are scored as negatives "
                                       "before any key is written"}
# local_gradient -> wcord_local_loss's implicit_diff (None: stop the plan's gradient)
LOCAL_GRADIENTS = {"implicit": "dense", "unrolled": False, "stop_plan": None}


def student_queue_size(w):
    """Rows of the student queue that teacher anchors score: the newest `student_queue_fraction` of K (None: all)."""
    return None if w.student_queue_fraction >= 1.0 else max(1, round(w.num_negatives * w.student_queue_fraction))


def gradient_penalty(embed_s, embed_t, params, feat_s, feat_t, tau, axis_name):
    """mean_i (|| d f(t_i, s_i) / d(s_i, t_i) ||_2 - 1)^2 for the critic f(t, s) = <g_t(t), g_s(s)> / tau."""

    def critic(fs, ft):
        es = embed_s.apply({"params": params["embed_s"]}, fs[None])[0]
        et = embed_t.apply({"params": params["embed_t"]}, ft[None])[0]
        return jnp.dot(es, et, precision=losses.SCORE_PRECISION) / tau

    gs, gt = jax.vmap(jax.grad(critic, argnums=(0, 1)))(feat_s, feat_t)
    norms = jnp.sqrt(jnp.sum(gs ** 2, -1) + jnp.sum(gt ** 2, -1))
    return lax.pmean(jnp.mean((norms - 1.0) ** 2), axis_name)


class WCoRD(Distiller):
    description = ("Wasserstein contrastive distillation: a Lipschitz critic's NCE with momentum keys (global) + "
                   "Sinkhorn OT within the batch (local)")
    weights = (1.0, 0.0, 0.8)
    config_section = "wcord"
    shared_sections = ("crd",)  # negatives=memory is CRD's memory bank, with its settings
    ensemble = "per_teacher"

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.feat_dim = 128
        c.tau = 0.07  # critic temperature: f(t, s) = <g_t(t), g_s(s)> / tau
        c.num_negatives = 16384  # queue length K (split over the devices)
        # Where the global term's negatives come from: queue (a FIFO of past keys, K = num_negatives) | batch (the
        # other examples of the global batch, CLIP's symmetric InfoNCE) | memory (CRD's memory bank with crd.*
        # settings; the positive is the bank row too, as in CRD).
        c.negatives = "queue"
        # Keys (the positive of each anchor and what is written to the queue / memory): ema (momentum copies of both
        # heads, as MoCo) | trained (the trained heads themselves: the first design, kept as an ablation; it
        # collapses).
        c.key_heads = "ema"
        c.key_momentum = 0.999  # key head <- m * key head + (1 - m) * trained head, after every step
        c.directions = "both"  # both (student and teacher anchors) | student (student anchors only)
        # Teacher anchors score only the newest fraction of the student queue (its keys come from the live student
        # backbone, so old rows are stale); 1.0: all K rows.
        c.student_queue_fraction = 0.125
        c.queue_init = "empty"  # empty (only written rows are negatives) | random (MoCo: random unit vectors)
        c.lipschitz = "spectral"  # spectral | gradient_penalty | none
        c.power_iterations = 1  # spectral-norm power-iteration steps per train step
        c.gp_weight = 1.0  # weight of the gradient penalty (lipschitz=gradient_penalty)
        c.lambda_global = 1.0  # method term = lambda_global * global + lambda_local * local
        c.lambda_local = 1.0
        c.epsilon = 0.05  # entropic regularisation of the local OT (absolute)
        c.sinkhorn_iterations = 100
        c.sinkhorn_threshold = 1e-3
        c.local_gradient = "implicit"  # implicit | unrolled | stop_plan
        c.local_scope = "global"  # global (OT over the all-gathered batch) | device (per-device batch)
        # The settings kept only as ablations (ABLATIONS: key_heads=trained, queue_init=random) need ablation=True.
        c.ablation = False
        return c

    def validate(self, config, num_devices):
        w = config.wcord
        for key, valid in (("lipschitz", LIPSCHITZ), ("local_gradient", tuple(LOCAL_GRADIENTS)),
                           ("local_scope", ("global", "device")), ("negatives", NEGATIVES),
                           ("key_heads", KEY_HEADS), ("directions", DIRECTIONS), ("queue_init", ("empty", "random"))):
            if w[key] not in valid:
                raise ConfigError(f"unknown wcord.{key} {w[key]!r}; valid: {', '.join(valid)}")
        for (key, value), why in ABLATIONS.items():
            if w[key] == value and not w.ablation:
                raise ConfigError(f"wcord.{key}={value} is kept only as an ablation ({why}); add "
                                  "--config.wcord.ablation=True to run it anyway")
        if not 0.0 <= w.key_momentum < 1.0:
            raise ConfigError(f"wcord.key_momentum must be in [0, 1), got {w.key_momentum}")
        if not 0.0 < w.student_queue_fraction <= 1.0:
            raise ConfigError(f"wcord.student_queue_fraction must be in (0, 1], got {w.student_queue_fraction}")
        if w.negatives == "queue" and (w.num_negatives % num_devices or w.num_negatives < config.batch_size):
            raise ConfigError(f"wcord.num_negatives={w.num_negatives} must be a multiple of the device count "
                              f"({num_devices}) and at least batch_size ({config.batch_size})")

    def modules(self, config, s_shapes, t_shapes):
        w = config.wcord
        return embed_heads(w.feat_dim, s_shapes, t_shapes, spectral=w.lipschitz == "spectral",
                           power_iterations=w.power_iterations)

    def init_state(self, config, key, n_data):
        w = config.wcord
        if w.negatives == "memory":
            return losses.init_crd_state(key, n_data, w.feat_dim)
        if w.negatives == "queue":
            return losses.init_queue_state(key, w.num_negatives, w.feat_dim, empty=w.queue_init == "empty")
        return {}

    def state_spec(self, config, axis_name):
        return losses.queue_state_specs(axis_name) if config.wcord.negatives == "queue" else super().state_spec(
            config, axis_name)

    def key_heads(self, config):
        w = config.wcord
        return ("embed_s", "embed_t") if w.key_heads == "ema" and w.negatives != "batch" else ()

    def key_momentum(self, config):
        return config.wcord.key_momentum

    def needs_all_labels(self, config):
        return config.wcord.negatives == "memory"

    def check_data(self, config, class_index):
        if config.wcord.negatives == "memory":
            check_negatives(config.crd, class_index)

    def term(self, inputs: StepInputs) -> Term:
        config, params, ax = inputs.config, inputs.params, inputs.axis_name
        state = inputs.method_state
        spectral, key_heads = state["spectral"], state["key_heads"]
        w = config.wcord
        embed_s, embed_t = inputs.modules["embed_s"], inputs.modules["embed_t"]
        s_feat, t_feat = inputs.s_feats[-1].astype(jnp.float32), inputs.t_feats[-1]
        emb_s, spec_s = heads.apply_embed(embed_s, params["embed_s"], spectral.get("embed_s"), s_feat, True)
        emb_t, spec_t = heads.apply_embed(embed_t, params["embed_t"], spectral.get("embed_t"), t_feat, True)
        new_state = dict(state)
        if spectral:
            new_state["spectral"] = {"embed_s": spec_s, "embed_t": spec_t}
        metrics = heads.embedding_health(emb_s, emb_t, ax)
        key_s = key_t = None
        if key_heads:  # the momentum heads' keys of the live student's and the teacher's features
            key_s = lax.stop_gradient(heads.apply_embed(embed_s, key_heads["embed_s"], spectral.get("embed_s"),
                                                        lax.stop_gradient(s_feat), False)[0])
            key_t = lax.stop_gradient(heads.apply_embed(embed_t, key_heads["embed_t"], spectral.get("embed_t"),
                                                        t_feat, False)[0])
        both = w.directions == "both"
        if w.negatives == "batch":
            glob = losses.wcord_global_loss_batch(emb_s, emb_t, w.tau, axis_name=ax, teacher_anchors=both)
        elif w.negatives == "queue":
            glob, new_state["own"] = losses.wcord_global_loss(
                state["own"], emb_s, emb_t, w.tau, axis_name=ax, key_s=key_s, key_t=key_t,
                teacher_anchors=both, student_queue_size=student_queue_size(w))
        else:
            idx = contrast_idx(inputs.key, inputs.batch, inputs.class_index, config.crd, ax)
            glob, new_state["own"] = losses.wcord_global_loss_memory(
                state["own"], emb_s, emb_t, inputs.batch["index"], idx, w.tau, config.crd.nce_m,
                axis_name=ax, key_s=key_s, key_t=key_t, teacher_anchors=both)
        mode = LOCAL_GRADIENTS[w.local_gradient]
        per_device = w.local_scope == "device"
        local, aux = losses.wcord_local_loss(
            emb_s, emb_t, epsilon=w.epsilon, max_iterations=w.sinkhorn_iterations, threshold=w.sinkhorn_threshold,
            implicit_diff=mode if mode is not None else False, stop_plan_gradient=mode is None,
            axis_name=None if per_device else ax)
        if per_device:
            local = lax.pmean(local, ax)
            aux = {k: lax.pmean(jnp.asarray(v, jnp.float32), ax) for k, v in aux.items()}
        value = w.lambda_global * glob + w.lambda_local * local
        logged = {"wcord_global": glob, "wcord_local": local}
        metrics["sinkhorn_converged"] = jnp.asarray(aux["converged"], jnp.float32)
        if w.lipschitz == "gradient_penalty":
            gp = gradient_penalty(embed_s, embed_t, params, s_feat, t_feat, w.tau, ax)
            logged["wcord_gp"] = gp
            value = value + w.gp_weight * gp
        return Term(value, logged, metrics, new_state)


register("wcord", WCoRD())
register("wcordkd", WCoRD(description="WCoRD + KD", weights=(1.0, 1.0, 0.8)))
