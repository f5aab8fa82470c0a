"""RepDistiller's feature-based baselines and DKD against numpy restatements of the reference (PyTorch) code.

The references below work in NCHW float64, transposing the NHWC inputs, and follow the reference code line by line
(RepDistiller distiller_zoo/*.py, mdistiller distillers/DKD.py), including F.adaptive_avg_pool2d's window rule.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax.losses import (ab_loss, at_loss, cc_loss, dkd_loss, dkd_warmup, fitnet_loss, fsp_loss, ft_loss,
                              nst_loss, pkt_loss, rkd_loss, sp_loss, vid_loss)
from wcord_jax.losses._common import adaptive_avg_pool2d, match_spatial
from wcord_jax.losses.fsp import check_fsp_shapes

AX = "data"
N_DEV = 4
RTOL, ATOL = 2e-5, 1e-7


# --------------------------------------------------------------------------------------------------------------------
# numpy restatements (NCHW, float64)


def nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def np_adaptive_pool(x, oh, ow):
    """F.adaptive_avg_pool2d on NCHW: window [floor(i*H/oh), ceil((i+1)*H/oh))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        h0, h1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            w0, w1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def np_pool_pair(a, b):
    a_h, b_h = a.shape[2], b.shape[2]
    if a_h > b_h:
        a = np_adaptive_pool(a, b_h, b_h)
    elif a_h < b_h:
        b = np_adaptive_pool(b, a_h, a_h)
    return a, b


def np_normalize(x, axis):
    return x / np.maximum(np.sqrt((x ** 2).sum(axis=axis, keepdims=True)), 1e-12)


def np_at(g_s, g_t, p=2):
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = np_pool_pair(nchw(f_s), nchw(f_t))
        at = lambda f: np_normalize((f ** p).mean(1).reshape(f.shape[0], -1), 1)  # noqa: E731
        total += ((at(f_s) - at(f_t)) ** 2).mean()
    return total


def np_sp(f_s, f_t):
    f_s, f_t = nchw(f_s), nchw(f_t)
    bsz = f_s.shape[0]
    f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    g_s = np_normalize(f_s @ f_s.T, 1)
    g_t = np_normalize(f_t @ f_t.T, 1)
    return ((g_t - g_s) ** 2).sum() / (bsz * bsz)


def np_cc(f_s, f_t):
    delta = np.abs(np.asarray(f_s, np.float64) - np.asarray(f_t, np.float64))
    return np.mean((delta[:-1] * delta[1:]).sum(1))


def np_vid(mu, var, t):
    mu, t = nchw(mu), nchw(t)
    if t.shape[2] > mu.shape[2]:
        t = np_adaptive_pool(t, mu.shape[2], mu.shape[2])
    var = np.asarray(var, np.float64).reshape(1, -1, 1, 1)
    return np.mean(0.5 * ((mu - t) ** 2 / var + np.log(var)))


def np_pdist(e, eps=1e-12):
    e_square = (e ** 2).sum(1)
    res = np.maximum(e_square[:, None] + e_square[None, :] - 2 * e @ e.T, eps)
    res = np.sqrt(res)
    res[range(len(e)), range(len(e))] = 0
    return res


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def np_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    student = np.asarray(f_s, np.float64).reshape(len(f_s), -1)
    teacher = np.asarray(f_t, np.float64).reshape(len(f_t), -1)
    t_d = np_pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = np_pdist(student)
    d = d / d[d > 0].mean()
    loss_d = np_smooth_l1(d, t_d)
    td = teacher[None, :, :] - teacher[:, None, :]
    norm_td = np_normalize(td, 2)
    t_angle = np.einsum("ijd,ikd->ijk", norm_td, norm_td).reshape(-1)
    sd = student[None, :, :] - student[:, None, :]
    norm_sd = np_normalize(sd, 2)
    s_angle = np.einsum("ijd,ikd->ijk", norm_sd, norm_sd).reshape(-1)
    loss_a = np_smooth_l1(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def np_pkt(output_net, target_net, eps=1e-7):
    output_net = np.asarray(output_net, np.float64)
    target_net = np.asarray(target_net, np.float64)
    output_net = output_net / (np.sqrt((output_net ** 2).sum(1, keepdims=True)) + eps)
    target_net = target_net / (np.sqrt((target_net ** 2).sum(1, keepdims=True)) + eps)
    model_similarity = (output_net @ output_net.T + 1.0) / 2.0
    target_similarity = (target_net @ target_net.T + 1.0) / 2.0
    model_similarity = model_similarity / model_similarity.sum(1, keepdims=True)
    target_similarity = target_similarity / target_similarity.sum(1, keepdims=True)
    return np.mean(target_similarity * np.log((target_similarity + eps) / (model_similarity + eps)))


def np_ab(g_s, g_t, margin=1.0):
    n = len(g_s)
    w = [2 ** (i - n + 1) for i in range(n)]
    bsz = g_s[0].shape[0]
    total = 0.0
    for wi, s, t in zip(w, g_s, g_t):
        s, t = nchw(s), nchw(t)
        loss = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0)))
        total += wi * np.abs(loss).sum() / bsz / 1000 * 3
    return total


def np_ft(f_s, f_t, p1=2, p2=1):
    f_s, f_t = np_pool_pair(nchw(f_s), nchw(f_t))
    factor = lambda f: np_normalize((f ** p1).mean(1).reshape(f.shape[0], -1), 1)  # noqa: E731
    d = factor(f_s) - factor(f_t)
    return np.abs(d).mean() if p2 == 1 else (d ** p2).mean()


def np_fsp(g_s, g_t):
    def compute_fsp(g):
        out = []
        for i in range(len(g) - 1):
            bot, top = np_pool_pair(nchw(g[i]), nchw(g[i + 1]))
            bot = bot[:, None]  # [B, 1, Cb, H, W]
            top = top[:, :, None]  # [B, Ct, 1, H, W]
            bot = bot.reshape(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.reshape(top.shape[0], top.shape[1], top.shape[2], -1)
            out.append((bot * top).mean(-1))
        return out
    return sum(((s - t) ** 2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


def np_nst(g_s, g_t):
    def poly_kernel(a, b):
        return ((a[:, None] * b[:, :, None]).sum(-1)) ** 2

    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = np_pool_pair(nchw(f_s), nchw(f_t))
        f_s = np_normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), 2)
        f_t = np_normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), 2)
        total += poly_kernel(f_t, f_t).mean() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()
    return total


def np_softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_kl_div_sum(log_input, target):
    """F.kl_div(input, target, size_average=False): sum target * (log target - input), 0 where target == 0."""
    safe = np.where(target > 0, target, 1.0)
    return np.sum(np.where(target > 0, target * (np.log(safe) - log_input), 0.0))


def np_dkd(s, t, target, alpha, beta, temp):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    gt = np.zeros_like(s)
    gt[np.arange(len(target)), target] = 1
    other = 1 - gt
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    cat = lambda p: np.stack([(p * gt).sum(1), (p * other).sum(1)], 1)  # noqa: E731
    ps, pt = cat(ps), cat(pt)
    tckd = np_kl_div_sum(np.log(ps), pt) * temp ** 2 / len(target)
    pt2 = np_softmax(t / temp - 1000.0 * gt)
    z = s / temp - 1000.0 * gt
    log_ps2 = z - z.max(1, keepdims=True)
    log_ps2 = log_ps2 - np.log(np.exp(log_ps2).sum(1, keepdims=True))
    nckd = np_kl_div_sum(log_ps2, pt2) * temp ** 2 / len(target)
    return alpha * tckd + beta * nckd


# --------------------------------------------------------------------------------------------------------------------
# helpers


def rand(shape, seed, scale=1.0, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale + shift, jnp.float32)


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(float(got), float(want), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------------
# pooling


@pytest.mark.parametrize("hw,out", [((8, 8), (4, 4)), ((8, 8), (2, 2)), ((6, 6), (4, 4)), ((7, 5), (3, 2)),
                                    ((4, 4), (6, 6)), ((5, 5), (5, 5))])
def test_adaptive_avg_pool2d_matches_pytorch_rule(hw, out):
    x = rand((2,) + hw + (3,), 0)
    got = adaptive_avg_pool2d(x, out)
    want = np.transpose(np_adaptive_pool(nchw(x), *out), (0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_match_spatial_pools_the_taller_map_to_a_square():
    a, b = rand((2, 8, 8, 3), 0), rand((2, 4, 4, 5), 1)
    a2, b2 = match_spatial(a, b)
    assert a2.shape == (2, 4, 4, 3) and b2 is b
    b3, a3 = match_spatial(b, a)
    assert a3.shape == (2, 4, 4, 3) and b3 is b


# --------------------------------------------------------------------------------------------------------------------
# each loss against its reference

# student / teacher map lists with equal sizes, a student twice as large, a teacher twice as large, and a
# non-integer ratio (6 -> 4: overlapping adaptive windows)
S_MAPS = [rand((3, 4, 4, 5), 10, shift=0.3), rand((3, 8, 8, 3), 11), rand((3, 4, 4, 6), 12), rand((3, 6, 6, 4), 13)]
T_MAPS = [rand((3, 4, 4, 7), 20, shift=0.3), rand((3, 4, 4, 6), 21), rand((3, 8, 8, 2), 22), rand((3, 4, 4, 4), 23)]


def test_fitnet():
    s, t = rand((3, 4, 4, 5), 0), rand((3, 4, 4, 5), 1)
    close(jax.jit(fitnet_loss)(s, t), np.mean((nchw(s) - nchw(t)) ** 2))
    with pytest.raises(ValueError, match="differ"):
        fitnet_loss(s, t[:, :2])


@pytest.mark.parametrize("p", [2, 4])
def test_at(p):
    close(jax.jit(at_loss, static_argnums=2)(S_MAPS, T_MAPS, p), np_at(S_MAPS, T_MAPS, p))


def test_at_zero_map_has_finite_gradient():
    # an all-zero map normalises to 0 (eps 1e-12); its gradient is finite
    z = jnp.zeros((3, 4, 4, 5))
    loss, g = jax.jit(jax.value_and_grad(lambda x: at_loss([x], [T_MAPS[0]])))(z)
    assert np.all(np.isfinite(np.asarray(g)))
    close(loss, np_at([z], [T_MAPS[0]]))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_sp(i):
    close(jax.jit(sp_loss)(S_MAPS[i], T_MAPS[i]), np_sp(S_MAPS[i], T_MAPS[i]))


def test_cc():
    s, t = rand((5, 16), 0), rand((5, 16), 1)
    close(jax.jit(cc_loss)(s, t), np_cc(s, t))


def test_vid():
    mus = [rand((3, 4, 4, 7), 0), rand((3, 4, 4, 6), 1)]
    vs = [jnp.asarray(np.random.default_rng(2).uniform(0.5, 5.0, size=7), jnp.float32),
          jnp.asarray(np.random.default_rng(3).uniform(0.5, 5.0, size=6), jnp.float32)]
    ts = [T_MAPS[0], rand((3, 8, 8, 6), 4)]  # second teacher map taller: pooled to 4x4
    want = sum(np_vid(m, v, t) for m, v, t in zip(mus, vs, ts))
    close(jax.jit(vid_loss)(mus, vs, ts), want)
    with pytest.raises(ValueError, match="pool the student map"):
        vid_loss([ts[1]], [vs[1]], [mus[1]])


@pytest.mark.parametrize("shape", [(6, 10), (5, 2, 2, 3)])
def test_rkd(shape):
    s, t = rand(shape, 0), rand(shape, 1, scale=2.0)
    got = jax.jit(lambda a, b: (rkd_loss(a, b), rkd_loss(a, b, 1.0, 0.0), rkd_loss(a, b, 0.0, 1.0)))(s, t)
    for g, (w_d, w_a) in zip(got, [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)]):
        close(g, np_rkd(s, t, w_d, w_a), rtol=1e-4)


def test_rkd_gradient_finite_and_teacher_detached():
    s, t = rand((5, 8), 0), rand((5, 8), 1)
    gs, gt = jax.jit(jax.grad(rkd_loss, argnums=(0, 1)))(s, t)
    assert np.all(np.isfinite(np.asarray(gs))) and np.any(np.asarray(gs) != 0)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_pkt():
    s, t = rand((6, 12), 0, shift=0.2), rand((6, 9), 1)
    close(jax.jit(pkt_loss)(s, t), np_pkt(s, t), rtol=1e-4, atol=1e-9)


def test_ab():
    s_list = [rand((3, 8, 8, 4), 0), rand((3, 4, 4, 6), 1), rand((3, 2, 2, 8), 2)]
    t_list = [rand((3, 8, 8, 4), 3), rand((3, 4, 4, 6), 4), rand((3, 2, 2, 8), 5)]

    @jax.jit
    def losses(sl, tl):
        return (ab_loss(sl, tl), ab_loss(sl, tl, margin=0.5),
                ab_loss(sl[2:], tl[2:]),  # one layer: weight 2^0 = 1
                ab_loss(sl + [sl[0]], tl + [tl[0]]))  # four layers: weights 1/8, 1/4, 1/2, 1

    got = losses(s_list, t_list)
    want = (np_ab(s_list, t_list), np_ab(s_list, t_list, margin=0.5), np_ab(s_list[2:], t_list[2:]),
            np_ab(s_list + [s_list[0]], t_list + [t_list[0]]))
    for g, w in zip(got, want):
        close(g, w)
    with pytest.raises(ValueError, match="Connector"):
        ab_loss(s_list[:1], t_list[1:2])


@pytest.mark.parametrize("i,p2", [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2)])
def test_ft(i, p2):
    got = jax.jit(ft_loss, static_argnames="p2")(S_MAPS[i], T_MAPS[i], p2=p2)
    close(got, np_ft(S_MAPS[i], T_MAPS[i], p2=p2))


def test_fsp():
    # consecutive maps of sizes 8, 8, 4 and 6 -> pooled pairwise inside each network; teacher sizes differ
    s_list = [rand((3, 8, 8, 3), 0), rand((3, 8, 8, 4), 1), rand((3, 4, 4, 5), 2), rand((3, 6, 6, 2), 3)]
    t_list = [rand((3, 4, 4, 3), 4), rand((3, 8, 8, 4), 5), rand((3, 4, 4, 5), 6), rand((3, 4, 4, 2), 7)]
    close(jax.jit(fsp_loss)(s_list, t_list), np_fsp(s_list, t_list))


def test_fsp_channel_mismatch_raises():
    s_list = [rand((2, 8, 8, 16), 0), rand((2, 4, 4, 32), 1)]
    t_list = [rand((2, 8, 8, 16), 2), rand((2, 4, 4, 64), 3)]
    with pytest.raises(ValueError, match=r"feature 1: student 32 vs teacher 64"):
        fsp_loss(s_list, t_list)
    with pytest.raises(ValueError, match="2 student maps but 1 teacher"):
        check_fsp_shapes([(2, 8, 8, 16)] * 2, [(2, 8, 8, 16)])


def test_nst():
    close(jax.jit(nst_loss)(S_MAPS, T_MAPS), np_nst(S_MAPS, T_MAPS), rtol=1e-4, atol=1e-6)


def test_nst_teacher_kernel_detached():
    s, t = S_MAPS[0], T_MAPS[0]
    g_t = jax.jit(jax.grad(lambda t_: nst_loss([s], [t_])))(t)
    # the teacher still gets gradient from the cross term, but not from k(t, t): compare with the cross term alone
    def cross(t_):
        u_s = s.reshape(3, -1, 5) / jnp.linalg.norm(s.reshape(3, -1, 5), axis=1, keepdims=True)
        u_t = t_.reshape(3, -1, 7) / jnp.linalg.norm(t_.reshape(3, -1, 7), axis=1, keepdims=True)
        return -2 * jnp.mean(jnp.einsum("bxi,bxj->bij", u_s, u_t) ** 2)
    np.testing.assert_allclose(np.asarray(g_t), np.asarray(jax.jit(jax.grad(cross))(t)), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd(alpha, beta, temp):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 10)).astype(np.float32) * 3
    t = rng.normal(size=(6, 10)).astype(np.float32) * 3
    y = rng.integers(0, 10, size=6)
    got = jax.jit(dkd_loss, static_argnums=(3, 4, 5))(s, t, y, alpha, beta, temp)
    close(got, np_dkd(s, t, y, alpha, beta, temp), rtol=1e-5, atol=1e-6)


def test_dkd_parts_and_warmup():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(4, 5)).astype(np.float32)
    t = rng.normal(size=(4, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=4)

    @jax.jit
    def parts(s_, t_):
        return (dkd_loss(s_, s_, y), dkd_loss(s_, t_, y, alpha=1.0, beta=0.0), dkd_loss(s_, t_, y, alpha=0.0, beta=1.0),
                dkd_loss(s_, t_, y, alpha=2.0, beta=3.0))

    same, tckd, nckd, mixed = parts(s, t)
    close(same, 0.0, atol=2e-5)  # float32 rounding, amplified by beta * T^2 = 128
    close(mixed, 2 * tckd + 3 * nckd, rtol=1e-5)
    assert dkd_warmup(1) == 1 / 20 and dkd_warmup(10, 20) == 0.5 and dkd_warmup(20) == 1.0 and dkd_warmup(35) == 1.0
    close(jax.jit(dkd_warmup)(jnp.float32(5.0)), 0.25)


# --------------------------------------------------------------------------------------------------------------------
# 4-device shard_map: the axis_name version equals the one-device loss on the global batch


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (tests/conftest.py asks JAX for virtual CPU devices)")
    return jax.make_mesh((N_DEV,), (AX,), axis_types=(jax.sharding.AxisType.Auto,))


B8 = 8
SHARD_CASES = {
    "fitnet": (fitnet_loss, lambda: (rand((B8, 4, 4, 3), 0), rand((B8, 4, 4, 3), 1))),
    "at": (at_loss, lambda: ([rand((B8, 8, 8, 3), 0), rand((B8, 4, 4, 5), 1)],
                             [rand((B8, 4, 4, 6), 2), rand((B8, 4, 4, 2), 3)])),
    "sp": (sp_loss, lambda: (rand((B8, 4, 4, 3), 0), rand((B8, 2, 2, 6), 1))),
    "cc": (cc_loss, lambda: (rand((B8, 6), 0), rand((B8, 6), 1))),
    "vid": (lambda m, t, ax=None: vid_loss(m, [jnp.full((3,), 2.0)], t, axis_name=ax),
            lambda: ([rand((B8, 2, 2, 3), 0)], [rand((B8, 4, 4, 3), 1)])),
    "rkd": (rkd_loss, lambda: (rand((B8, 6), 0), rand((B8, 6), 1, scale=3.0))),
    "pkt": (pkt_loss, lambda: (rand((B8, 6), 0), rand((B8, 5), 1))),
    "ab": (ab_loss, lambda: ([rand((B8, 4, 4, 3), 0), rand((B8, 2, 2, 3), 1)],
                             [rand((B8, 4, 4, 3), 2), rand((B8, 2, 2, 3), 3)])),
    "ft": (ft_loss, lambda: (rand((B8, 4, 4, 3), 0), rand((B8, 2, 2, 5), 1))),
    "fsp": (fsp_loss, lambda: ([rand((B8, 4, 4, 3), 0), rand((B8, 2, 2, 2), 1)],
                               [rand((B8, 2, 2, 3), 2), rand((B8, 2, 2, 2), 3)])),
    "nst": (nst_loss, lambda: ([rand((B8, 4, 4, 3), 0)], [rand((B8, 2, 2, 5), 1)])),
    "dkd": (dkd_loss, lambda: (rand((B8, 7), 0, scale=2.0), rand((B8, 7), 1, scale=2.0),
                               jnp.asarray(np.arange(B8) % 7, jnp.int32))),
}


def _call(fn, args, axis_name):
    if fn is dkd_loss:
        return fn(*args, axis_name=axis_name)
    if fn.__name__ == "<lambda>":
        return fn(*args, ax=axis_name)
    return fn(*args, axis_name=axis_name)


@pytest.mark.parametrize("name", sorted(SHARD_CASES))
def test_sharded_equals_single_device(mesh, name):
    fn, make = SHARD_CASES[name]
    args = make()
    want = jax.jit(lambda *a: _call(fn, a, None))(*args)
    f = jax.jit(jax.shard_map(lambda *a: _call(fn, a, AX), mesh=mesh, in_specs=P(AX), out_specs=P()))
    close(f(*args), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["at", "sp", "rkd", "cc"])
def test_sharded_gradients_equal_single_device(mesh, name):
    """d loss / d student inputs inside shard_map (each device: its block) equals the one-device gradient."""
    fn, make = SHARD_CASES[name]
    s, t = make()
    want = jax.jit(jax.grad(lambda s_: _call(fn, (s_, t), None)))(s)

    def per_device(s_, t_):
        return jax.grad(lambda x: _call(fn, (x, t_), AX))(s_)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(AX), out_specs=P(AX)))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7),
                 f(s, t), want)
