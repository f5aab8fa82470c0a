"""Distillation losses as pure, jit-able functions of arrays and explicit state.

Each function taking `axis_name` can be called inside `jax.shard_map` over a one-axis mesh; it then returns the
loss on the global batch, identical (and typed device-invariant) on every device. See `_parallel` for the
conventions; `gather(x, axis_name)` is its tiled all-gather of the global batch, typed device-invariant (what a
replicated state, a queue of keys say, must be built from).

RepDistiller's feature-based baselines (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST) and DKD have one file each
(`fitnet`, `at`, `sp`, `cc`, `vid`, `rkd`, `pkt`, `ab`, `ft`, `fsp`, `nst`, `dkd`); their shared helpers and
conventions (NHWC layout, PyTorch's adaptive pooling, teacher gradients, per-example vs batch-coupled losses on
several devices) are in `_common`.
"""
from wcord_jax.losses._parallel import gather
from wcord_jax.losses._precision import SCORES as SCORE_PRECISION
from wcord_jax.losses.ab import ab_loss
from wcord_jax.losses.at import at_loss
from wcord_jax.losses.cc import cc_loss
from wcord_jax.losses.crd import (ClassIndex, CRDState, build_class_index, crd_loss, crd_nce_loss, crd_probs,
                                  init_crd_state, sample_contrast_idx, update_crd_memories, update_memory)
from wcord_jax.losses.dkd import dkd_loss, dkd_warmup
from wcord_jax.losses.fitnet import fitnet_loss
from wcord_jax.losses.fsp import fsp_loss
from wcord_jax.losses.ft import ft_loss
from wcord_jax.losses.kd import ensemble_logits, ensemble_probs, kd_loss, kd_loss_ensemble
from wcord_jax.losses.nst import nst_loss
from wcord_jax.losses.pkt import pkt_loss
from wcord_jax.losses.rkd import rkd_loss
from wcord_jax.losses.sp import sp_loss
from wcord_jax.losses.vid import vid_loss
from wcord_jax.losses.wcord import (QueueState, infonce_from_logits, infonce_logits, init_queue_state,
                                    queue_state_specs, wcord_global_loss, wcord_global_loss_batch,
                                    wcord_global_loss_memory, wcord_local_loss)

__all__ = [
    "CRDState", "ClassIndex", "QueueState", "SCORE_PRECISION", "gather",
    "build_class_index", "crd_loss", "crd_nce_loss", "crd_probs", "init_crd_state", "sample_contrast_idx",
    "update_crd_memories", "update_memory",
    "ensemble_logits", "ensemble_probs", "infonce_from_logits", "infonce_logits", "init_queue_state", "kd_loss",
    "kd_loss_ensemble", "queue_state_specs",
    "wcord_global_loss", "wcord_global_loss_batch", "wcord_global_loss_memory", "wcord_local_loss",
    "ab_loss", "at_loss", "cc_loss", "dkd_loss", "dkd_warmup", "fitnet_loss", "fsp_loss", "ft_loss", "nst_loss",
    "pkt_loss", "rkd_loss", "sp_loss", "vid_loss",
]
