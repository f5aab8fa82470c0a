"""RepDistiller's feature-based baselines and Decoupled KD, as pure loss functions.

One function per distiller of RepDistiller's `distiller_zoo/` (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST),
plus DKD as in mdistiller (`mdistiller/distillers/DKD.py`). Each reproduces the reference computation, its
normalisation epsilons and pooling rules included. The trainable pieces some of them need (ConvReg, Connector,
Paraphraser, Translator, the VID regressor, LinearEmbed) are flax modules in `wcord_jax.distill_modules`.

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
from jax import lax
from jax.scipy.special import xlogy

from wcord_jax.losses import _parallel

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize default
PKT_EPS = 1e-7  # RepDistiller PKT.cosine_similarity_loss
RKD_EPS = 1e-12  # RepDistiller RKDLoss.pdist clamp


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers


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


# --------------------------------------------------------------------------------------------------------------------
# FitNet


def fitnet_loss(s: jax.Array, t: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""FitNet hint loss (RepDistiller `HintLoss`): mean squared error.

    .. math:: \mathcal{L} = \frac{1}{BHWC} \sum (s - t)^2

    `s` must already be the regressor output (`distill_modules.ConvReg` applied to the student's
    `features[hint_layer]`, hint_layer = 2 by default), of the teacher map's shape. RepDistiller trains the regressor
    jointly with the student in a single stage (loss weight 100, no CE-free hint-pretraining stage), which differs
    from the two-stage training of the FitNets paper.

    Args:
      s: [B, H, W, C] regressed student map. t: [B, H, W, C] teacher map.
      axis_name: batch mesh axis inside `jax.shard_map` (per-example mean: pmean), or None.
    """
    if s.shape != t.shape:
        raise ValueError(f"fitnet_loss: regressed student map {s.shape} and teacher map {t.shape} differ")
    d = _f32(s) - _f32(t)
    return _parallel.pmean(jnp.mean(d * d), axis_name)


# --------------------------------------------------------------------------------------------------------------------
# AT


def attention_map(f: jax.Array, p: float = 2) -> jax.Array:
    """AT's attention vector: F.normalize(mean_c(f^p) flattened over (H, W)), eps 1e-12. Returns [B, H*W]."""
    f = _f32(f)
    a = jnp.mean(f ** p, axis=-1).reshape(f.shape[0], -1)
    return _normalize(a, axis=-1)


def at_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], p: float = 2,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Attention transfer (RepDistiller `Attention`), summed over layers.

    For each pair of maps, after `match_spatial` (the taller map adaptive-avg-pooled to the smaller height):

    .. math::
        a(f) = \frac{v}{\max(\lVert v\rVert_2, 10^{-12})},\quad v_{hw} = \frac1C \sum_c f_{hwc}^p, \qquad
        \mathcal{L} = \sum_l \frac{1}{B\,H_lW_l} \sum_{b,hw} \big(a(f^s_l)_{b,hw} - a(f^t_l)_{b,hw}\big)^2

    p = 2. RepDistiller applies it to `features[1:-1]` with weight 1000.

    Args:
      s_list, t_list: equally long sequences of [B, H, W, C] maps (channel counts may differ).
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    _check_same_length("at_loss", s_list, t_list)
    total = jnp.zeros((), jnp.float32)
    for f_s, f_t in zip(s_list, t_list):
        f_s, f_t = match_spatial(_f32(f_s), _f32(f_t))
        d = attention_map(f_s, p) - attention_map(f_t, p)
        total = total + jnp.mean(d * d)
    return _parallel.pmean(total, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# SP


def sp_loss(s: jax.Array, t: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""Similarity-preserving KD (RepDistiller `Similarity`) on one pair of maps.

    For student and teacher maps s, t ([B, H, W, C]), with Q = a map flattened to [B, HWC] (the flattening order
    does not matter for Q Qᵀ):

    .. math::
        G = \mathrm{rownorm}(Q Q^\top), \qquad
        \mathcal{L} = \frac{1}{B^2} \lVert G^t - G^s \rVert_F^2

    where rownorm divides each row by max(||row||_2, 1e-12) (`F.normalize`, dim 1). Spatial sizes and channel
    counts of the two maps may differ. RepDistiller applies it to `[features[-2]]` with weight 3000.

    Batch-coupled: with `axis_name`, the maps are gathered over the axis; each device builds the rows of G anchored
    at its own examples ([b, B] blocks, each row normalised on its own) and the row sums of squares are psum'd.
    """
    b = s.shape[0]
    q_s = _f32(s).reshape(b, -1)
    q_t = _f32(t).reshape(b, -1)
    all_s = _parallel.gather(q_s, axis_name)
    all_t = _parallel.gather(q_t, axis_name)
    g_s = _normalize(q_s @ all_s.T, axis=1)
    g_t = _normalize(q_t @ all_t.T, axis=1)
    d = g_t - g_s
    b_global = all_s.shape[0]
    return _parallel.psum(jnp.sum(d * d), axis_name) / (b_global * b_global)


# --------------------------------------------------------------------------------------------------------------------
# CC


def cc_loss(s_emb: jax.Array, t_emb: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
    r"""Correlation congruence as RepDistiller implements it (`Correlation`, "code emailed by the author").

    With δ_i = |s_emb_i - t_emb_i| (elementwise, [B, D]) for the embeddings of consecutive batch rows:

    .. math:: \mathcal{L} = \frac{1}{B-1} \sum_{i=1}^{B-1} \sum_d \delta_{i,d}\, \delta_{i+1,d}

    This consecutive-sample form is not the paper's Gaussian-RBF/Taylor correlation matrix loss. The embeddings are
    `LinearEmbed(dim -> 128)` outputs (no normalisation) of `features[-1]` for both nets (both embeddings trainable);
    weight 0.02. The value depends on the order of the batch.

    Batch-coupled: with `axis_name`, δ is gathered (in global batch order, so pairs straddling two shards are
    included) and the whole loss is evaluated on every device.
    """
    delta = jnp.abs(_f32(s_emb) - _f32(t_emb)).reshape(s_emb.shape[0], -1)
    delta = _parallel.gather(delta, axis_name)
    return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


# --------------------------------------------------------------------------------------------------------------------
# VID


def vid_loss(mu_list: Sequence[jax.Array], var_list: Sequence[jax.Array], t_list: Sequence[jax.Array],
             axis_name: Optional[str] = None) -> jax.Array:
    r"""Variational information distillation (RepDistiller `VIDLoss`), summed over layers.

    For each layer, μ = the student regressor's prediction and σ² the per-channel variance
    (`distill_modules.VIDRegressor`: σ² = softplus(log_scale) + 1e-5, initialised to 5):

    .. math::
        \mathcal{L} = \sum_l \frac{1}{BHWC} \sum_{b,h,w,c}
            \frac12\Big(\frac{(\mu_{bhwc} - t_{bhwc})^2}{\sigma^2_c} + \log \sigma^2_c\Big)

    Pooling as RepDistiller: a student map taller than the teacher's is pooled *before* the regressor (pass
    `target_size=t.shape[1]` to `VIDRegressor`); a teacher map taller than μ is pooled here to μ's height.
    RepDistiller applies it to `features[1:-1]` with weight 1.

    Args:
      mu_list: [B, h, w, C_t] regressor outputs. var_list: [C_t] variances. t_list: [B, H, W, C_t] teacher maps,
        H >= h.
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    _check_same_length("vid_loss", mu_list, t_list)
    _check_same_length("vid_loss", mu_list, var_list)
    total = jnp.zeros((), jnp.float32)
    for mu, var, t in zip(mu_list, var_list, t_list):
        if mu.shape[1] > t.shape[1]:
            raise ValueError(f"vid_loss: prediction height {mu.shape[1]} exceeds the teacher's {t.shape[1]}; pool the "
                             "student map before the regressor (VIDRegressor(..., target_size=...))")
        mu, t = match_spatial(_f32(mu), _f32(t))
        var = _f32(var)
        nll = 0.5 * ((mu - t) ** 2 / var + jnp.log(var))
        total = total + jnp.mean(nll)
    return _parallel.pmean(total, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# RKD


def _pdist_rows(rows: jax.Array, all_rows: jax.Array, diag: jax.Array) -> jax.Array:
    """RepDistiller `RKDLoss.pdist(squared=False)` restricted to some rows.

    sqrt(clamp(|x_i|² + |x_j|² - 2 x_i.x_j, min=1e-12)), and 0 where `diag` (i == j).
    """
    sq_rows = jnp.sum(rows * rows, axis=1)
    sq_all = jnp.sum(all_rows * all_rows, axis=1)
    d2 = sq_rows[:, None] + sq_all[None, :] - 2.0 * (rows @ all_rows.T)
    d = jnp.sqrt(jnp.maximum(d2, RKD_EPS))
    return jnp.where(diag, 0.0, d)


def _rkd_angles(rows: jax.Array, all_rows: jax.Array) -> jax.Array:
    """[b, B, B] cosines of the angle at x_i between x_j and x_k: <n(x_j - x_i), n(x_k - x_i)>, n = F.normalize."""
    diff = _normalize(all_rows[None, :, :] - rows[:, None, :], axis=2)
    return jnp.einsum("ijd,ikd->ijk", diff, diff)


def rkd_loss(s: jax.Array, t: jax.Array, distance_weight: float = 25.0, angle_weight: float = 50.0,
             axis_name: Optional[str] = None) -> jax.Array:
    r"""Relational KD (RepDistiller `RKDLoss`): distance-wise plus angle-wise smooth-L1.

    On the flattened vectors x_i (B x D) of the student (s) and of the teacher (t):

    .. math::
        d_{ij} = \begin{cases} 0 & i = j \\ \sqrt{\max(\lVert x_i\rVert^2 + \lVert x_j\rVert^2 - 2 x_i\cdot x_j,\,
                 10^{-12})} & i \ne j \end{cases}, \qquad
        \hat d_{ij} = d_{ij} / \mathrm{mean}\{d_{kl} : d_{kl} > 0\}

    .. math::
        \angle_{ijk} = \langle n(x_j - x_i), n(x_k - x_i) \rangle,\quad n(v) = v / \max(\lVert v\rVert, 10^{-12})

    .. math::
        \mathcal{L} = w_d \frac{1}{B^2}\sum_{ij} \mathrm{sl1}(\hat d^s_{ij} - \hat d^t_{ij})
                    + w_a \frac{1}{B^3}\sum_{ijk} \mathrm{sl1}(\angle^s_{ijk} - \angle^t_{ijk})

    with sl1 the smooth-L1 (Huber, beta 1), w_d = 25, w_a = 50. The teacher distances and angles are computed under
    stop_gradient (RepDistiller: `no_grad`). RepDistiller applies it to `features[-1]` with weight 1.

    Batch-coupled: with `axis_name`, the batch is gathered; each device computes the distance rows and angle slabs
    anchored at its own examples ([b, B] and [b, B, B]; memory O(b·B·D) for the difference vectors), the means of
    the positive distances are psum'd sums over psum'd counts, and the smooth-L1 sums are psum'd.
    """
    b = s.shape[0]
    s = _f32(s).reshape(b, -1)
    t = lax.stop_gradient(_f32(t).reshape(b, -1))
    all_s, offset = _gathered_rows(s, axis_name)
    all_t = _parallel.gather(t, axis_name)
    b_global = all_s.shape[0]
    diag = _diag_mask(b, b_global, offset)

    def normalised_distances(rows, all_rows):
        d = _pdist_rows(rows, all_rows, diag)
        positive = d > 0
        total = _parallel.psum(jnp.sum(jnp.where(positive, d, 0.0)), axis_name)
        count = _parallel.psum(jnp.sum(positive.astype(jnp.float32)), axis_name)
        return d / (total / count)

    d_s = normalised_distances(s, all_s)
    d_t = lax.stop_gradient(normalised_distances(t, all_t))
    loss_d = _parallel.psum(jnp.sum(_smooth_l1(d_s - d_t)), axis_name) / (b_global * b_global)

    a_s = _rkd_angles(s, all_s)
    a_t = lax.stop_gradient(_rkd_angles(t, all_t))
    loss_a = _parallel.psum(jnp.sum(_smooth_l1(a_s - a_t)), axis_name) / (b_global ** 3)
    return distance_weight * loss_d + angle_weight * loss_a


# --------------------------------------------------------------------------------------------------------------------
# PKT


def pkt_loss(s: jax.Array, t: jax.Array, eps: float = PKT_EPS, axis_name: Optional[str] = None) -> jax.Array:
    r"""Probabilistic knowledge transfer (RepDistiller `PKT.cosine_similarity_loss`).

    With x̂_i = x_i / (||x_i||_2 + eps) (NaN entries set to 0), eps = 1e-7:

    .. math::
        c_{ij} = \frac{\hat x_i\cdot\hat x_j + 1}{2}, \qquad P_{ij} = \frac{c_{ij}}{\sum_k c_{ik}}, \qquad
        \mathcal{L} = \frac{1}{B^2} \sum_{ij} P^t_{ij} \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    for the student (s) and teacher (t) vectors (`features[-1]`, weight 30000 in RepDistiller). The norm's gradient
    at an all-zero vector is taken as 0 (PyTorch's sqrt would give NaN there).

    Batch-coupled: with `axis_name`, the normalised vectors are gathered; each device computes the rows of P
    anchored at its own examples and the row sums are psum'd.
    """
    b = s.shape[0]

    def unit(x):
        x = _f32(x).reshape(b, -1)
        x = x / (_safe_norm(x, axis=1) + eps)
        return jnp.where(jnp.isnan(x), 0.0, x)

    def probs(x):
        sim = (x @ _parallel.gather(x, axis_name).T + 1.0) / 2.0
        return sim / jnp.sum(sim, axis=1, keepdims=True)

    p_s = probs(unit(s))
    p_t = probs(unit(t))
    b_global = b * _parallel.axis_size(axis_name)
    kl = p_t * jnp.log((p_t + eps) / (p_s + eps))
    return _parallel.psum(jnp.sum(kl), axis_name) / (b_global * b_global)


# --------------------------------------------------------------------------------------------------------------------
# AB


def ab_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], margin: float = 1.0,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Activation-boundary loss (RepDistiller `ABLoss`), weighted sum over the n layers.

    For layer l = 0..n-1 (s: connector output, t: teacher pre-ReLU map, same shape), m = margin:

    .. math::
        \ell_l = \sum_{b,h,w,c} (s+m)^2\,[s > -m \wedge t \le 0] + (s-m)^2\,[s \le m \wedge t > 0], \qquad
        \mathcal{L} = \sum_l \Big(\frac{2^{\,l-n+1}\,\ell_l}{B}\Big) / 1000 \cdot 3

    So each layer's sum over all elements is weighted by 2^(l-n+1) (for n = 3: 1/4, 1/2, 1; for n = 4: 1/8 ... 1),
    divided by the batch size B, then by 1000 and multiplied by 3, in that order as in RepDistiller. RepDistiller uses
    it only in its 30-epoch init stage, on `features[1:-1]` computed with `preact=True`, the student maps passed
    through `distill_modules.Connector`; its main stage then uses no AB term.

    Args:
      s_list, t_list: equally long sequences of [B, H, W, C] maps, pairwise of equal shape.
      margin: m.
      axis_name: batch mesh axis (per-example sum over B: pmean of the local value), or None.
    """
    _check_same_length("ab_loss", s_list, t_list)
    n = len(s_list)
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if s.shape != t.shape:
            raise ValueError(f"ab_loss: layer {i}: student map {s.shape} and teacher map {t.shape} differ "
                             "(apply the Connector first)")
        s, t = _f32(s), _f32(t)
        below = ((s > -margin) & (t <= 0)).astype(jnp.float32)
        above = ((s <= margin) & (t > 0)).astype(jnp.float32)
        layer = jnp.sum(jnp.abs((s + margin) ** 2 * below + (s - margin) ** 2 * above))
        weight = 2.0 ** (i - n + 1)
        total = total + weight * layer / s.shape[0] / 1000.0 * 3.0
    return _parallel.pmean(total, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# FT


def ft_loss(factor_s: jax.Array, factor_t: jax.Array, p1: float = 2, p2: float = 1,
            axis_name: Optional[str] = None) -> jax.Array:
    r"""Factor transfer as RepDistiller implements it (`FactorTransfer`, p1 = 2, p2 = 1).

    After `match_spatial`, with φ the attention-style factor normalisation:

    .. math::
        \phi(F) = \mathrm{normalize}\Big(\mathrm{flatten}_{hw}\,\frac1C\sum_c F_{hwc}^{p_1}\Big),\qquad
        \mathcal{L} = \frac{1}{B\,HW}\sum |\phi(F_s) - \phi(F_t)|  \quad (p_2 = 1)

    (for p2 != 1, the mean of (φ_s - φ_t)^p2, without absolute value, as RepDistiller). normalize is `F.normalize`
    (eps 1e-12). This differs from the FT paper, whose factors are normalised as whole flattened (C·H·W) vectors
    and are not averaged over channels: RepDistiller reuses the AT map here. factor_s = `Translator(f_s)` and
    factor_t = the frozen `Paraphraser`'s encoder output on the teacher, both from `features[-2]`; weight 200.

    Args:
      factor_s, factor_t: [B, H, W, C] factors (channel counts may differ).
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    f_s, f_t = match_spatial(_f32(factor_s), _f32(factor_t))
    d = attention_map(f_s, p1) - attention_map(f_t, p1)
    loss = jnp.mean(jnp.abs(d)) if p2 == 1 else jnp.mean(d ** p2)
    return _parallel.pmean(loss, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# FSP


def check_fsp_shapes(s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
    """RepDistiller `FSP.__init__`'s check: equally many maps and equal channel counts (NHWC: last axis) at every level.

    Raises:
      ValueError naming the first mismatch.
    """
    if len(s_shapes) != len(t_shapes):
        raise ValueError(f"fsp: {len(s_shapes)} student maps but {len(t_shapes)} teacher maps")
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if s[-1] != t[-1]:
            raise ValueError(f"fsp: channel counts differ at feature {i}: student {s[-1]} vs teacher {t[-1]} "
                             f"(shapes {tuple(s)} vs {tuple(t)}); FSP needs equal channels at every level")


def fsp_matrices(maps: Sequence[jax.Array]) -> list[jax.Array]:
    r"""FSP (Gram) matrices of consecutive maps (RepDistiller `FSP.compute_fsp`).

    For each consecutive pair (bottom, top), after `match_spatial` (the taller one pooled to the smaller height):
    G_{b, j, i} = (1/HW) Σ_{hw} top_{b,hw,j} · bottom_{b,hw,i}, shape [B, C_top, C_bottom].
    """
    out = []
    for bot, top in zip(maps[:-1], maps[1:]):
        bot, top = match_spatial(_f32(bot), _f32(top))
        hw = bot.shape[1] * bot.shape[2]
        out.append(jnp.einsum("bhwj,bhwi->bji", top, bot) / hw)
    return out


def fsp_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], axis_name: Optional[str] = None) -> jax.Array:
    r"""Flow-of-solution-procedure loss (RepDistiller `FSP`), summed over consecutive pairs.

    .. math:: \mathcal{L} = \sum_{l} \frac{1}{B\,C_{l+1}C_l} \sum (G^s_l - G^t_l)^2

    with G_l the FSP matrix of maps l and l+1 (`fsp_matrices`). RepDistiller applies it to `features[:-1]` (stem
    included) in its 30-epoch init stage only (main stage: no FSP term). Channel counts must match level by level.

    Raises:
      ValueError if the lists differ in length or in a channel count (`check_fsp_shapes`).
    """
    check_fsp_shapes([f.shape for f in s_list], [f.shape for f in t_list])
    total = jnp.zeros((), jnp.float32)
    for g_s, g_t in zip(fsp_matrices(s_list), fsp_matrices(t_list)):
        d = g_s - g_t
        total = total + jnp.mean(d * d)
    return _parallel.pmean(total, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# NST


def nst_loss(s_list: Sequence[jax.Array], t_list: Sequence[jax.Array], axis_name: Optional[str] = None) -> jax.Array:
    r"""Neuron selectivity transfer with the degree-2 polynomial kernel (RepDistiller `NSTLoss`), summed over layers.

    After `match_spatial`, each channel's spatial map of each example is flattened to an HW-vector and L2-normalised
    (`F.normalize`, eps 1e-12): u^s_{b,i} (C_s of them), u^t_{b,j} (C_t). With k(x, y) = (x·y)²:

    .. math::
        \mathcal{L} = \sum_l \operatorname{mean}_{b,i,j} k(u^t_{bi}, u^t_{bj})
                    + \operatorname{mean}_{b,i,j} k(u^s_{bi}, u^s_{bj})
                    - 2 \operatorname{mean}_{b,i,j} k(u^s_{bi}, u^t_{bj})

    (a squared MMD between the two sets of channel vectors, per example, without the bias term), the teacher-teacher
    term under stop_gradient. The kernels only pair channels of the same example, so the loss is a per-example mean.
    RepDistiller applies it to `features[1:-1]` with weight 50.
    """
    _check_same_length("nst_loss", s_list, t_list)

    def poly(a, b):  # mean over (b, i, j) of (a_{b,:,i} . b_{b,:,j})^2
        return jnp.mean(jnp.einsum("bxi,bxj->bij", a, b) ** 2)

    total = jnp.zeros((), jnp.float32)
    for f_s, f_t in zip(s_list, t_list):
        f_s, f_t = match_spatial(_f32(f_s), _f32(f_t))
        u_s = _normalize(f_s.reshape(f_s.shape[0], -1, f_s.shape[-1]), axis=1)  # [B, HW, C], normalised over HW
        u_t = _normalize(f_t.reshape(f_t.shape[0], -1, f_t.shape[-1]), axis=1)
        total = total + lax.stop_gradient(poly(u_t, u_t)) + poly(u_s, u_s) - 2.0 * poly(u_s, u_t)
    return _parallel.pmean(total, axis_name)


# --------------------------------------------------------------------------------------------------------------------
# DKD


def dkd_loss(s_logits: jax.Array, t_logits: jax.Array, labels: jax.Array, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, axis_name: Optional[str] = None) -> jax.Array:
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), exactly mdistiller's `dkd_loss`.

    With p = softmax(z / T) for student (s) and teacher (t) logits z, y the label, g the one-hot mask of y:

    .. math::
        b = (p_y,\; 1 - p_y)\ \text{computed as}\ (\textstyle\sum_c p_c g_c,\ \sum_c p_c (1 - g_c)), \qquad
        \mathrm{TCKD} = \frac{T^2}{B} \sum_i \sum_{k} b^t_{ik} (\log b^t_{ik} - \log b^s_{ik})

    .. math::
        \hat p = \mathrm{softmax}(z / T - 1000\, g), \qquad
        \mathrm{NCKD} = \frac{T^2}{B} \sum_i \sum_c \hat p^t_{ic} (\log \hat p^t_{ic} - \log \hat p^s_{ic}), \qquad
        \mathcal{L} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

    The "-1000·g" trick removes the target class from the non-target distributions (its teacher probability
    underflows to 0 and contributes 0, as `F.kl_div` treats 0·log 0). log b^s is the log of the summed softmax
    probabilities, as mdistiller (not a log-sum-exp). Sums over classes, mean over the batch (mdistiller:
    `kl_div(size_average=False) * T² / B`). Defaults are mdistiller's CIFAR-100 values (α = 1, β = 8, T = 4). The
    warm-up factor multiplying the loss is `dkd_warmup`, applied by the caller.

    Args:
      s_logits, t_logits: [B, K] logits. labels: [B] int class labels.
      axis_name: batch mesh axis (per-example mean: pmean), or None.
    """
    t_ = jnp.asarray(temperature, jnp.float32)
    z_s = _f32(s_logits) / t_
    z_t = _f32(t_logits) / t_
    gt = jax.nn.one_hot(labels, z_s.shape[-1], dtype=jnp.float32)
    p_s = jax.nn.softmax(z_s, axis=-1)
    p_t = jax.nn.softmax(z_t, axis=-1)
    b_s = jnp.stack([jnp.sum(p_s * gt, axis=-1), jnp.sum(p_s * (1.0 - gt), axis=-1)], axis=-1)
    b_t = jnp.stack([jnp.sum(p_t * gt, axis=-1), jnp.sum(p_t * (1.0 - gt), axis=-1)], axis=-1)
    tckd = jnp.sum(xlogy(b_t, b_t) - b_t * jnp.log(b_s), axis=-1)
    log_q_s = jax.nn.log_softmax(z_s - 1000.0 * gt, axis=-1)
    q_t = jax.nn.softmax(z_t - 1000.0 * gt, axis=-1)
    nckd = jnp.sum(xlogy(q_t, q_t) - q_t * log_q_s, axis=-1)
    local = alpha * jnp.mean(tckd) + beta * jnp.mean(nckd)
    return _parallel.pmean(local, axis_name) * t_ * t_


def dkd_warmup(epoch, warmup_epochs: float = 20):
    """mdistiller's DKD warm-up factor min(epoch / warmup_epochs, 1).

    mdistiller evaluates it with the 1-based integer epoch, constant within an epoch (1/20 in the first epoch, 1 from
    epoch 20 on); a fractional epoch gives a per-step ramp instead. Works on Python numbers and on traced arrays.
    """
    if isinstance(epoch, (int, float)):
        return min(epoch / warmup_epochs, 1.0)
    return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


__all__ = [
    "ab_loss", "adaptive_avg_pool2d", "at_loss", "attention_map", "cc_loss", "check_fsp_shapes", "dkd_loss",
    "dkd_warmup", "fitnet_loss", "fsp_loss", "fsp_matrices", "ft_loss", "match_spatial", "nst_loss", "pkt_loss",
    "rkd_loss", "sp_loss", "vid_loss",
]
