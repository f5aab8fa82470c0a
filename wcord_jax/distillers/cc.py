"""CC (Peng et al., ICCV 2019): correlation congruence of linear embeddings (`LinearEmbed`) of the pooled features,
RepDistiller's `Correlation` with its embeddings."""
from __future__ import annotations

import jax.numpy as jnp

from wcord_jax import distill_modules as dm
from wcord_jax import losses
from wcord_jax.distillers import register
from wcord_jax.distillers.base import Distiller, StepInputs, Term


class CC(Distiller):
    description = "correlation congruence: match correlations between consecutive examples' embeddings"
    weights = (1.0, 0.0, 0.02)
    shared_sections = ("crd",)  # its embeddings are crd.feat_dim wide (RepDistiller's one --feat_dim)

    def modules(self, config, s_shapes, t_shapes):
        return {"embed_s": (dm.LinearEmbed(config.crd.feat_dim), (jnp.zeros(s_shapes[-1]),)),
                "embed_t": (dm.LinearEmbed(config.crd.feat_dim), (jnp.zeros(t_shapes[-1]),))}

    def term(self, inputs: StepInputs) -> Term:
        e_s = inputs.modules["embed_s"].apply({"params": inputs.params["embed_s"]},
                                              inputs.s_feats[-1].astype(jnp.float32))
        e_t = inputs.modules["embed_t"].apply({"params": inputs.params["embed_t"]}, inputs.t_feats[-1])
        loss = losses.cc_loss(e_s, e_t, axis_name=inputs.axis_name)
        return Term(loss, {self.name: loss})


register("cc", CC())
