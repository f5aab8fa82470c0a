"""kd_loss against a numpy restatement of RepDistiller's DistillKL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax.losses import kd_loss


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _np_distill_kl(s, t, temp):
    """KLDivLoss(size_average=False)(log_softmax(s/T), softmax(t/T)) * T^2 / B, in float64."""
    log_ps = _np_log_softmax(s.astype(np.float64) / temp)
    log_pt = _np_log_softmax(t.astype(np.float64) / temp)
    pt = np.exp(log_pt)
    return float(np.sum(pt * (log_pt - log_ps)) * temp ** 2 / s.shape[0])


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_numpy(temp):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 10)).astype(np.float32) * 3
    t = rng.normal(size=(6, 10)).astype(np.float32) * 3
    got = float(jax.jit(kd_loss, static_argnames="temperature")(s, t, temperature=temp))
    np.testing.assert_allclose(got, _np_distill_kl(s, t, temp), rtol=1e-5, atol=1e-6)


def test_kd_zero_for_equal_logits_and_bfloat16_inputs():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7)), jnp.bfloat16)
    loss = kd_loss(x, x)
    assert loss.dtype == jnp.float32
    assert abs(float(loss)) < 1e-6


def test_kd_gradient_matches_closed_form():
    # d/ds [T^2/B * KL] = T/B * (softmax(s/T) - softmax(t/T))
    rng = np.random.default_rng(2)
    s = rng.normal(size=(5, 8)).astype(np.float32)
    t = rng.normal(size=(5, 8)).astype(np.float32)
    temp = 4.0
    g = jax.grad(kd_loss)(jnp.asarray(s), jnp.asarray(t), temp)
    ps, pt = np.exp(_np_log_softmax(s / temp)), np.exp(_np_log_softmax(t / temp))
    np.testing.assert_allclose(np.asarray(g), temp / 5 * (ps - pt), rtol=1e-4, atol=1e-7)
