"""The teacher train step, data parallelism, checkpoints and resume."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax import checkpoint, configs, core, data, feeds, loop, metrics, models, optim, parallel, train


def tiny_config(**overrides):
    c = configs.teacher_config("resnet8")
    c.dataset.name = "synthetic"
    c.dataset.num_train = 96
    c.dataset.num_test = 40
    c.dataset.image_size = 16
    c.dataset.num_classes = 4
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 2
    c.log_every_steps = 2
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c


def _setup(config, num_devices):
    mesh = parallel.make_mesh(num_devices)
    ds = data.load(config.dataset, config.seed)
    model = models.get_model(config.model, ds.num_classes, axis_name=parallel.AXIS)
    tx = optim.make_optimizer(config, 10)
    state = train.create_train_state(jax.random.PRNGKey(0), model, tx, ds.image_shape)
    feed = feeds.InMemoryFeed(ds, mesh, config.batch_size, config.eval_batch_size)
    run = feed.make_runner(functools.partial(train.train_step, model=model, tx=tx), jnp.float32)
    return mesh, ds, parallel.replicate(state, mesh), run, feed.images, feed.labels


def test_sgd_matches_pytorch_update_rule():
    """v = mu*v + (g + wd*p); p -= lr*v, with lr stepping down after the decay epochs."""
    config = tiny_config(learning_rate=0.1, weight_decay=0.01, momentum=0.9, lr_decay_epochs=(1,), lr_decay_rate=0.1,
                         lr_schedule_epochs=0)
    tx = optim.make_optimizer(config, steps_per_epoch=2)
    p = jnp.asarray([1.0, -2.0])
    state = tx.init(p)
    v, p_ref = np.zeros(2), np.asarray([1.0, -2.0])
    for step, g in enumerate([np.asarray([0.5, 0.1]), np.asarray([-0.2, 0.3]), np.asarray([0.4, 0.4])]):
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
        lr = 0.1 if step < 2 else 0.01
        v = 0.9 * v + (g + 0.01 * p_ref)
        p_ref = p_ref - lr * v
        np.testing.assert_allclose(p, p_ref, rtol=1e-6)


def test_learning_rate_schedule_is_repdistillers_and_scales_with_the_run():
    config = configs.teacher_config("resnet8")
    sched = optim.learning_rate_schedule(config, steps_per_epoch=10)
    # Epochs count from 1 in RepDistiller: epoch 151 (steps 1500..1509) is the first at lr/10.
    assert [float(sched(s)) for s in (0, 1499, 1500, 1799, 1800, 2100)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005])
    assert optim.decay_epochs(config) == (150, 180, 210)
    config.num_epochs = 24
    assert optim.decay_epochs(config) == (15, 18, 21)
    config.lr_schedule_epochs = 0
    assert optim.decay_epochs(config) == (150, 180, 210)
    config.lr_schedule_epochs, config.num_epochs = 240, 1
    sched = optim.learning_rate_schedule(config, steps_per_epoch=8)  # decays inside the single epoch
    assert [float(sched(s)) for s in (4, 5, 6, 7)] == pytest.approx([0.05, 0.005, 0.0005, 0.00005])
    assert configs.teacher_config("ShuffleV2").learning_rate == 0.01


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    config = tiny_config()
    _, _, state, run, images, labels = _setup(config, 1)
    idx = jnp.tile(jnp.arange(16, dtype=jnp.int32)[None], (25, 1))  # the same 16 examples, 25 steps
    state, metrics = run(state, images, labels, idx)
    losses = np.asarray(metrics["loss"])
    assert losses.shape == (25,)
    assert losses[-3:].mean() < 0.7 * losses[:3].mean(), losses
    assert int(state.step) == 25


def test_four_devices_match_one_device():
    """Same global batch: sync BN and averaged gradients make 4 devices compute what 1 device does."""
    config = tiny_config()
    order = feeds.epoch_order(jax.random.PRNGKey(0), 0, 96, 3, 16)
    results = []
    for n in (1, 4):
        mesh, _, state, run, images, labels = _setup(config, n)
        state, metrics = run(state, images, labels, parallel.shard_batch(order, mesh, P(None, "data")))
        results.append((jax.device_get(state), np.asarray(metrics["loss"])))
    (s1, l1), (s4, l4) = results
    np.testing.assert_allclose(l1, l4, rtol=2e-5)
    flat1, flat4 = jax.tree.leaves((s1.params, s1.batch_stats)), jax.tree.leaves((s4.params, s4.batch_stats))
    for a, b in zip(flat1, flat4):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_that_does_not_divide_by_devices_is_an_error(tmp_path):
    with pytest.raises(core.ConfigError, match="multiple of the device count"):
        train.train_and_evaluate(tiny_config(batch_size=18, num_devices=4), str(tmp_path))


def test_unknown_model_names_the_valid_ones(tmp_path):
    with pytest.raises(core.ConfigError, match="resnet8x4"):
        train.train_and_evaluate(tiny_config(model="resnet9"), str(tmp_path))


def _weights(workdir):
    return jax.tree.leaves(checkpoint.load_variables(workdir))


def test_run_writes_metrics_config_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(tiny_config(), workdir)
    assert set(result) == {"eval/loss", "eval/top1", "eval/top5"}
    events = metrics.read_metrics(workdir)
    train_events = [e for e in events if "train/loss" in e]
    eval_events = [e for e in events if "eval/top1" in e]
    assert [e["epoch"] for e in eval_events] == [1, 2] and eval_events[-1]["step"] == 12
    assert {"train/loss", "train/ce", "train/lr", "train/img_per_s", "train/top1", "epoch"} <= set(train_events[0])
    assert all(0.0 <= e["eval/top1"] <= e["eval/top5"] <= 1.0 for e in eval_events)
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "last"))) == ["12", "6"]
    assert checkpoint.load_meta(workdir)["epoch"] == 2


def test_resume_mid_epoch_gives_the_same_weights(tmp_path):
    """A run that loses everything after a mid-epoch checkpoint resumes there and ends bit-identical."""
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(tiny_config(), straight)

    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=4, keep_checkpoints=10), resumed)
    last = os.path.join(resumed, "checkpoints", "last")
    assert "8" in os.listdir(last)  # step 8 = epoch 2, step 2 of 6
    for name in os.listdir(last):  # "crash" right after the step-8 checkpoint
        if name.isdigit() and int(name) > 8:
            shutil.rmtree(os.path.join(last, name))
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=4, keep_checkpoints=10), resumed)
    assert checkpoint.load_meta(resumed)["epoch"] == 2
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_is_written_once_the_minutes_since_the_last_have_passed(tmp_path, monkeypatch, caplog):
    """checkpoint_every_minutes: inside an epoch, a checkpoint once that much time has passed since the run's start
    or its last checkpoint (an epoch end's included). The clock here moves 0.3 min at each reading: one at the start,
    one per dispatch, one per checkpoint."""
    minutes = iter(range(1000))
    monkeypatch.setattr(loop._CheckpointClock, "now", staticmethod(lambda: 18.0 * next(minutes)))
    workdir = str(tmp_path / "run")
    with caplog.at_level("INFO", logger="wcord_jax"):
        train.train_and_evaluate(tiny_config(checkpoint_every_minutes=1, keep_checkpoints=10), workdir)
    # 0.3, 0.6, 0.9, 1.2 min after the start: step 4; from there 0.3 (step 5), then the epoch ends at step 6 and
    # its checkpoint restarts the clock; epoch 2 likewise: step 10.
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints", "last"))) == [4, 6, 10, 12]
    assert "checkpoint at step 4 (epoch 1, step 4 of 6; one per 1 min of training)" in caplog.text
