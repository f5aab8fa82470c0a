"""The streamed (tf.data) feed used for ImageNet, on TFDS mock data: no files, no network."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from wcord_jax import configs, data, feeds, optim, parallel, train  # noqa: E402


class TinyNet(nn.Module):
    """Conv + sync BN + linear head: enough to exercise the feed and the step."""

    num_classes: int = 1000
    axis_name: str = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (7, 7), strides=(8, 8))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        feat = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes)(feat), [feat]


def _imagenet_config():
    cfg = configs.teacher_config("resnet18")
    cfg.dataset.name = "imagenet2012"
    cfg.dataset.num_train = 24
    cfg.dataset.num_test = 12
    cfg.batch_size = 8
    cfg.eval_batch_size = 8
    return cfg


def test_imagenet_batches_are_224_uint8_with_indices():
    cfg = _imagenet_config()
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load(cfg.dataset)
        assert not ds.in_memory and ds.num_classes == 1000 and ds.image_shape == (224, 224, 3)
        feed = feeds.StreamFeed(ds, parallel.make_mesh(1), 8, 8, seed=0)
        batches = [args[0] for _, args in feed.dispatches(jax.random.PRNGKey(0), 0, 0)]
        again = [args[0] for _, args in feed.dispatches(jax.random.PRNGKey(0), 0, 1)]
    assert len(batches) == 3 and len(again) == 2  # resuming at step 1 skips one batch
    b = batches[0]
    assert b["image"].shape == (8, 224, 224, 3) and b["image"].dtype == jnp.uint8
    indices = np.concatenate([np.asarray(x["index"]) for x in batches])
    assert sorted(indices.tolist()) == list(range(24))  # every example once, with its index
    np.testing.assert_array_equal(batches[1]["image"], again[0]["image"])  # same seed and epoch: same batches


def test_the_stream_copies_batches_to_the_devices_ahead_of_their_steps():
    """With prefetch=2 the first dispatch is handed out once three batches are on their way to the devices; the
    batches and their order are those of prefetch=0."""
    cfg = _imagenet_config()
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load(cfg.dataset)
        seen = {}
        for prefetch in (0, 2):
            feed = feeds.StreamFeed(ds, parallel.make_mesh(1), 8, 8, seed=0, prefetch=prefetch)
            copies, to_devices = [], feed._global  # noqa: SLF001

            def counted(batch, copies=copies, to_devices=to_devices):
                copies.append(1)
                return to_devices(batch)

            feed._global = counted  # noqa: SLF001
            stream = feed.dispatches(jax.random.PRNGKey(0), 0, 0)
            first = next(stream)
            assert len(copies) == prefetch + 1
            seen[prefetch] = [first] + list(stream)
            assert len(copies) == 3
    assert [n for n, _ in seen[2]] == [1, 1, 1]
    for (_, (a,)), (_, (b,)) in zip(seen[0], seen[2]):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="prefetch must be at least 0"):
        feeds.StreamFeed(ds, parallel.make_mesh(1), 8, 8, seed=0, prefetch=-1)


def test_streamed_training_and_eval_match_across_device_counts():
    cfg = _imagenet_config()
    losses, evals = [], []
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load(cfg.dataset)
        for n in (1, 4):
            mesh = parallel.make_mesh(n)
            feed = feeds.StreamFeed(ds, mesh, 8, 8, seed=0)
            model = TinyNet(axis_name=parallel.AXIS)
            tx = optim.make_optimizer(cfg, feed.steps_per_epoch)
            state = parallel.replicate(train.create_train_state(jax.random.PRNGKey(0), model, tx, (224, 224, 3)),
                                       mesh)
            run = feed.make_runner(functools.partial(train.train_step, model=model, tx=tx), jnp.float32)
            run_losses = []
            for _, args in feed.dispatches(state.rng, 0, 0):
                state, metrics = run(state, *args)
                run_losses.append(float(metrics["loss"]))
            evaluate = feed.make_evaluator(lambda v, x: model.apply(v, x, train=False)[0], jnp.float32)
            losses.append(run_losses)
            evals.append(evaluate({"params": state.params, "batch_stats": state.batch_stats}))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert set(evals[0]) == {"eval/loss", "eval/top1", "eval/top5"}
    for k in evals[0]:
        np.testing.assert_allclose(evals[0][k], evals[1][k], rtol=1e-4, atol=1e-6)
    assert 0.0 <= evals[0]["eval/top1"] <= evals[0]["eval/top5"] <= 1.0
