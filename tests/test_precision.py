"""The products scaled up before an `exp` carry an explicit float32 precision (losses/_precision.py): CRD's scores
(both the GEMM and the gather), WCoRD's NCE logits and the Sinkhorn costs, forward and backward. Read from the
lowered programs: every `dot_general` in them says HIGHEST, whatever the backend will do with it."""
import re

import jax
import jax.numpy as jnp
import pytest

from wcord_jax import losses
from wcord_jax.losses import crd as crd_lib

B, D, N, K = 8, 16, 100, 5


def _precisions(fn, *args) -> list:
    text = jax.jit(fn).lower(*args).as_text()
    found = re.findall(r"dot_general[^\n]*?precision = \[(\w+), (\w+)\]", text)
    assert len(found) == text.count("dot_general"), "a dot_general without a precision"
    return found


@pytest.mark.parametrize("scores", ["gemm", "gather"])
def test_crd_scores_are_highest_precision(scores):
    idx = jnp.zeros((B, K), jnp.int32)
    found = _precisions(jax.grad(lambda a, m: jnp.sum(crd_lib._exp_scores(m, a, idx, 0.07, scores))),
                        jnp.ones((B, D)), jnp.ones((N, D)))
    assert found and set(found) == {("HIGHEST", "HIGHEST")}, found


@pytest.mark.parametrize("negatives", [(K, D), (B, K, D)])
def test_wcord_critic_logits_are_highest_precision(negatives):
    def loss(a, p):
        pos, neg = losses.infonce_logits(a, p, jnp.ones(negatives))
        return jnp.sum(losses.infonce_from_logits(pos, neg))

    found = _precisions(jax.grad(loss, argnums=(0, 1)), jnp.ones((B, D)), jnp.ones((B, D)))
    assert found and set(found) == {("HIGHEST", "HIGHEST")}, found


@pytest.mark.parametrize("mode", [{"implicit_diff": "dense"}, {"implicit_diff": False},
                                  {"stop_plan_gradient": True}])
def test_sinkhorn_costs_are_highest_precision_forward_and_backward(mode):
    def loss(s, t):
        return losses.wcord_local_loss(s, t, max_iterations=20, **mode)[0]

    x = jax.random.normal(jax.random.PRNGKey(0), (B, D))
    found = _precisions(jax.value_and_grad(loss, argnums=(0, 1)), x, x[::-1])
    assert found and set(found) == {("HIGHEST", "HIGHEST")}, found
