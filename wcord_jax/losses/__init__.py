"""Distillation losses as pure, jit-able functions of arrays and explicit state.

Each function taking `axis_name` can be called inside `jax.shard_map` over a one-axis mesh; it then returns the
loss on the global batch, identical (and typed device-invariant) on every device. See `_parallel` for the
conventions.
"""
from wcord_jax.losses.baselines import (ab_loss, at_loss, cc_loss, dkd_loss, dkd_warmup, fitnet_loss, fsp_loss,
                                        ft_loss, nst_loss, pkt_loss, rkd_loss, sp_loss, vid_loss)
from wcord_jax.losses.crd import (ClassIndex, CRDState, build_class_index, crd_loss, crd_nce_loss, crd_probs,
                                  init_crd_state, sample_contrast_idx, update_crd_memories, update_memory)
from wcord_jax.losses.kd import kd_loss
from wcord_jax.losses.wcord import (QueueState, infonce_from_logits, infonce_logits, init_queue_state,
                                    queue_state_specs, wcord_global_loss, wcord_global_loss_batch,
                                    wcord_global_loss_memory, wcord_local_loss)

__all__ = [
    "CRDState", "ClassIndex", "QueueState",
    "build_class_index", "crd_loss", "crd_nce_loss", "crd_probs", "init_crd_state", "sample_contrast_idx",
    "update_crd_memories", "update_memory",
    "infonce_from_logits", "infonce_logits", "init_queue_state", "kd_loss", "queue_state_specs",
    "wcord_global_loss", "wcord_global_loss_batch", "wcord_global_loss_memory", "wcord_local_loss",
    "ab_loss", "at_loss", "cc_loss", "dkd_loss", "dkd_warmup", "fitnet_loss", "fsp_loss", "ft_loss", "nst_loss",
    "pkt_loss", "rkd_loss", "sp_loss", "vid_loss",
]
