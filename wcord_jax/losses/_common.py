"""Shared helpers of RepDistiller's feature-based baselines and of Decoupled KD (one file per method in this package).

One function per distiller of RepDistiller's `distiller_zoo/` (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST),
plus DKD as in mdistiller (`mdistiller/distillers/DKD.py`), each in its own file of `wcord_jax.losses` (`fitnet`,
`at`, `sp`, `cc`, `vid`, `rkd`, `pkt`, `ab`, `ft`, `fsp`, `nst`, `dkd`); this module holds what they share. Each
reproduces the reference computation, its normalisation epsilons and pooling rules included. The trainable pieces
some of them need (ConvReg, Connector, Paraphraser, Translator, the VID regressor, LinearEmbed) are flax modules in
`wcord_jax.distill_modules`.

Layout. Feature maps are NHWC `[B, H, W, C]` (RepDistiller is NCHW): channel reductions are over the last axis and
spatial pooling over axes 1 and 2. Feature lists follow the model zoo (`features` from
`get_model(...).apply(..., train, preact)`), e.g. `features[1:-1]` for AT/NST/VID/AB, `features[-2]` for SP/FT,
`features[-1]` (pooled vectors) for RKD/PKT and, through `LinearEmbed`, CC. Every function computes in float32,
whatever the input dtype.

Pooling. Where RepDistiller compares maps of different sizes (AT, VID, FT, FSP, NST) it applies
`F.adaptive_avg_pool2d(larger, (h, h))`, h being the *height* of the smaller map, to whichever map is taller;
`match_spatial` does the same and `adaptive_avg_pool2d` implements PyTorch's window rule (see there).

Teacher gradients. Like `kd_loss`, the functions do not stop gradients of the teacher inputs, except where
RepDistiller does so itself inside the loss (RKD's teacher distances and angles, NST's teacher-teacher kernel): pass
the frozen teacher's outputs.

Multi-device use (`axis_name`). Inside `jax.shard_map` over a one-axis mesh, each device holding an equal-sized
shard of the global batch, every function returns the loss on the global batch, identical and typed
device-invariant on every device (differentiating it then gives the global gradients; see `_parallel`):

* per-example losses (a plain mean, or a sum divided by the batch size, over examples): FitNet, AT, VID, AB, FT,
  FSP, NST, DKD. The local loss is computed on the shard and `pmean`'d; this is exact for equal shards. NST is in
  this group: its kernels compare channels *within* one example.
* batch-coupled losses: SP (BxB Gram matrices), RKD (pairwise distances and triplet angles), PKT (BxB similarity
  distributions), CC (products of consecutive examples). These gather the global batch with the differentiable,
  device-invariant `_parallel.gather`. SP, RKD and PKT decompose over rows of their BxB (or BxBxB) tensors: each
  device computes the rows anchored at its own examples against the gathered batch, and the row sums are `psum`'d.
  CC gathers |s - t| (B x D, small) and evaluates the whole loss on every device, since its pairs straddle the shard
  boundaries.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wcord_jax.losses import _parallel

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize default


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
    """L2 norm along `axis` (keepdims) whose gradient at an all-zero vector is 0 instead of NaN; same forward value."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
    """`torch.nn.functional.normalize(x, p=2, dim=axis, eps)`: x / max(||x||_2, eps)."""
    return x / jnp.maximum(_safe_norm(x, axis), eps)


def _check_same_length(name: str, s_list: Sequence, t_list: Sequence) -> None:
    if len(s_list) != len(t_list):
        raise ValueError(f"{name}: {len(s_list)} student maps but {len(t_list)} teacher maps")


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix of PyTorch's adaptive pooling windows along one axis."""
    a = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        a[i, start:end] = 1.0 / (end - start)
    return a


def adaptive_avg_pool2d(x: jax.Array, output_size) -> jax.Array:
    """PyTorch's `F.adaptive_avg_pool2d` on an NHWC map.

    Output cell (i, j) of an (oh, ow) output is the mean of rows [floor(i*H/oh), ceil((i+1)*H/oh)) and columns
    [floor(j*W/ow), ceil((j+1)*W/ow)) of the input. When H and W are multiples of oh and ow, the windows are the
    disjoint (H/oh) x (W/ow) blocks and the mean is taken block-wise (a reshape); otherwise (windows of unequal
    sizes, possibly overlapping, or an output larger than the input) the map is multiplied on both spatial axes by
    the matrices of window averages. Static shapes only.

    Args:
      x: [B, H, W, C].
      output_size: int (square output) or (oh, ow).

    Returns:
      [B, oh, ow, C] in x's dtype.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    n, h, w, c = x.shape
    if (oh, ow) == (h, w):
        return x
    if h % oh == 0 and w % ow == 0:
        return jnp.mean(x.reshape(n, oh, h // oh, ow, w // ow, c), axis=(2, 4))
    ah = jnp.asarray(_pool_matrix(h, oh), x.dtype)
    aw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", ah, x, aw)


def match_spatial(f_s: jax.Array, f_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RepDistiller's size matching: the taller map is adaptive-avg-pooled to (h, h), h = the smaller height.

    Exactly the rule of AT/VID/FT/NST (and of FSP between consecutive maps): only heights are compared and the output
    is square; maps of equal height are returned unchanged (all RepDistiller maps are square).
    """
    s_h, t_h = f_s.shape[1], f_t.shape[1]
    if s_h > t_h:
        f_s = adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def _gathered_rows(x: jax.Array, axis_name: Optional[str]) -> tuple[jax.Array, jax.Array]:
    """(global batch, global index of this shard's first row): the rows this device anchors are x itself."""
    return _parallel.gather(x, axis_name), _parallel.axis_index(axis_name) * x.shape[0]


def _diag_mask(b_local: int, b_global: int, offset: jax.Array) -> jax.Array:
    """[b_local, b_global] True where column j is the global index of local row i."""
    return jnp.arange(b_global)[None, :] == (offset + jnp.arange(b_local))[:, None]


def _smooth_l1(x: jax.Array) -> jax.Array:
    """Elementwise `F.smooth_l1_loss` with beta = 1: 0.5 x² if |x| < 1 else |x| - 0.5."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def attention_map(f: jax.Array, p: float = 2) -> jax.Array:
    """AT's attention vector: F.normalize(mean_c(f^p) flattened over (H, W)), eps 1e-12. Returns [B, H*W]."""
    f = _f32(f)
    a = jnp.mean(f ** p, axis=-1).reshape(f.shape[0], -1)
    return _normalize(a, axis=-1)


__all__ = ["adaptive_avg_pool2d", "attention_map", "match_spatial"]
