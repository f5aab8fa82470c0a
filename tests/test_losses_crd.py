"""CRD against a numpy restatement of RepDistiller's ContrastMemory + ContrastLoss, and the negative sampler."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax.losses import (build_class_index, crd_loss, crd_nce_loss, init_crd_state,
                              sample_contrast_idx, update_memory)

EPS = 1e-7


class NumpyContrastMemory:
    """RepDistiller crd/memory.py ContrastMemory.forward + crd/criterion.py ContrastLoss, in float64 numpy."""

    def __init__(self, memory_v1, memory_v2, temp, momentum):
        self.memory_v1 = np.array(memory_v1, np.float64)  # student
        self.memory_v2 = np.array(memory_v2, np.float64)  # teacher
        self.temp, self.momentum = temp, momentum
        self.z_v1 = self.z_v2 = -1.0

    def forward(self, v1, v2, y, idx):
        n = self.memory_v1.shape[0]
        w1 = self.memory_v1[idx]  # [B, K+1, D]
        out_v2 = np.exp(np.einsum("bkd,bd->bk", w1, v2) / self.temp)
        w2 = self.memory_v2[idx]
        out_v1 = np.exp(np.einsum("bkd,bd->bk", w2, v1) / self.temp)
        if self.z_v1 < 0:
            self.z_v1 = out_v1.mean() * n
        if self.z_v2 < 0:
            self.z_v2 = out_v2.mean() * n
        out_v1, out_v2 = out_v1 / self.z_v1, out_v2 / self.z_v2
        m = self.momentum
        for mem, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            pos = mem[y] * m + v * (1 - m)
            mem[y] = pos / np.sqrt((pos ** 2).sum(1, keepdims=True))
        return out_v1, out_v2

    @staticmethod
    def contrast_loss(x, n_data):
        bsz, m = x.shape[0], x.shape[1] - 1
        pn = 1.0 / n_data
        p_pos = x[:, 0]
        log_d1 = np.log(p_pos / (p_pos + m * pn + EPS))
        p_neg = x[:, 1:]
        log_d0 = np.log((m * pn) / (p_neg + m * pn + EPS))
        return -(log_d1.sum() + log_d0.sum()) / bsz

    @staticmethod
    def anchor_grad(x, rows, temp, n_data):
        """Gradient of contrast_loss(exp(<rows, v>/T)/Z) w.r.t. the anchors v (Z held constant): [B, D]."""
        bsz, k = x.shape[0], x.shape[1] - 1
        c = k / n_data + EPS
        coef = x / (x + c)  # d(-log D0_k)/d score_k for the negatives
        coef[:, 0] = -c / (x[:, 0] + c)  # d(-log D1)/d score_0
        return np.einsum("bk,bkd->bd", coef, rows) / (temp * bsz)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _setup(n=40, d=8, b=6, k=10, seed=0):
    rng = np.random.default_rng(seed)
    state = init_crd_state(jax.random.key(seed), n, d)
    batches = []
    perm = rng.permutation(n)
    for step in range(3):
        idx = perm[step * b:(step + 1) * b]
        neg = np.stack([rng.choice(np.setdiff1d(np.arange(n), [i]), k, replace=False) for i in idx])
        cidx = np.concatenate([idx[:, None], neg], 1).astype(np.int32)
        es = _unit(rng.normal(size=(b, d))).astype(np.float32)
        et = _unit(rng.normal(size=(b, d))).astype(np.float32)
        batches.append((es, et, idx.astype(np.int32), cidx))
    return state, batches


def test_init_crd_state():
    state = init_crd_state(jax.random.key(0), 1000, 128)
    stdv = 1 / math.sqrt(128 / 3)
    for mem in (state.memory_s, state.memory_t):
        assert mem.shape == (1000, 128) and mem.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(mem))) <= stdv
        assert abs(float(jnp.mean(jnp.sum(mem ** 2, 1))) - 1.0) < 0.05
    assert not np.allclose(state.memory_s, state.memory_t)
    assert float(state.z_s) == -1 and float(state.z_t) == -1


def test_crd_nce_loss_matches_numpy():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 3.0, size=(5, 9)).astype(np.float32)
    got = float(crd_nce_loss(jnp.asarray(probs), n_data=50))
    np.testing.assert_allclose(got, NumpyContrastMemory.contrast_loss(probs.astype(np.float64), 50), rtol=1e-5)


def test_crd_loss_matches_repdistiller_over_three_steps():
    temp, momentum = 0.07, 0.5
    state, batches = _setup()
    n = state.memory_s.shape[0]
    ref = NumpyContrastMemory(state.memory_s, state.memory_t, temp, momentum)
    step = jax.jit(crd_loss, static_argnames=("temperature", "momentum"))
    z_first = None
    for i, (es, et, idx, cidx) in enumerate(batches):
        loss, state = step(state, es, et, idx, cidx, temperature=temp, momentum=momentum)
        out_s, out_t = ref.forward(es.astype(np.float64), et.astype(np.float64), idx, cidx)
        ref_loss = ref.contrast_loss(out_s, n) + ref.contrast_loss(out_t, n)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
        np.testing.assert_allclose(float(state.z_s), ref.z_v1, rtol=1e-5)
        np.testing.assert_allclose(float(state.z_t), ref.z_v2, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.memory_s), ref.memory_v1, atol=2e-6)
        np.testing.assert_allclose(np.asarray(state.memory_t), ref.memory_v2, atol=2e-6)
        if i == 0:
            z_first = (float(state.z_s), float(state.z_t))
            assert z_first[0] > 0 and z_first[1] > 0
        else:  # frozen after the first batch
            assert (float(state.z_s), float(state.z_t)) == z_first
    # rows never in a batch are untouched, rows in a batch are unit norm
    seen = np.concatenate([b[2] for b in batches])
    unseen = np.setdiff1d(np.arange(n), seen)
    init = init_crd_state(jax.random.key(0), n, state.memory_s.shape[1])
    np.testing.assert_array_equal(np.asarray(state.memory_s)[unseen], np.asarray(init.memory_s)[unseen])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.memory_t)[seen], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("first_call", [True, False])
def test_crd_gradients_follow_the_two_halves(first_call):
    temp = 0.07
    state, batches = _setup(seed=3)
    n = state.memory_s.shape[0]
    if not first_call:  # Z already set: gradients must not depend on Z estimation either way
        _, state = crd_loss(state, *batches[0])
    es, et, idx, cidx = batches[1]
    ref = NumpyContrastMemory(state.memory_s, state.memory_t, temp, 0.5)
    ref.z_v1, ref.z_v2 = float(state.z_s), float(state.z_t)
    out_s, out_t = ref.forward(es.astype(np.float64), et.astype(np.float64), idx, cidx)
    mem_s, mem_t = np.asarray(state.memory_s, np.float64), np.asarray(state.memory_t, np.float64)
    expected_gs = ref.anchor_grad(out_s, mem_t[cidx], temp, n)  # student half only
    expected_gt = ref.anchor_grad(out_t, mem_s[cidx], temp, n)  # teacher half only

    def loss_fn(es_, et_):
        return crd_loss(state, es_, et_, idx, cidx, temperature=temp)[0]

    gs, gt = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(es), jnp.asarray(et))
    np.testing.assert_allclose(np.asarray(gs), expected_gs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gt), expected_gt, rtol=1e-4, atol=1e-6)

    def teacher_half(et_):
        probs_t = jnp.exp(jnp.einsum("bkd,bd->bk", state.memory_s[cidx], et_) / temp) / ref.z_v2
        return crd_nce_loss(probs_t, n)

    np.testing.assert_allclose(np.asarray(gt), np.asarray(jax.grad(teacher_half)(jnp.asarray(et))),
                               rtol=1e-4, atol=1e-6)


def test_update_memory_duplicates_last_occurrence_wins():
    mem = jnp.asarray(_unit(np.random.default_rng(0).normal(size=(5, 3))), jnp.float32)
    emb = jnp.asarray(_unit(np.random.default_rng(1).normal(size=(4, 3))), jnp.float32)
    idx = jnp.asarray([2, 0, 2, 4], jnp.int32)
    out = np.asarray(update_memory(mem, idx, emb, 0.5))
    expect = np.array(mem)
    for j in (1, 2, 3):  # j=0 is overwritten by its later duplicate j=2
        row = 0.5 * np.asarray(mem)[idx[j]] + 0.5 * np.asarray(emb)[j]
        expect[idx[j]] = row / np.linalg.norm(row)
    np.testing.assert_allclose(out, expect, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Negative sampling


def _labels(n_per_class=(20, 15, 25, 10, 30), seed=0):
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(n_per_class)])
    return np.random.default_rng(seed).permutation(labels)


def test_build_class_index():
    labels = _labels()
    ci = build_class_index(labels)
    order, start, count = map(np.asarray, (ci.order, ci.start, ci.count))
    np.testing.assert_array_equal(count, np.bincount(labels))
    for c in range(len(count)):
        block = order[start[c]:start[c] + count[c]]
        assert np.all(labels[block] == c) and np.all(np.diff(block) > 0)
    assert ci.n_data == labels.size and ci.min_others == labels.size - 30 and ci.max_others == labels.size - 10


@pytest.mark.parametrize("replace", [False, True])
def test_sample_contrast_idx_properties(replace):
    labels = _labels()
    n = labels.size
    ci = build_class_index(labels)
    k = 60 if not replace else 200  # 60 <= min pool (70); with replacement K may exceed the pool
    b = 64
    sample = jax.jit(sample_contrast_idx, static_argnames=("num_negatives", "replace"))
    counts = np.zeros((len(np.bincount(labels)), n))
    draws = 40
    key = jax.random.key(0)
    for r in range(draws):
        idx = np.random.default_rng(r).choice(n, b, replace=False).astype(np.int32)
        out = np.asarray(sample(jax.random.fold_in(key, r), jnp.asarray(idx), jnp.asarray(labels[idx]), ci,
                                num_negatives=k, replace=replace))
        assert out.shape == (b, k + 1) and out.dtype == np.int32
        np.testing.assert_array_equal(out[:, 0], idx)
        neg = out[:, 1:]
        assert neg.min() >= 0 and neg.max() < n
        assert np.all(labels[neg] != labels[idx][:, None]), "a negative has the anchor's class"
        if not replace:
            assert all(len(np.unique(row)) == k for row in neg), "duplicate negatives without replacement"
        for row, c in zip(neg, labels[idx]):
            np.add.at(counts[c], row, 1)
    # rough uniformity: per anchor class, the counts over its pool are ~ uniform (chi-square, fixed seeds)
    for c in range(counts.shape[0]):
        pool = labels != c
        obs = counts[c][pool]
        assert counts[c][~pool].sum() == 0
        total = obs.sum()
        if total == 0:
            continue
        expected = total / pool.sum()
        chi2 = float(((obs - expected) ** 2 / expected).sum())
        dof = pool.sum() - 1
        # without replacement the variance per cell is smaller than multinomial, so this bound is conservative
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (c, chi2, dof)
        assert obs.min() > 0


def test_sample_without_replacement_is_uniform_over_positions_at_small_scale():
    # one anchor class, pool of 6, K = 3: every one of the C(6,3) = 20 subsets should appear ~ equally often
    labels = np.array([0, 1, 2, 0, 3, 1, 2, 3])
    ci = build_class_index(labels)
    idx = jnp.zeros((4000,), jnp.int32)
    out = np.asarray(sample_contrast_idx(jax.random.key(1), idx, jnp.asarray(labels)[idx], ci, 3))
    subsets = {}
    for row in out[:, 1:]:
        key = tuple(sorted(row.tolist()))
        assert len(set(key)) == 3 and all(labels[j] != 0 for j in key)
        subsets[key] = subsets.get(key, 0) + 1
    assert len(subsets) == 20
    obs = np.array(list(subsets.values()))
    chi2 = float(((obs - 200.0) ** 2 / 200.0).sum())
    assert chi2 < 19 + 5 * math.sqrt(38), chi2


def test_anchors_whose_pool_is_smaller_than_k_draw_with_replacement():
    """RepDistiller's rule: an anchor of a class whose other-class pool is smaller than K samples with replacement;
    the others still draw K distinct negatives."""
    labels = np.array([0] * 6 + [1] * 3 + [2] * 2)  # pools: class 0 -> 5, class 1 -> 8, class 2 -> 9
    ci = build_class_index(labels)
    idx = jnp.asarray(np.repeat([0, 6, 9], 300), jnp.int32)
    out = np.asarray(sample_contrast_idx(jax.random.key(0), idx, jnp.asarray(labels)[idx], ci, 7))
    neg, anchor = out[:, 1:], labels[np.asarray(idx)]
    assert np.all(labels[neg] != anchor[:, None])
    small = anchor == 0  # pool 5 < K = 7: repeats are unavoidable, and every pool member appears
    assert all(len(np.unique(r)) <= 5 for r in neg[small]) and set(neg[small].ravel()) == set(np.flatnonzero(labels))
    assert all(len(np.unique(r)) == 7 for r in neg[~small])  # pools 8 and 9 >= K: distinct
    # K beyond every pool: all anchors with replacement.
    out = np.asarray(sample_contrast_idx(jax.random.key(1), idx, jnp.asarray(labels)[idx], ci, 20))
    assert np.all(labels[out[:, 1:]] != anchor[:, None])


def test_radix_select_draws_the_same_negatives_as_a_sort():
    """The k-th smallest key by radix select equals a sort's, on random keys, ties and rows of padding, so the
    negatives are those the sort-based draw gives, bit for bit."""
    from wcord_jax.losses import crd as crd_lib

    keys = jax.random.bits(jax.random.key(3), (16, 999), jnp.uint32)
    keys = keys.at[:4].set(keys[:4] % 7)  # many ties
    keys = keys.at[4:8, 500:].set(jnp.uint32(0xFFFFFFFF))  # padded rows, as short pools have
    for k in (1, 2, 37, 500, 999):
        np.testing.assert_array_equal(crd_lib.kth_smallest(keys, k), jnp.sort(keys, axis=1)[:, k - 1:k])

    labels = _labels()
    ci = build_class_index(labels)
    idx = jnp.asarray(np.random.default_rng(0).choice(labels.size, 32, replace=False), jnp.int32)
    key = jax.random.key(5)
    got = sample_contrast_idx(key, idx, jnp.asarray(labels)[idx], ci, 60)
    original = crd_lib.kth_smallest
    try:  # the same draw with the threshold from a sort (the previous implementation)
        crd_lib.kth_smallest = lambda keys, k: jnp.sort(keys, axis=1)[:, k - 1:k]
        want = sample_contrast_idx(key, idx, jnp.asarray(labels)[idx], ci, 60)
    finally:
        crd_lib.kth_smallest = original
    np.testing.assert_array_equal(got, want)


def test_gemm_and_gather_scores_give_the_same_loss_state_and_gradients():
    from wcord_jax.losses import crd as crd_lib

    assert crd_lib.scores_by_gemm(50_000, 16_385) and not crd_lib.scores_by_gemm(1_281_167, 16_385)
    state, batches = _setup(n=300, d=16, b=8, k=40)
    for scores in ("gemm", "gather"):
        assert crd_lib.scores_by_gemm(300, 41, scores) == (scores == "gemm")
    st = {"gemm": state, "gather": state}
    for es, et, idx, cidx in batches:  # three steps: Z estimated on the first, memories carried
        out = {}
        for scores in ("gemm", "gather"):
            fn = jax.value_and_grad(lambda s, t, sc=scores: crd_loss(st[sc], s, t, idx, cidx, scores=sc)[0],
                                    argnums=(0, 1))
            out[scores] = fn(es, et)
            st[scores] = crd_loss(st[scores], es, et, idx, cidx, scores=scores)[1]
        (lg, (gs_g, gt_g)), (ll, (gs_l, gt_l)) = out["gemm"], out["gather"]
        np.testing.assert_allclose(lg, ll, rtol=1e-6)
        for a, b in ((gs_g, gs_l), (gt_g, gt_l)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), st["gemm"], st["gather"])
    with pytest.raises(ValueError, match="valid: auto, gemm, gather"):
        crd_lib.scores_by_gemm(10, 2, "dense")
