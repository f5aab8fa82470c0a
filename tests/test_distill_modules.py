"""The distillers' trainable modules: RepDistiller's shape rules, PyTorch parameter counts and init, sync BN."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax.distill_modules import (Connector, ConvReg, ConvTranspose2d, LinearEmbed, Paraphraser, Translator,
                                       VIDRegressor)
from wcord_jax.losses import vid_loss

AX = "data"
N_DEV = 4
KEY = jax.random.key(0)


def n_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def np_conv_transpose(x, weight, bias, stride, padding):
    """PyTorch ConvTranspose2d by its definition: input pixel i adds x[i] * W[:, :, k] at output i*stride - padding + k.

    x: NHWC, weight: PyTorch layout [Cin, Cout, k, k].
    """
    n, h, w, _ = x.shape
    k = weight.shape[2]
    full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, weight.shape[1]))
    for iy in range(h):
        for ix in range(w):
            full[:, iy * stride:iy * stride + k, ix * stride:ix * stride + k, :] += np.einsum(
                "nc,cokl->nklo", x[:, iy, ix, :], weight)
    h_out, w_out = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
    return full[:, padding:padding + h_out, padding:padding + w_out, :] + bias


# --------------------------------------------------------------------------------------------------------------------
# ConvTranspose2d


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (3, 1, 1), (3, 2, 0)])
def test_conv_transpose_matches_pytorch_definition(k, s, p):
    x = rand((2, 3, 4, 5))
    m = ConvTranspose2d(6, k, stride=s, padding=p)
    v = jax.jit(m.init)(KEY, x)
    y = jax.jit(m.apply)(v, x)
    weight = np.transpose(np.asarray(v["params"]["kernel"], np.float64), (2, 3, 0, 1))  # -> [Cin, Cout, k, k]
    want = np_conv_transpose(np.asarray(x, np.float64), weight, np.asarray(v["params"]["bias"]), s, p)
    assert y.shape == want.shape == (2, (3 - 1) * s - 2 * p + k, (4 - 1) * s - 2 * p + k, 6)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_init_uses_pytorch_fan_in_of_out_channels():
    # PyTorch's fan_in of a ConvTranspose2d weight [Cin, Cout, k, k] is Cout*k*k: bound 1/sqrt(4*16) = 1/8,
    # whereas Cin*k*k would give 1/32.
    m = ConvTranspose2d(4, 4, stride=2, padding=1)
    v = m.init(KEY, jnp.zeros((1, 2, 2, 64)))
    w = np.abs(np.asarray(v["params"]["kernel"]))
    b = np.abs(np.asarray(v["params"]["bias"]))
    assert w.shape == (4, 4, 64, 4)
    assert 0.1 < w.max() <= 1 / 8 and b.max() <= 1 / 8


# --------------------------------------------------------------------------------------------------------------------
# ConvReg / Connector


@pytest.mark.parametrize("s_hw,t_hw,kernel_params", [
    (16, 8, 8 * 12 * 9),  # Conv3x3 stride 2
    (8, 16, 8 * 12 * 16),  # ConvTranspose4x4 stride 2
    (8, 8, 8 * 12),  # Conv1x1
    (10, 8, 8 * 12 * 9),  # Conv k = 1 + 10 - 8 = 3
])
def test_convreg_shape_rules_and_parameter_counts(s_hw, t_hw, kernel_params):
    s_shape, t_shape = (2, s_hw, s_hw, 8), (2, t_hw, t_hw, 12)
    x = rand(s_shape)
    m = ConvReg(s_shape, t_shape)
    v = jax.jit(m.init, static_argnums=2)(KEY, x, False)
    y, _ = jax.jit(lambda v_, x_: m.apply(v_, x_, True, mutable=["batch_stats"]))(v, x)
    assert y.shape == t_shape
    assert float(jnp.min(y)) >= 0.0  # ReLU
    assert n_params(v) == kernel_params + 12 + 2 * 12  # conv weight + conv bias + BN gamma/beta
    assert jax.tree.map(jnp.shape, v["batch_stats"]) == {"bn": {"mean": (12,), "var": (12,)}}


def test_convreg_rectangular_kernel():
    # s_H >= t_H, not twice: kernel (1 + s_H - t_H, 1 + s_W - t_W) = (3, 5)
    s_shape, t_shape = (2, 10, 12, 4), (2, 8, 8, 6)
    m = ConvReg(s_shape, t_shape)
    x = jnp.zeros(s_shape)
    v = jax.eval_shape(lambda k: m.init(k, x, False), KEY)
    assert v["params"]["conv"]["kernel"].shape == (3, 5, 4, 6)
    assert jax.eval_shape(lambda v_: m.apply(v_, x, False), v).shape == t_shape


def test_convreg_rejects_unsupported_sizes():
    with pytest.raises(ValueError, match="no rule"):
        ConvReg((2, 6, 6, 4), (2, 8, 8, 4)).init(KEY, jnp.zeros((2, 6, 6, 4)), False)
    with pytest.raises(ValueError, match="built for"):
        ConvReg((2, 8, 8, 4), (2, 8, 8, 4)).init(KEY, jnp.zeros((2, 8, 8, 3)), False)


def test_connector_identity_or_convreg_without_relu():
    s_shapes = [(2, 8, 8, 4), (2, 4, 4, 6), (2, 2, 2, 8)]
    t_shapes = [(2, 8, 8, 4), (2, 4, 4, 10), (2, 1, 1, 8)]
    g_s = [rand(s, i) for i, s in enumerate(s_shapes)]
    m = Connector(s_shapes, t_shapes)
    v = jax.jit(m.init, static_argnums=2)(KEY, g_s, False)
    out = jax.jit(m.apply, static_argnums=2)(v, g_s, False)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(g_s[0]))  # same C and H: identity
    assert set(v["params"]) == {"connector_1", "connector_2"}  # the identity level has no parameters
    assert [o.shape for o in out] == [tuple(t) for t in t_shapes]
    assert float(jnp.min(out[1])) < 0  # BN without ReLU
    assert n_params(v) == (6 * 10 + 10 + 20) + (8 * 8 * 9 + 8 + 16)  # 1x1 conv; Conv3x3 s2 (2 -> 1)


# --------------------------------------------------------------------------------------------------------------------
# Paraphraser / Translator


def test_paraphraser_shapes_parameters_and_no_bn():
    t_shape = (2, 4, 4, 16)
    x = rand(t_shape)
    m = Paraphraser(t_shape, k=0.5)
    v = jax.jit(m.init)(KEY, x)
    assert "batch_stats" not in v  # RepDistiller builds it with use_bn=False
    factor, rec = jax.jit(m.apply)(v, x)
    assert factor.shape == (2, 4, 4, 8) and rec.shape == t_shape
    factor_only = jax.jit(lambda v_, x_: m.apply(v_, x_, is_factor=True))(v, x)
    np.testing.assert_array_equal(np.asarray(factor_only), np.asarray(factor))
    c, c2 = 16, 8
    enc = (c * c * 9 + c) + (c * c2 * 9 + c2) + (c2 * c2 * 9 + c2)
    dec = (c2 * c2 * 9 + c2) + (c2 * c * 9 + c) + (c * c * 9 + c)
    assert n_params(v) == enc + dec
    # with BatchNorm: 6 BN layers (gamma and beta each)
    v_bn = jax.eval_shape(Paraphraser(t_shape, use_bn=True).init, KEY, x)
    assert n_params(v_bn) == enc + dec + 2 * (c + c2 + c2 + c2 + c + c)


def test_translator_shapes_and_parameters():
    s_shape, t_shape = (2, 4, 4, 6), (2, 8, 8, 16)
    x = rand(s_shape)
    m = Translator(s_shape, t_shape)
    v = jax.jit(m.init, static_argnums=2)(KEY, x, False)
    y = jax.eval_shape(lambda v_, x_: m.apply(v_, x_, True, mutable=["batch_stats"])[0], v, x)
    assert y.shape == (2, 4, 4, 8)  # C' = int(16 * 0.5)
    c, c2 = 6, 8
    assert n_params(v) == (c * c * 9 + c + 2 * c) + (c * c2 * 9 + c2 + 2 * c2) + (c2 * c2 * 9 + c2 + 2 * c2)


# --------------------------------------------------------------------------------------------------------------------
# VIDRegressor / LinearEmbed


def test_vid_regressor_parameters_init_variance_and_pooling():
    cs, ct = 5, 7
    x = rand((2, 8, 8, cs))
    m = VIDRegressor(ct, ct)
    v = jax.jit(m.init, static_argnums=2)(KEY, x, 4)
    assert n_params(v) == cs * ct + ct * ct + ct * ct + ct  # three bias-free 1x1 convs + log_scale
    # the student's 8x8 map is pooled to the teacher's 4x4 before the regressor
    mu, var = jax.jit(m.apply, static_argnums=2)(v, x, 4)
    assert mu.shape == (2, 4, 4, ct) and var.shape == (ct,)
    np.testing.assert_allclose(np.asarray(var), 5.0, rtol=1e-6)
    mu_full, _ = jax.eval_shape(m.apply, v, x)
    assert mu_full.shape == (2, 8, 8, ct)


def test_vid_regressor_and_loss_match_numpy():
    """End to end: pool student, 1x1 conv regressor, Gaussian NLL against a taller, pooled teacher map."""
    cs, ct = 3, 4
    s, t = rand((2, 8, 8, cs), 1), rand((2, 4, 4, ct), 2)
    m = VIDRegressor(ct, ct)
    v = jax.jit(m.init, static_argnums=2)(KEY, s, 4)
    v["params"]["log_scale"] = jnp.asarray([0.1, 1.0, 2.0, -0.5])
    loss = jax.jit(lambda v_, s_, t_: vid_loss(*[[a] for a in m.apply(v_, s_, 4)], [t_]))(v, s, t)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    x = np.asarray(s, np.float64).reshape(2, 4, 2, 4, 2, cs).mean(axis=(2, 4))
    for i, act in enumerate([True, True, False]):
        x = x @ p[f"conv{i}"]["kernel"][0, 0]
        x = np.maximum(x, 0) if act else x
    var_np = np.log(1 + np.exp(p["log_scale"])) + 1e-5
    want = np.mean(0.5 * ((x - np.asarray(t, np.float64)) ** 2 / var_np + np.log(var_np)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_linear_embed():
    x = rand((3, 1, 1, 20))
    m = LinearEmbed(dim_out=16)
    v = jax.jit(m.init)(KEY, x)
    y = jax.eval_shape(m.apply, v, x)
    assert y.shape == (3, 16) and n_params(v) == 20 * 16 + 16
    assert np.abs(np.asarray(v["params"]["linear"]["kernel"])).max() <= 1 / math.sqrt(20)


# --------------------------------------------------------------------------------------------------------------------
# sync BN


def test_convreg_sync_bn_in_shard_map_equals_global_batch():
    if len(jax.devices()) < N_DEV:
        pytest.skip(f"needs {N_DEV} devices")
    mesh = jax.make_mesh((N_DEV,), (AX,), axis_types=(jax.sharding.AxisType.Auto,))
    s_shape, t_shape = (8, 4, 4, 3), (8, 2, 2, 5)
    x = rand(s_shape, 3) * 2 + 1
    v = jax.jit(ConvReg(s_shape, t_shape).init, static_argnums=2)(KEY, x, False)
    want, want_stats = jax.jit(lambda v_, x_: ConvReg(s_shape, t_shape).apply(v_, x_, True,
                                                                               mutable=["batch_stats"]))(v, x)
    m = ConvReg((2,) + s_shape[1:], (2,) + t_shape[1:], axis_name=AX)
    f = jax.jit(jax.shard_map(lambda v_, x_: m.apply(v_, x_, True, mutable=["batch_stats"]), mesh=mesh,
                              in_specs=(P(), P(AX)), out_specs=(P(AX), P())))
    got, got_stats = f(v, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 got_stats, want_stats)
