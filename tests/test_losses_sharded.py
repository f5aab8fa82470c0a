"""The losses inside jax.shard_map on 4 (virtual CPU) devices equal the one-device losses on the global batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax.losses import (build_class_index, crd_loss, init_crd_state, init_queue_state, kd_loss,
                              queue_state_specs, sample_contrast_idx, wcord_global_loss, wcord_global_loss_batch,
                              wcord_global_loss_memory, wcord_local_loss)

AX = "data"
N_DEV = 4

pytestmark = pytest.mark.filterwarnings("ignore:.*NormalCG.*:DeprecationWarning")


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (tests/conftest.py asks JAX for virtual CPU devices)")
    return jax.make_mesh((N_DEV,), (AX,), axis_types=(jax.sharding.AxisType.Auto,))


def sharded(mesh, in_specs, out_specs, check_vma=True):
    def wrap(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma))
    return wrap


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _features(b, f=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, f)), jnp.float32)


def _heads(d=5, f=6, seed=1):
    """Two 'embedding heads' (replicated parameters) so that gradients w.r.t. parameters can be compared."""
    rng = np.random.default_rng(seed)
    return {"s": jnp.asarray(rng.normal(size=(f, d)), jnp.float32),
            "t": jnp.asarray(rng.normal(size=(f, d)), jnp.float32)}


def _embed(params, xs, xt):
    return _unit(xs @ params["s"]), _unit(xt @ params["t"])


def _close_tree(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def test_kd_loss_sharded(mesh):
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)

    @sharded(mesh, (P(AX), P(AX)), P())
    def f(s_, t_):
        return kd_loss(s_, t_, axis_name=AX)

    np.testing.assert_allclose(float(f(s, t)), float(kd_loss(s, t)), rtol=1e-6)


@pytest.mark.parametrize("keys", [False, True])
def test_wcord_global_loss_sharded_queue(mesh, keys):
    """With keys (momentum heads' outputs, here another pair of heads) and a short student queue too."""
    k, b_global, d, tau = 32, 12, 5, 0.1
    params = _heads(d)
    key_params = _heads(d, seed=7)
    state1 = init_queue_state(jax.random.key(0), k, d)
    state4 = state1
    options = {"student_queue_size": 20} if keys else {}

    def step(params, state, xs, xt, axis_name):
        def loss_fn(p):
            es, et = _embed(p, xs, xt)
            if keys:
                options["key_s"], options["key_t"] = _embed(key_params, xs, xt)
            return wcord_global_loss(state, es, et, tau=tau, axis_name=axis_name, **options)
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new_state, grads

    state_spec = queue_state_specs(AX)
    one = jax.jit(functools.partial(step, axis_name=None))
    four = sharded(mesh, (P(), state_spec, P(AX), P(AX)), (P(), state_spec, P()))(
        functools.partial(step, axis_name=AX))
    ptrs = []
    for i in range(6):  # 72 rows through a 32-row queue: wraps around twice, ptr 12, 24, 4, 16, 28, 8
        xs, xt = _features(b_global, seed=10 + i), _features(b_global, seed=20 + i)
        loss1, state1, g1 = one(params, state1, xs, xt)
        loss4, state4, g4 = four(params, state4, xs, xt)
        np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5, atol=1e-6)  # (step 1: empty queue, 0)
        _close_tree(g4, g1, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state4.queue_s), np.asarray(state1.queue_s), atol=1e-6)
        np.testing.assert_allclose(np.asarray(state4.queue_t), np.asarray(state1.queue_t), atol=1e-6)
        assert int(state4.ptr) == int(state1.ptr) and int(state4.filled) == int(state1.filled)
        ptrs.append(int(state4.ptr))
    assert ptrs == [12, 24, 4, 16, 28, 8]
    assert int(state4.filled) == k


def test_wcord_global_loss_batch_sharded(mesh):
    """In-batch negatives: each device's local anchors against the gathered batch equal the one-device loss, and the
    gradients (through the gather too) equal the one-device gradients."""
    b_global, d, tau = 12, 5, 0.1
    params = _heads(d)
    xs, xt = _features(b_global, seed=1), _features(b_global, seed=2)

    def loss(p, xs, xt, axis_name):
        es, et = _embed(p, xs, xt)
        return wcord_global_loss_batch(es, et, tau=tau, axis_name=axis_name)

    one = jax.jit(jax.value_and_grad(functools.partial(loss, axis_name=None)))(params, xs, xt)
    four = sharded(mesh, (P(), P(AX), P(AX)), (P(), P()))(
        jax.value_and_grad(functools.partial(loss, axis_name=AX)))(params, xs, xt)
    np.testing.assert_allclose(float(four[0]), float(one[0]), rtol=1e-5)
    _close_tree(four[1], one[1], rtol=1e-4, atol=1e-6)


def _crd_batches(n, b_global, k, steps, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    out = []
    for i in range(steps):
        idx = perm[i * b_global:(i + 1) * b_global].astype(np.int32)
        cidx = np.concatenate([idx[:, None], rng.integers(0, n, size=(b_global, k))], 1).astype(np.int32)
        out.append((jnp.asarray(idx), jnp.asarray(cidx), _features(b_global, seed=100 + i),
                    _features(b_global, seed=200 + i)))
    return out


@pytest.mark.parametrize("loss_name", ["crd", "wcord_memory"])
def test_memory_bank_losses_sharded(mesh, loss_name):
    n, d, b_global, k = 48, 5, 8, 6
    params = _heads(d)
    state1 = init_crd_state(jax.random.key(0), n, d)
    state4 = state1

    def step(params, state, idx, cidx, xs, xt, axis_name):
        def loss_fn(p):
            es, et = _embed(p, xs, xt)
            if loss_name == "crd":
                return crd_loss(state, es, et, idx, cidx, temperature=0.1, axis_name=axis_name)
            return wcord_global_loss_memory(state, es, et, idx, cidx, tau=0.1, axis_name=axis_name)
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new_state, grads

    one = jax.jit(functools.partial(step, axis_name=None))
    specs = (P(), P(), P(AX), P(AX), P(AX), P(AX))
    four = sharded(mesh, specs, (P(), P(), P()))(functools.partial(step, axis_name=AX))

    # Every replica's memories, stacked on a leading device axis (check_vma=False lets an invariant value leave
    # through P(AX)), to check that the replicas are identical, not merely declared so.
    @sharded(mesh, specs, (P(AX), P(AX)), check_vma=False)
    def replicas(params, state, idx, cidx, xs, xt):
        _, new_state, _ = step(params, state, idx, cidx, xs, xt, AX)
        return new_state.memory_s[None], new_state.memory_t[None]

    for i, batch in enumerate(_crd_batches(n, b_global, k, 3)):
        rep_s, rep_t = replicas(params, state4, *batch)
        loss1, state1, g1 = one(params, state1, *batch)
        loss4, state4, g4 = four(params, state4, *batch)
        np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5)
        _close_tree(g4, g1, rtol=1e-4, atol=1e-6)
        for rep, mem4, mem1 in ((rep_s, state4.memory_s, state1.memory_s), (rep_t, state4.memory_t, state1.memory_t)):
            rep = np.asarray(rep)
            for r in range(1, N_DEV):
                np.testing.assert_array_equal(rep[r], rep[0])
            np.testing.assert_allclose(rep[0], np.asarray(mem4), atol=1e-6)  # another program: rounding may differ
            np.testing.assert_allclose(np.asarray(mem4), np.asarray(mem1), atol=1e-6)
        np.testing.assert_allclose(float(state4.z_s), float(state1.z_s), rtol=1e-5)
        np.testing.assert_allclose(float(state4.z_t), float(state1.z_t), rtol=1e-5)


@pytest.mark.parametrize("mode", [dict(implicit_diff=False), dict(implicit_diff="dense"),
                                  dict(stop_plan_gradient=True)])
def test_wcord_local_loss_sharded_gradients(mesh, mode):
    """Inside shard_map (check_vma=True) unrolled, dense-implicit and stopped-plan gradients are exact."""
    d, b_global = 5, 8
    params = _heads(d)
    xs, xt = _features(b_global, seed=1), _features(b_global, seed=2)
    kw = dict(epsilon=0.1, threshold=1e-6, max_iterations=500, **mode)

    def step(params, xs, xt, axis_name):
        def loss_fn(p):
            es, et = _embed(p, xs, xt)
            return wcord_local_loss(es, et, axis_name=axis_name, **kw)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, aux["converged"], grads

    loss1, conv1, g1 = jax.jit(functools.partial(step, axis_name=None))(params, xs, xt)
    loss4, conv4, g4 = sharded(mesh, (P(), P(AX), P(AX)), (P(), P(), P()))(
        functools.partial(step, axis_name=AX))(params, xs, xt)
    assert bool(conv1) and bool(conv4)
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5)
    _close_tree(g4, g1, rtol=1e-4, atol=1e-6)


def test_sample_contrast_idx_inside_shard_map(mesh):
    labels = np.arange(40) % 4
    ci = build_class_index(labels)
    idx = jnp.arange(8, dtype=jnp.int32)

    @sharded(mesh, (P(AX),), P(AX))
    def f(idx_):
        key = jax.random.fold_in(jax.random.key(0), jax.lax.axis_index(AX))
        return sample_contrast_idx(key, idx_, jnp.asarray(labels)[idx_], ci, 12)

    out = np.asarray(f(idx))
    np.testing.assert_array_equal(out[:, 0], np.arange(8))
    assert np.all(labels[out[:, 1:]] != labels[:8, None])
    assert all(len(set(row)) == 12 for row in out[:, 1:])
