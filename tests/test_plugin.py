"""A method from outside the package: a MoCo-style distiller (a queue of keys, a momentum key head) defined in this
file and registered at run time, trained by the engine as it is. Its whole state is its own: the engine carries it,
places it, checkpoints it and hands it back, and the step after each optimizer update is the distiller's hook."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import first_steps, small_distill_config
from wcord_jax import checkpoint, distill, distillers, losses, rundir
from wcord_jax.distillers.base import Distiller, StepInputs, Term

QUEUE, DIM, MOMENTUM, TAU = 32, 8, 0.9, 0.2


def _normalise(x):
    return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


class ToyMoCo(Distiller):
    """Queries: the student's pooled features through a trained head; keys: the teacher's through a momentum copy of
    another head; InfoNCE against a queue of past keys. The state is a dict of this method's own layout."""

    description = "MoCo-style toy: a key queue and a momentum key head (a test's method)"
    weights = (1.0, 0.0, 1.0)

    def modules(self, config, s_shapes, t_shapes):
        return {"query": (nn.Dense(DIM), (jnp.zeros((1, s_shapes[-1][-1])),)),
                "key": (nn.Dense(DIM), (jnp.zeros((1, t_shapes[-1][-1])),))}

    def method_state(self, config, key, n_data, variables):
        queue = _normalise(jax.random.normal(key, (QUEUE, DIM)))
        return {"queue": queue, "ptr": jnp.zeros((), jnp.int32),
                "key_params": jax.tree.map(jnp.copy, variables["key"]["params"])}

    def method_state_spec(self, config, axis_name):
        return P()

    def after_update(self, config, method_state, params):
        moved = jax.tree.map(lambda e, p: MOMENTUM * e + (1 - MOMENTUM) * p, method_state["key_params"],
                             params["key"])
        return {**method_state, "key_params": moved}

    def term(self, inputs: StepInputs) -> Term:
        st = inputs.method_state
        q = _normalise(inputs.modules["query"].apply({"params": inputs.params["query"]},
                                                     inputs.s_feats[-1].astype(jnp.float32)))
        k = _normalise(inputs.modules["key"].apply({"params": st["key_params"]}, inputs.t_feats[-1]))
        k = jax.lax.stop_gradient(k)
        # the trained key head gets a gradient too, so that its EMA copy has something to follow
        k_live = _normalise(inputs.modules["key"].apply({"params": inputs.params["key"]}, inputs.t_feats[-1]))
        pos = jnp.sum(q * k, -1, keepdims=True) / TAU
        neg = q @ st["queue"].T / TAU
        logits = jnp.concatenate([pos, neg], -1)
        # global-batch means (the same on every device), and the global batch's keys, typed device-invariant so
        # that the replicated state can hold them
        nce = jax.lax.pmean(jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), inputs.axis_name)
        align = jax.lax.pmean(jnp.mean(jnp.sum((k_live - k) ** 2, -1)), inputs.axis_name)
        keys = losses.gather(k, inputs.axis_name)
        rows = (st["ptr"] + jnp.arange(keys.shape[0])) % QUEUE
        new = {**st, "queue": st["queue"].at[rows].set(keys), "ptr": (st["ptr"] + keys.shape[0]) % QUEUE}
        return Term(nce + align, {self.name: nce}, {}, new)


@pytest.fixture
def toy_moco():
    distillers.names()  # the package's own methods first
    distillers.register("toy_moco", ToyMoCo())
    yield "toy_moco"
    distillers._REGISTRY.pop("toy_moco")  # noqa: SLF001


def test_a_moco_style_method_defined_outside_the_package_runs_with_its_own_state(small_teachers, toy_moco):
    config = small_distill_config(toy_moco, small_teachers, num_devices=1)
    assert "toy_moco" not in open(distill.__file__, encoding="utf-8").read()
    metrics, states = first_steps(config, num_steps=3, states=True)
    batch = config.batch_size
    for i, (before, after) in enumerate(zip(states, states[1:]), 1):
        mb, ma = before.method, after.method
        assert set(ma) == {"queue", "ptr", "key_params"}  # the distiller's own layout, untouched by the engine
        assert int(ma["ptr"]) == (i * batch) % QUEUE
        written = (int(mb["ptr"]) + np.arange(batch)) % QUEUE
        kept = np.setdiff1d(np.arange(QUEUE), written)
        np.testing.assert_array_equal(ma["queue"][kept], mb["queue"][kept])
        np.testing.assert_allclose(np.linalg.norm(ma["queue"][written], axis=-1), 1.0, atol=1e-5)
        assert not np.allclose(ma["queue"][written], mb["queue"][written])
        # the hook ran after the optimizer step: the momentum copy moved towards the head the step trained
        expected = jax.tree.map(lambda e, p: MOMENTUM * np.asarray(e) + (1 - MOMENTUM) * np.asarray(p),
                                mb["key_params"], after.params["key"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ma["key_params"], expected)
        assert not np.array_equal(after.params["key"]["kernel"], before.params["key"]["kernel"])
    assert all(np.isfinite(m["toy_moco"]) and m["toy_moco"] > 0 for m in metrics)  # logged as train/toy_moco


def test_a_plugin_methods_run_is_checkpointed_with_its_state_and_its_student_read_back(small_teachers, toy_moco,
                                                                                      tmp_path):
    config = small_distill_config(toy_moco, small_teachers, num_devices=1)
    workdir = str(tmp_path / "run")
    result = distill.distill_and_evaluate(config, workdir)
    saved = checkpoint.load_state(workdir)
    steps = config.dataset.num_train // config.batch_size
    assert int(saved["method"]["ptr"]) == (steps * config.batch_size) % QUEUE
    assert saved["method"]["queue"].shape == (QUEUE, DIM)
    net = rundir.load_network(workdir)  # the tools need to know nothing of the method
    jax.tree.map(np.testing.assert_array_equal, net.variables["params"], saved["params"]["student"])
    assert 0.0 <= result["eval/top1"] <= 1.0
