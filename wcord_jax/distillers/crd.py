"""CRD (Tian, Krishnan & Isola, ICLR 2020): `crd`, and `crdkd` (CRD + KD).

Two embedding heads (`heads.Embed`: linear + L2 normalisation) map the student's and the teacher's pooled features to
`crd.feat_dim`; the term is CRD's NCE loss of each anchor against its positive and `crd.nce_k` negatives of other
classes drawn from a memory bank of past embeddings of the whole training set (`losses.crd_loss`), with the
memories updated at the batch's indices. Settings `config.crd.*`, RepDistiller's defaults.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from wcord_jax import heads, losses
from wcord_jax.data import augment
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term

log = logging.getLogger("wcord_jax")


def contrast_idx(key, batch, class_index, crd_config, axis_name):
    """Negatives (indices into the training set) for this device's anchors; each row's draw is keyed by its global
    batch position, so 1 and D devices draw the same negatives."""
    local = batch["index"].shape[0]
    keys = augment.example_keys(key, lax.axis_index(axis_name) * local, local)
    k, replace = crd_config.nce_k, crd_config.sample_with_replacement

    def one(kk, i, y):
        return losses.sample_contrast_idx(kk, i[None], y[None], class_index, k, replace)[0]

    return jax.vmap(one)(keys, batch["index"], batch["label"])


def embed_heads(feat_dim: int, s_shapes, t_shapes, spectral: bool = False, power_iterations: int = 1) -> dict:
    """The student's and teacher's embedding heads over their last (pooled) features: {'embed_s', 'embed_t'}."""
    make = functools.partial(heads.Embed, features=feat_dim, spectral_norm=spectral,
                             power_iterations=power_iterations)
    return {"embed_s": (make(), (jnp.zeros((1, int(np.prod(s_shapes[-1][1:])))),)),
            "embed_t": (make(), (jnp.zeros((1, int(np.prod(t_shapes[-1][1:])))),))}


def check_negatives(crd_config, class_index) -> None:
    """Says once when some anchors cannot draw nce_k distinct negatives: those draw with replacement (RepDistiller)."""
    if not crd_config.sample_with_replacement and crd_config.nce_k > class_index.min_others:
        pools = class_index.n_data - np.asarray(class_index.count)
        short = [int(c) for c in np.flatnonzero(pools < crd_config.nce_k)]
        log.warning("crd.nce_k=%d exceeds the other-class pool of class%s %s (smallest %d examples): anchors of %s "
                    "draw their negatives with replacement, as RepDistiller does", crd_config.nce_k,
                    "es" if len(short) > 1 else "", ", ".join(map(str, short[:10])) + (" ..." if len(short) > 10 else ""),
                    class_index.min_others, "those classes" if len(short) > 1 else "that class")


class CRD(Distiller):
    description = "contrastive representation distillation: NCE over a memory bank of negatives (Tian et al.)"
    weights = (1.0, 0.0, 0.8)
    config_section = "crd"
    ensemble = "per_teacher"

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.feat_dim = 128  # embedding size of both heads
        c.nce_k = 16384  # negatives per anchor
        c.nce_t = 0.07  # temperature
        c.nce_m = 0.5  # memory momentum
        c.sample_with_replacement = False  # RepDistiller draws negatives without replacement (slower)
        return c

    def modules(self, config, s_shapes, t_shapes):
        return embed_heads(config.crd.feat_dim, s_shapes, t_shapes)

    def init_state(self, config, key, n_data):
        return losses.init_crd_state(key, n_data, config.crd.feat_dim)

    def needs_all_labels(self, config):
        return True

    def check_data(self, config, class_index):
        check_negatives(config.crd, class_index)

    def term(self, inputs: StepInputs) -> Term:
        c, ax = inputs.config.crd, inputs.axis_name
        idx = contrast_idx(inputs.key, inputs.batch, inputs.class_index, c, ax)
        emb_s = inputs.modules["embed_s"].apply({"params": inputs.params["embed_s"]},
                                                inputs.s_feats[-1].astype(jnp.float32))
        emb_t = inputs.modules["embed_t"].apply({"params": inputs.params["embed_t"]}, inputs.t_feats[-1])
        state = inputs.method_state
        loss, memory = losses.crd_loss(state["own"], emb_s, emb_t, inputs.batch["index"], idx, c.nce_t, c.nce_m,
                                       axis_name=ax)
        return Term(loss, {"crd": loss}, heads.embedding_health(emb_s, emb_t, ax), {**state, "own": memory})


register("crd", CRD())
register("crdkd", CRD(description="CRD + KD", weights=(1.0, 1.0, 0.8)))
