"""Data sources and on-device augmentation."""
import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax import configs, data
from wcord_jax.data import augment, sources
from wcord_jax import feeds


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def _cfg(**kw):
    cfg = configs.dataset_config()
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_idx_reader_round_trip(idx_dir):
    with gzip.open(idx_dir / "train-images-idx3-ubyte.gz") as f:
        images = sources.read_idx(f)
    rng = np.random.default_rng(0)
    assert np.array_equal(images, rng.integers(0, 256, (20, 28, 28)).astype(np.uint8))


def test_fashion_mnist_from_idx_dir_is_padded_to_32(idx_dir):
    ds = data.load(_cfg(name="fashion_mnist", data_dir=str(idx_dir)))
    assert ds.in_memory and ds.num_classes == 10
    assert ds.train.images.shape == (20, 32, 32, 1) and ds.test.images.shape == (8, 32, 32, 1)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    # 2-pixel zero border around the original 28x28 image.
    assert not ds.train.images[:, :2].any() and not ds.train.images[:, -2:].any()
    assert not ds.train.images[:, :, :2].any() and not ds.train.images[:, :, -2:].any()
    with gzip.open(idx_dir / "train-images-idx3-ubyte.gz") as f:
        raw = sources.read_idx(f)
    assert np.array_equal(ds.train.images[:, 2:30, 2:30, 0], raw)


def test_num_train_caps_real_data(idx_dir):
    ds = data.load(_cfg(name="fashion_mnist", data_dir=str(idx_dir), num_train=5, num_test=3))
    assert ds.num_train == 5 and ds.num_test == 3


@pytest.mark.skipif(not sources.has_idx_files(sources.FASHION_MNIST_IDX_DIR),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_offline():
    ds = data.load(_cfg(name="fashion_mnist", num_train=1000, num_test=500))
    assert ds.train.images.shape == (1000, 32, 32, 1)
    assert set(np.unique(ds.train.labels)) == set(range(10))
    assert 0.2 < ds.train.images[:, 2:30, 2:30].mean() / 255 < 0.4  # Fashion-MNIST's mean pixel is about 0.286


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="dataset-fashion-mnist"):
        data.load(_cfg(name="fashion_mnist", data_dir=str(tmp_path), download=False))
    with pytest.raises(data.DataNotFoundError, match="tfds build cifar100"):
        data.load(_cfg(name="cifar100", data_dir=str(tmp_path), download=False))


def test_unknown_data_set_names_the_valid_ones():
    with pytest.raises(ValueError, match="cifar100, cifar10, imagenet2012, fashion_mnist, synthetic"):
        data.load(_cfg(name="mnist"))


def test_synthetic_is_seeded_and_shaped():
    cfg = _cfg(name="synthetic", num_train=50, num_test=10, image_size=16, num_channels=2, num_classes=7)
    a, b, c = data.load(cfg, seed=1), data.load(cfg, seed=1), data.load(cfg, seed=2)
    assert a.train.images.shape == (50, 16, 16, 2) and a.image_shape == (16, 16, 2)
    assert a.train.labels.max() < 7 and a.num_classes == 7
    assert np.array_equal(a.train.images, b.train.images) and not np.array_equal(a.train.images, c.train.images)


def test_synthetic_is_its_documented_formula_across_chunks():
    """Every example is (3 template + noise) // 4 from numpy's default generator, the depth feature the same with the
    noise averaged over channels: written out here in int64, over a set of several of the source's chunks."""
    n, size, channels, classes, seed, template_seed = 2 * sources._SYNTHETIC_CHUNK + 37, 8, 3, 5, 4, 9  # noqa: SLF001
    templates = np.random.default_rng(template_seed).integers(0, 256, size=(classes, size, size, channels))
    depth_templates = np.random.default_rng(template_seed + 1_000_003).integers(0, 256, size=(classes, size, size, 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(n,), dtype=np.int32)
    noise = rng.integers(0, 256, size=(n, size, size, channels))
    got = sources.synthetic(n, size, channels, classes, seed, template_seed)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.images, ((3 * templates[labels] + noise) // 4).astype(np.uint8))
    depth = (3 * depth_templates[labels] + noise.mean(-1, keepdims=True)) // 4
    np.testing.assert_array_equal(got.features["depth"], depth.astype(np.uint8))
    assert got.images.dtype == got.features["depth"].dtype == np.uint8


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    image = jnp.asarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3)), jnp.uint8)  # no zeros inside
    padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    out = np.asarray(augment.augment_batch(keys, jnp.broadcast_to(image, (200, 8, 8, 3))))
    seen_offsets, flips = set(), 0
    for o in out:
        match = None
        for flipped in (False, True):
            cand = o[:, ::-1] if flipped else o
            for dy in range(9):
                for dx in range(9):
                    if np.array_equal(padded[dy:dy + 8, dx:dx + 8], cand):
                        match = (dy, dx, flipped)
        assert match is not None, "output is not a crop (optionally flipped) of the zero-padded image"
        seen_offsets.add(match[:2])
        flips += match[2]
    assert len(seen_offsets) > 40  # all 81 offsets are possible; 200 draws cover most
    assert 60 < flips < 140  # about half are flipped


def test_normalize_uses_per_channel_statistics():
    mean, std = sources.normalization("cifar100", 3)
    x = jnp.full((1, 2, 2, 3), 128, jnp.uint8)
    out = np.asarray(augment.normalize(x, mean, std))
    np.testing.assert_allclose(out[0, 0, 0], (128 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(mean / 255, (0.5071, 0.4867, 0.4408), rtol=1e-6)


def test_epoch_order_is_a_seeded_permutation():
    rng = jax.random.PRNGKey(3)
    a = feeds.epoch_order(rng, 0, 100, 6, 16)
    assert a.shape == (6, 16) and len(np.unique(a)) == 96 and a.max() < 100
    assert np.array_equal(a, feeds.epoch_order(rng, 0, 100, 6, 16))
    assert not np.array_equal(a, feeds.epoch_order(rng, 1, 100, 6, 16))


def test_device_batch_carries_indices_and_is_reproducible():
    ds = data.load(_cfg(name="synthetic", num_train=40, num_test=8), seed=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    idx = jnp.asarray([3, 17, 5, 0], jnp.int32)

    @jax.jit  # one compilation for the three batches
    def get(rng, step):
        fn = lambda: feeds.device_batch(rng, step, jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels), idx,
                                        mean=jnp.asarray(ds.mean), std=jnp.asarray(ds.std), dtype=jnp.float32,
                                        augment=True)
        return jax.shard_map(fn, mesh=mesh, in_specs=(), out_specs=jax.sharding.PartitionSpec("data"))()

    b1, b2, b3 = get(jax.random.PRNGKey(0), 1), get(jax.random.PRNGKey(0), 1), get(jax.random.PRNGKey(0), 2)
    assert np.array_equal(b1["index"], idx) and np.array_equal(b1["label"], ds.train.labels[np.asarray(idx)])
    assert b1["image"].shape == (4, 32, 32, 3) and b1["image"].dtype == jnp.float32
    np.testing.assert_array_equal(b1["image"], b2["image"])
    assert not np.array_equal(b1["image"], b3["image"])  # another step draws other crops
