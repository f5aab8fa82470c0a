"""WCoRD terms on one device, against independent numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax.losses import (QueueState, infonce_from_logits, infonce_logits, init_crd_state, init_queue_state,
                              wcord_global_loss, wcord_global_loss_batch, wcord_global_loss_memory,
                              wcord_local_loss)

# ott's implicit differentiation goes through lineax, which warns about its own deprecated NormalCG.
pytestmark = pytest.mark.filterwarnings("ignore:.*NormalCG.*:DeprecationWarning")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# ------------------------------------------------------------------------------------------------------------------
# Local term


def np_sinkhorn_cost(x, y, eps, tol=1e-12, max_iter=100000):
    """Entropic OT between uniform measures on x and y, cosine cost, log-domain Sinkhorn in float64: <P, C>."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c = 1.0 - _unit(x) @ _unit(y).T
    n, m = c.shape
    log_a, log_b = np.full(n, -np.log(n)), np.full(m, -np.log(m))
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(max_iter):
        f = eps * log_a - eps * _np_logsumexp((g[None, :] - c) / eps, axis=1)
        g = eps * log_b - eps * _np_logsumexp((f[:, None] - c) / eps, axis=0)
        p = np.exp((f[:, None] + g[None, :] - c) / eps)
        if np.abs(p.sum(1) - 1.0 / n).sum() < tol:
            break
    else:
        raise AssertionError("numpy Sinkhorn did not converge")
    return float((p * c).sum()), p, c


def _points(n=10, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(_unit(rng.normal(size=(n, d))), jnp.float32),
            jnp.asarray(_unit(rng.normal(size=(n, d))), jnp.float32))


TIGHT = dict(epsilon=0.1, threshold=1e-6, max_iterations=3000)


@pytest.mark.parametrize("implicit_diff", [True, "dense", False])
def test_local_loss_matches_numpy_sinkhorn(implicit_diff):
    x, y = _points()
    loss, aux = jax.jit(lambda a, b: wcord_local_loss(a, b, implicit_diff=implicit_diff, **TIGHT))(x, y)
    ref, _, _ = np_sinkhorn_cost(x, y, TIGHT["epsilon"])
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert bool(aux["converged"]) and 0 < int(aux["n_iters"]) <= TIGHT["max_iterations"]


def test_local_loss_defaults_report_convergence():
    x, y = _points(seed=1)
    loss, aux = wcord_local_loss(x, y)
    assert np.isfinite(float(loss)) and aux["converged"].dtype == jnp.bool_ and int(aux["n_iters"]) <= 100


def _grad(fn, x, y):
    return jax.jit(jax.grad(lambda a, b: fn(a, b)[0], argnums=(0, 1)))(x, y)


def test_local_gradients_implicit_dense_unrolled_agree_with_finite_differences():
    x, y = _points(n=8, d=4, seed=2)
    grads = {mode: _grad(lambda a, b: wcord_local_loss(a, b, implicit_diff=mode, **TIGHT), x, y)
             for mode in (True, "dense", False)}
    for mode in (True, "dense"):
        for g, g_ref in zip(grads[mode], grads[False]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-5)
    # central differences of the float64 numpy reference, a few coordinates of x
    h = 1e-5
    x64 = np.asarray(x, np.float64)
    for i, j in [(0, 0), (3, 2), (7, 1)]:
        xp, xm = x64.copy(), x64.copy()
        xp[i, j] += h
        xm[i, j] -= h
        fd = (np_sinkhorn_cost(xp, y, TIGHT["epsilon"])[0] - np_sinkhorn_cost(xm, y, TIGHT["epsilon"])[0]) / (2 * h)
        np.testing.assert_allclose(float(grads[False][0][i, j]), fd, atol=5e-5)


def test_stopped_plan_gradient_is_plan_times_cost_gradient():
    x, y = _points(n=8, d=4, seed=3)
    _, p, _ = np_sinkhorn_cost(x, y, TIGHT["epsilon"])

    def fixed_plan_cost(a, b):  # <P*, C(a, b)> with P* a constant from the numpy solver
        c = 1.0 - (a / jnp.linalg.norm(a, axis=1, keepdims=True)) @ (b / jnp.linalg.norm(b, axis=1, keepdims=True)).T
        return jnp.sum(jnp.asarray(p, jnp.float32) * c), None

    stopped = _grad(lambda a, b: wcord_local_loss(a, b, stop_plan_gradient=True, **TIGHT), x, y)
    expected = _grad(fixed_plan_cost, x, y)
    full = _grad(lambda a, b: wcord_local_loss(a, b, **TIGHT), x, y)
    for g, e, f in zip(stopped, expected, full):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5)
        assert np.abs(np.asarray(g) - np.asarray(f)).max() > 1e-3  # the plan's own gradient is not negligible


def test_local_loss_rejects_unknown_mode():
    x, y = _points()
    with pytest.raises(ValueError, match="implicit_diff"):
        wcord_local_loss(x, y, implicit_diff="lineax")


# ------------------------------------------------------------------------------------------------------------------
# Global term


def np_infonce(anchors, positives, negatives, tau):
    """Mean over anchors of -log softmax([<a,p>, <a,n_1..K>]/tau)[0]; negatives [K, D] or [B, K, D]."""
    a, p, n = (np.asarray(v, np.float64) for v in (anchors, positives, negatives))
    pos = (a * p).sum(-1) / tau
    neg = a @ n.T / tau if n.ndim == 2 else np.einsum("bd,bkd->bk", a, n) / tau
    logits = np.concatenate([pos[:, None], neg], 1)
    return float(np.mean(_np_logsumexp(logits, axis=1) - pos))


def test_infonce_helpers():
    rng = np.random.default_rng(0)
    a, p = _unit(rng.normal(size=(4, 3))), _unit(rng.normal(size=(4, 3)))
    for n in (_unit(rng.normal(size=(7, 3))), _unit(rng.normal(size=(4, 7, 3)))):
        pos, neg = infonce_logits(jnp.asarray(a), jnp.asarray(p), jnp.asarray(n), 0.1)
        assert neg.shape == (4, 7)
        np.testing.assert_allclose(float(jnp.mean(infonce_from_logits(pos, neg))), np_infonce(a, p, n, 0.1),
                                   rtol=1e-5)


@pytest.mark.parametrize("empty", [True, False])
def test_global_loss_matches_numpy_and_enqueues_fifo(empty):
    tau, k, b, d = 0.1, 16, 6, 5
    state = init_queue_state(jax.random.key(0), k, d, empty=empty)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.queue_s), axis=1), 1.0, rtol=1e-6)
    q_s, q_t = np.array(state.queue_s, np.float64), np.array(state.queue_t, np.float64)
    ptr, filled = 0, 0 if empty else k
    step = jax.jit(wcord_global_loss, static_argnames="tau")
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(4):  # 24 rows through a 16-row queue: wraps around
        es = _unit(rng.normal(size=(b, d))).astype(np.float32)
        et = _unit(rng.normal(size=(b, d))).astype(np.float32)
        loss, state = step(state, es, et, tau=tau)
        # Only the rows written so far are negatives (an empty queue: none on the first step, 6, 12, then all 16).
        ref = np_infonce(es, et, q_t[:filled], tau) + np_infonce(et, es, q_s[:filled], tau)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-7)
        losses.append(float(loss))
        rows = (ptr + np.arange(b)) % k
        q_s[rows], q_t[rows] = es, et
        ptr, filled = (ptr + b) % k, min(filled + b, k)
        np.testing.assert_allclose(np.asarray(state.queue_s), q_s, atol=1e-7)
        np.testing.assert_allclose(np.asarray(state.queue_t), q_t, atol=1e-7)
        assert int(state.ptr) == ptr and int(state.filled) == filled
    assert (losses[0] == 0.0) == empty


def test_global_loss_gradients_negatives_are_constants():
    tau, k, b, d = 0.1, 8, 4, 3
    state = init_queue_state(jax.random.key(1), k, d, empty=False)
    rng = np.random.default_rng(1)
    es = jnp.asarray(_unit(rng.normal(size=(b, d))), jnp.float32)
    et = jnp.asarray(_unit(rng.normal(size=(b, d))), jnp.float32)

    def reference(es_, et_, q_s, q_t):
        def ce(a, p, n):
            pos = jnp.sum(a * p, -1) / tau
            return jnp.mean(jax.nn.logsumexp(jnp.concatenate([pos[:, None], a @ n.T / tau], 1), 1) - pos)
        return ce(es_, et_, q_t) + ce(et_, es_, q_s)

    g = jax.grad(lambda a, c: wcord_global_loss(state, a, c, tau=tau)[0], argnums=(0, 1))(es, et)
    g_ref = jax.grad(reference, argnums=(0, 1))(es, et, state.queue_s, state.queue_t)
    for x, r in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-5, atol=1e-7)
    gq = jax.grad(lambda q: wcord_global_loss(QueueState(q, q, state.ptr, state.filled), es, et, tau=tau)[0])(state.queue_s)
    assert float(jnp.abs(gq).max()) == 0.0


def test_global_loss_rejects_batch_larger_than_queue():
    state = init_queue_state(jax.random.key(0), 4, 3)
    with pytest.raises(ValueError, match="queue size"):
        wcord_global_loss(state, jnp.ones((5, 3)), jnp.ones((5, 3)))


@pytest.mark.parametrize("with_keys", [False, True])
def test_global_loss_memory_variant_matches_numpy(with_keys):
    """Positive and negatives are memory rows (the positive is the anchor's own row, as in CRD); the memories are
    updated with the keys when given, with the anchors otherwise."""
    tau, m, n, d, b, k = 0.1, 0.5, 30, 4, 5, 7
    state = init_crd_state(jax.random.key(0), n, d)
    rng = np.random.default_rng(0)
    mem_s, mem_t = np.array(state.memory_s, np.float64), np.array(state.memory_t, np.float64)
    perm = rng.permutation(n)
    step = jax.jit(wcord_global_loss_memory, static_argnames=("tau", "momentum"))
    for i in range(2):
        idx = perm[i * b:(i + 1) * b].astype(np.int32)
        cidx = np.concatenate([idx[:, None], rng.integers(0, n, size=(b, k))], 1).astype(np.int32)
        es, et, ks, kt = (_unit(rng.normal(size=(b, d))).astype(np.float32) for _ in range(4))
        keys = {"key_s": ks, "key_t": kt} if with_keys else {}
        loss, state = step(state, es, et, idx, cidx, tau=tau, momentum=m, **keys)
        ref = (np_infonce(es, mem_t[idx], mem_t[cidx[:, 1:]], tau)
               + np_infonce(et, mem_s[idx], mem_s[cidx[:, 1:]], tau))
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        for mem, e in ((mem_s, ks if with_keys else es), (mem_t, kt if with_keys else et)):
            row = m * mem[idx] + (1 - m) * e
            mem[idx] = row / np.linalg.norm(row, axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(state.memory_s), mem_s, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.memory_t), mem_t, atol=1e-6)
        assert float(state.z_s) == -1.0 and float(state.z_t) == -1.0
    one_way, _ = wcord_global_loss_memory(state, es, et, idx, cidx, tau=tau, momentum=m, teacher_anchors=False)
    np.testing.assert_allclose(float(one_way), np_infonce(es, mem_t[idx], mem_t[cidx[:, 1:]], tau), rtol=1e-5)


def test_global_loss_with_keys_matches_numpy_enqueues_keys_and_has_constant_keys():
    """MoCo-style keys: the positive of each anchor is the other side's key, the queues receive keys; gradients reach
    the anchors only. A short student queue keeps only the newest rows as teacher-anchor negatives."""
    tau, k, b, d, short = 0.1, 16, 6, 5, 8
    state = init_queue_state(jax.random.key(0), k, d)
    q_s, q_t = np.zeros((k, d)), np.zeros((k, d))
    ages = np.full(k, 10 ** 6)  # rows written after each row (never written: huge)
    ptr, filled = 0, 0
    step = jax.jit(wcord_global_loss, static_argnames=("tau", "teacher_anchors", "student_queue_size"))
    rng = np.random.default_rng(0)
    for _ in range(4):
        es, et, ks, kt = (_unit(rng.normal(size=(b, d))).astype(np.float32) for _ in range(4))
        newest = np.argsort(ages, kind="stable")[:min(filled, short)]
        loss, new_state = step(state, es, et, tau=tau, key_s=ks, key_t=kt, student_queue_size=short)
        ref = np_infonce(es, kt, q_t[:filled], tau) + np_infonce(et, ks, q_s[newest], tau)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-7)
        one_way, _ = step(state, es, et, tau=tau, key_s=ks, key_t=kt, teacher_anchors=False)
        np.testing.assert_allclose(float(one_way), np_infonce(es, kt, q_t[:filled], tau), rtol=1e-5, atol=1e-7)
        if filled:
            g = jax.grad(lambda a, c, x, y: wcord_global_loss(state, a, c, tau=tau, key_s=x, key_t=y)[0],
                         argnums=(0, 1, 2, 3))(es, et, ks, kt)
            assert float(jnp.abs(g[0]).max()) > 0 and float(jnp.abs(g[1]).max()) > 0
            assert float(jnp.abs(g[2]).max()) == 0 and float(jnp.abs(g[3]).max()) == 0
        rows = (ptr + np.arange(b)) % k
        q_s[rows], q_t[rows] = ks, kt
        ages += b  # ages count rows written since
        ages[rows] = np.arange(b)[::-1]  # within a batch, the last row is the newest
        ptr, filled = (ptr + b) % k, min(filled + b, k)
        np.testing.assert_allclose(np.asarray(new_state.queue_s)[:filled], q_s[:filled], atol=1e-7)
        np.testing.assert_allclose(np.asarray(new_state.queue_t)[:filled], q_t[:filled], atol=1e-7)
        state = new_state
    with pytest.raises(ValueError, match="both"):
        wcord_global_loss(state, es, et, key_s=ks)


def np_clip(s, t, tau, both=True):
    """Symmetric InfoNCE over the batch: row i of s against every row of t (target i), and the reverse."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)

    def ce(a, o):
        logits = a @ o.T / tau
        return np.mean(_np_logsumexp(logits, axis=1) - np.diag(logits))

    return ce(s, t) + (ce(t, s) if both else 0.0)


def test_global_loss_batch_matches_numpy():
    tau, b, d = 0.1, 8, 5
    rng = np.random.default_rng(3)
    es, et = (jnp.asarray(_unit(rng.normal(size=(b, d))), jnp.float32) for _ in range(2))
    for both in (True, False):
        loss = wcord_global_loss_batch(es, et, tau, teacher_anchors=both)
        np.testing.assert_allclose(float(loss), np_clip(es, et, tau, both), rtol=1e-5)
