"""The worked example of a one-file distiller (`wcord_jax/distillers/lskd.py`): its loss against numpy, on 1 and 4
devices, and a run of it from the command line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax import distillers, parallel
from wcord_jax.distillers.lskd import lskd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy_lskd(s, t, temperature):
    def z(x):
        x = x.astype(np.float64)
        return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-7)

    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    ls, lt = log_softmax(z(s) / temperature), log_softmax(z(t) / temperature)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), 1)) * temperature ** 2)


def test_lskd_loss_matches_numpy_and_ignores_logit_scale():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(16, 10)).astype(np.float32)
    t = (5.0 * rng.normal(size=(16, 10)) + 3.0).astype(np.float32)
    for temperature in (1.0, 2.0, 4.0):
        np.testing.assert_allclose(float(lskd_loss(jnp.asarray(s), jnp.asarray(t), temperature)),
                                   _numpy_lskd(s, t, temperature), rtol=1e-5)
    # The point of the method: a student whose logits are the teacher's up to scale and shift has (almost) no loss.
    assert float(lskd_loss(jnp.asarray(0.1 * t - 7.0), jnp.asarray(t))) < 1e-6
    assert float(lskd_loss(jnp.asarray(s), jnp.asarray(t))) > 0.1


def test_lskd_loss_on_four_devices_equals_one():
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.normal(size=(16, 10)), jnp.float32) for _ in range(2))
    mesh = parallel.make_mesh(4)

    def sharded(a, b):
        return jax.shard_map(lambda x, y: lskd_loss(x, y, 2.0, axis_name="data"), mesh=mesh,
                             in_specs=(P("data"), P("data")), out_specs=P())(a, b)

    np.testing.assert_allclose(float(jax.jit(sharded)(s, t)), float(lskd_loss(s, t, 2.0)), rtol=1e-6)


@pytest.mark.slow
def test_lskd_is_registered_and_runs_from_the_command_line(small_teachers, tmp_path):
    assert "lskd" in distillers.names() and distillers.get("lskd").weights == (0.1, 0.0, 9.0)
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/distill.py:lskd,resnet8x4,resnet8",
           "--workdir", str(tmp_path), f"--config.teacher.checkpoint={small_teachers['resnet8x4']}",
           "--config.dataset.name=synthetic", "--config.dataset.num_train=64", "--config.dataset.num_test=32",
           "--config.dataset.image_size=16", "--config.dataset.num_classes=4", "--config.num_epochs=1",
           "--config.batch_size=16", "--config.eval_batch_size=16", "--config.log_every_steps=1",
           "--config.progress_bar=False", "--config.lskd.temperature=3.0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1 "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    steps = [e for e in events if "train/lskd" in e]
    assert len(steps) == 4 and any("eval/top1" in e for e in events)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["lskd"]["temperature"] == 3.0
    for e in steps:  # the run's loss is gamma * CE + beta * LSKD with the method's weights
        np.testing.assert_allclose(e["train/loss"], 0.1 * e["train/ce"] + 9.0 * e["train/lskd"], rtol=1e-5)
