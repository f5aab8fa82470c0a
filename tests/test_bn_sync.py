"""bn_sync='local': each device normalises with its own shard's BatchNorm statistics (flax's ImageNet example) and
the running averages are averaged over the devices after every step. Checked against one-device steps on each
device's shard; 'global' (the default) keeps its 1 = D equality (tests/test_train.py, tests/test_distill.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import shrink
from wcord_jax import configs, core, data, distill, feeds, models, optim, parallel, train
from wcord_jax.core import ConfigError


def _step(config, num_devices, batch_size, idx):
    """One train step without augmentation on `num_devices`; (host state, host loss)."""
    mesh = parallel.make_mesh(num_devices)
    ds = data.load(config.dataset, config.seed)
    model = models.get_model(config.model, ds.num_classes, axis_name=core.bn_axis(config))
    tx = optim.make_optimizer(config, 10)
    state = parallel.replicate(train.create_train_state(jax.random.PRNGKey(0), model, tx, ds.image_shape), mesh)
    feed = feeds.InMemoryFeed(ds, mesh, batch_size, batch_size)
    step = functools.partial(train.train_step, model=model, tx=tx, local_bn=core.bn_axis(config) is None)
    run = feed.make_runner(step, jnp.float32, augment=False)
    state, metrics = run(state, feed.images, feed.labels, parallel.shard_batch(idx[None], mesh, P(None, "data")))
    return jax.device_get(state), float(np.asarray(metrics["loss"]).reshape(-1)[0])


def test_local_statistics_on_two_devices_are_the_mean_of_each_shard_s_one_device_step():
    config = shrink(configs.teacher_config("resnet8"), bn_sync="local")
    idx = np.arange(16, dtype=np.int32)
    two, loss2 = _step(config, 2, 16, idx)
    halves = [_step(config, 1, 8, idx[h * 8:(h + 1) * 8]) for h in (0, 1)]
    np.testing.assert_allclose(loss2, np.mean([l for _, l in halves]), rtol=1e-5)
    for got, *want in zip(jax.tree.leaves(two.batch_stats), *[jax.tree.leaves(s.batch_stats) for s, _ in halves]):
        np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=1e-5, atol=1e-6)
    # The first update is affine in the gradient, and the gradient is the halves' mean.
    for got, *want in zip(jax.tree.leaves(two.params), *[jax.tree.leaves(s.params) for s, _ in halves]):
        np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=1e-4, atol=1e-6)
    # ... which is not the global statistics' step: the setting changes what is computed.
    glob, loss_global = _step(shrink(configs.teacher_config("resnet8")), 2, 16, idx)
    assert abs(loss_global - loss2) > 1e-6


def test_one_device_computes_the_same_step_either_way():
    """(To float32 rounding: flax's BatchNorm reduces its statistics in another order when it has an axis.)"""
    idx = np.arange(16, dtype=np.int32)
    local, l_loss = _step(shrink(configs.teacher_config("resnet8"), bn_sync="local"), 1, 16, idx)
    glob, g_loss = _step(shrink(configs.teacher_config("resnet8")), 1, 16, idx)
    np.testing.assert_allclose(l_loss, g_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((local.params, local.batch_stats)),
                    jax.tree.leaves((glob.params, glob.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_distillation_with_local_statistics_runs_on_two_devices(small_teachers, tmp_path):
    from conftest import small_distill_config

    config = small_distill_config("crd", small_teachers, num_devices=2, bn_sync="local")
    result = distill.distill_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["eval/loss"]) and 0.0 <= result["eval/top1"] <= 1.0


def test_an_unknown_bn_sync_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="bn_sync must be one of global, local, got 'per_device'"):
        train.train_and_evaluate(shrink(configs.teacher_config("resnet8"), bn_sync="per_device"), str(tmp_path))
