"""Embedding heads: RepDistiller Embed (PyTorch Linear init, L2 normalisation) and the spectral-normalised critic."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from wcord_jax.heads import SPECTRAL_COLLECTION, Embed


def test_embed_init_shapes_and_normalisation():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3, 8)), jnp.float32)  # flattened to 48
    model = Embed(features=16)
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    kernel, bias = variables["params"]["linear"]["kernel"], variables["params"]["linear"]["bias"]
    assert kernel.shape == (48, 16) and bias.shape == (16,)
    bound = 1 / math.sqrt(48)
    for w in (kernel, bias):
        assert float(jnp.max(jnp.abs(w))) <= bound
    assert float(jnp.std(kernel)) > 0.8 * bound / math.sqrt(3)  # U(-b, b) has std b/sqrt(3)
    y = model.apply(variables, x)
    assert y.shape == (4, 16) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1), 1.0, rtol=1e-6)
    z = x.reshape(4, -1) @ kernel + bias
    np.testing.assert_allclose(np.asarray(y), np.asarray(z / jnp.sqrt(jnp.sum(z ** 2, 1, keepdims=True))),
                               rtol=1e-5, atol=1e-6)
    raw = Embed(features=16, normalize=False).apply(variables, x)
    np.testing.assert_allclose(np.asarray(raw), np.asarray(z), rtol=1e-5, atol=1e-6)


def _effective_kernel(model, variables, fan_in):
    """W_eff of the (unnormalised) affine map: f(e_i) - f(0), read off without updating the statistics."""
    eye = jnp.eye(fan_in, dtype=jnp.float32)
    return model.apply(variables, eye) - model.apply(variables, jnp.zeros((1, fan_in), jnp.float32))


def test_spectral_norm_embed_is_one_lipschitz_after_power_iterations():
    fan_in, features = 12, 6
    model = Embed(features=features, normalize=False, spectral_norm=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, fan_in)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert SPECTRAL_COLLECTION in variables
    # same parameter tree as without spectral normalisation; scale the kernel so it is far from 1-Lipschitz
    params = jax.tree.map(lambda w: 3.0 * w, variables["params"])
    variables = {"params": params, SPECTRAL_COLLECTION: variables[SPECTRAL_COLLECTION]}
    kernel = params["linear"]["kernel"]
    sigma_true = float(np.linalg.svd(np.asarray(kernel), compute_uv=False)[0])
    assert sigma_true > 2.0

    # without update_stats the statistics stay as they are
    _, unchanged = model.apply(variables, x, mutable=[SPECTRAL_COLLECTION])
    jax.tree.map(np.testing.assert_array_equal, unchanged[SPECTRAL_COLLECTION], variables[SPECTRAL_COLLECTION])

    @jax.jit
    def refine(spectral):
        _, new = model.apply({"params": variables["params"], SPECTRAL_COLLECTION: spectral}, x,
                             update_stats=True, mutable=[SPECTRAL_COLLECTION])
        return new[SPECTRAL_COLLECTION]

    spectral = variables[SPECTRAL_COLLECTION]
    for _ in range(100):
        spectral = refine(spectral)
    w_eff = _effective_kernel(model, {"params": variables["params"], SPECTRAL_COLLECTION: spectral}, fan_in)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_eff), compute_uv=False)[0], 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(w_eff), np.asarray(kernel) / sigma_true, rtol=1e-3, atol=1e-5)

    # the normalised head on top of it still returns unit vectors
    y = Embed(features=features, spectral_norm=True).apply({"params": variables["params"],
                                                            SPECTRAL_COLLECTION: spectral}, x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1), 1.0, rtol=1e-6)


def test_spectral_norm_gradients_flow_to_the_kernel():
    model = Embed(features=4, spectral_norm=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 7)), jnp.float32)
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        y = model.apply({"params": params, SPECTRAL_COLLECTION: variables[SPECTRAL_COLLECTION]}, x)
        return jnp.sum(y[:, 0])

    grads = jax.grad(loss)(variables["params"])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
