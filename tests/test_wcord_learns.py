"""WCoRD's global term learns with the default keys and collapses with keys from the trained heads.

A fixed small problem, on real images so that the heads have something to tell apart: a resnet8 teacher trained for two
epochs on 2,048 Fashion-MNIST images, then 200 WCoRD steps of a fresh resnet8 student (batch 32, queue K = 256, one
device, constant learning rate). Measured over the 20 steps after the queue has filled and over the last 20 steps.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax import configs, data, distill, feeds, parallel, train

N, B, K, STEPS, WINDOW = 2048, 32, 256, 200, 20
FULL = K // B  # the queue is full after this many steps

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                                reason="the Debian package dataset-fashion-mnist is not installed")]


def _small(config):
    config.dataset.name = "fashion_mnist"
    config.dataset.num_train = N
    config.dataset.num_test = 256
    config.batch_size = B
    config.eval_batch_size = 256
    config.num_epochs = 2
    config.progress_bar = False
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fmnist_teacher"))
    train.train_and_evaluate(_small(configs.teacher_config("resnet8")), workdir)
    return workdir


def _history(teacher_dir, **wcord):
    """Per-step metrics of STEPS WCoRD steps with the given wcord.* overrides."""
    config = _small(configs.distill_config("wcord", "resnet8", "resnet8"))
    config.teacher.checkpoint = teacher_dir
    config.lr_schedule_epochs = 0  # the recipe's decay epochs taken as absolute: a constant learning rate here
    config.wcord.num_negatives = K
    for k, v in wcord.items():
        config.wcord[k] = v
    mesh = parallel.make_mesh(1)
    ds = data.load(config.dataset, config.seed)
    feed = feeds.InMemoryFeed(ds, mesh, B, config.eval_batch_size)
    eng = distill.build_engine(config, ds, feed.steps_per_epoch, jnp.float32)
    runner = feed.make_runner(eng.main_step, jnp.float32, num_extra=2, state_spec=eng.spec)
    teacher_vars, class_index = parallel.replicate(eng.teacher_vars, mesh), parallel.replicate(eng.class_index, mesh)
    state = parallel.place(eng.state, mesh, eng.spec)
    history = []
    for step in range(STEPS):
        epoch, i = divmod(step, feed.steps_per_epoch)
        order = feeds.epoch_order(jax.random.PRNGKey(0), epoch, N, feed.steps_per_epoch, B)
        idx = parallel.shard_batch(order[i:i + 1], mesh, P(None, "data"))
        state, m = runner(state, teacher_vars, class_index, feed.images, feed.labels, idx)
        history.append({k: float(np.asarray(v).ravel()[0]) for k, v in jax.device_get(m).items()})
    return history


def _window(history, name):
    """(mean over the 20 steps after the queue filled, mean over the last 20 steps) of a metric."""
    values = np.array([h[name] for h in history])
    return values[FULL:FULL + WINDOW].mean(), values[-WINDOW:].mean()


def test_default_keys_learn_and_trained_keys_collapse(teacher_dir):
    default = _history(teacher_dir)
    ablation = _history(teacher_dir, key_heads="trained", ablation=True)
    cosines = ("emb_teacher_cos", "emb_student_cos")

    # Default (momentum key heads): the global term falls, the heads tell examples apart from the start, and each
    # example's two embeddings end closer than different examples' embeddings.
    first, last = _window(default, "wcord_global")
    assert last < first - 1.0, (first, last)
    for name in cosines:
        early, late = _window(default, name)
        assert early < 0.7 and late < 0.5, (name, early, late)
    assert _window(default, "emb_pos_cos")[1] > max(_window(default, name)[1] for name in cosines) + 0.3

    # Keys from the trained heads, on the same problem: the heads collapse as soon as the queue holds negatives
    # (every pair of examples at cosine ~1), and at the end they are still far more collapsed than the default's.
    for name in cosines:
        early, late = _window(ablation, name)
        assert early > 0.97, (name, early)
        assert late > _window(default, name)[1] + 0.2, (name, late, _window(default, name)[1])
