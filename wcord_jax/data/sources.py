"""Where examples come from: TFDS, Fashion-MNIST idx files, or a seeded synthetic set.

Small data sets are loaded whole into host memory as uint8 arrays (`ArrayData`) and later put on the accelerator once.
TensorFlow and TFDS are imported only when a TFDS source is actually read, so the synthetic and idx paths run
without them.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Optional

import numpy as np

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# Per-channel mean / std of the training images, as fractions of 255.
NORMALIZATION = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # RepDistiller's values
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": (None, None),  # 0.5 / 0.5 for every channel
}

NUM_CLASSES = {"cifar100": 100, "cifar10": 10, "fashion_mnist": 10, "imagenet2012": 1000}

# Data sets small enough to live on the accelerator for the whole run; the rest stream through tf.data.
IN_MEMORY = ("cifar100", "cifar10", "fashion_mnist", "synthetic")
SOURCES = ("cifar100", "cifar10", "imagenet2012", "fashion_mnist", "synthetic")


class DataNotFoundError(RuntimeError):
    """A data set could not be found; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class ArrayData:
    """One split held in host memory. `images` uint8 [N, H, W, C]; `labels` int32 [N]; `features` further
    per-example arrays [N, H, W, C'] of the data set (a second modality, e.g. 'depth'), by name.

    The data-set index of an example is its row number.
    """

    images: np.ndarray
    labels: np.ndarray
    features: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: Optional[int]) -> "ArrayData":
        if n is None or n >= len(self):
            return self
        return self.rows(slice(0, n))

    def rows(self, which) -> "ArrayData":
        """The examples `which` (a slice, indices or a boolean mask), with their features."""
        return ArrayData(self.images[which], self.labels[which], {k: v[which] for k, v in self.features.items()})


def normalization(name: str, num_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (in pixel units, 0..255) to normalise images of data set `name`."""
    mean, std = NORMALIZATION.get(name, (None, None))
    if mean is None:
        mean, std = (0.5,) * num_channels, (0.5,) * num_channels
    return np.asarray(mean, np.float32) * 255.0, np.asarray(std, np.float32) * 255.0


# --------------------------------------------------------------------------------------------------------------------
# Synthetic


_SYNTHETIC_CHUNK = 1024


def synthetic(num_examples: int, image_size: int, num_channels: int, num_classes: int, seed: int,
              template_seed: int = 0) -> ArrayData:
    """Seeded random images and labels, for tests and benchmarks.

    Each class has a random template image (drawn from `template_seed`, so the train and test splits share them);
    an example is 3/4 its class template plus 1/4 uniform noise. The labels are therefore learnable, which lets
    tests see a network and its distillation losses improve. A second modality, the 1-channel feature 'depth', is
    3/4 another class template plus 1/4 the example's noise averaged over channels (for cross-modal runs:
    `feature:depth`).
    """
    shape = (image_size, image_size)
    three_t = 3 * np.random.default_rng(template_seed).integers(0, 256, size=(num_classes, *shape, num_channels))
    three_d = 3 * np.random.default_rng(template_seed + 1_000_003).integers(0, 256, size=(num_classes, *shape, 1))
    three_t = three_t.astype(np.uint16)  # (3 t + n) // 4 <= 1020
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=(num_examples,), dtype=np.int32)
    images = np.empty((num_examples, *shape, num_channels), np.uint8)
    depth = np.empty((num_examples, *shape, 1), np.uint8)
    # In chunks of small integers, written once into the outputs (a 50,000-image set in about a second where fresh
    # memory is slow to touch): numpy draws the same values below 2**32 as int32 as it does as int64, chunk by chunk.
    for lo in range(0, num_examples, _SYNTHETIC_CHUNK):
        hi = min(lo + _SYNTHETIC_CHUNK, num_examples)
        noise = rng.integers(0, 256, size=(hi - lo, *shape, num_channels), dtype=np.int32).astype(np.uint16)
        images[lo:hi] = (three_t[labels[lo:hi]] + noise) >> 2
        noise_mean = noise.sum(-1, keepdims=True, dtype=np.uint16) / float(num_channels)
        depth[lo:hi] = (three_d[labels[lo:hi]] + noise_mean) // 4
    return ArrayData(images, labels, {"depth": depth})


# --------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST idx files

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_maybe_gz(directory: str, stem: str):
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    return None


def read_idx(stream) -> np.ndarray:
    """Parses one idx file (the MNIST format: magic, dims, big-endian uint8 payload)."""
    zero, dtype_code, ndim = struct.unpack(">HBB", stream.read(4))
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"not a uint8 idx file (magic {zero:#x}, type {dtype_code:#x})")
    shape = struct.unpack(">" + "I" * ndim, stream.read(4 * ndim))
    data = np.frombuffer(stream.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"idx file truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def has_idx_files(directory: Optional[str]) -> bool:
    if not directory or not os.path.isdir(directory):
        return False
    return all(
        any(os.path.exists(os.path.join(directory, s + ext)) for ext in ("", ".gz"))
        for pair in _IDX_FILES.values()
        for s in pair
    )


def fashion_mnist_idx(directory: str, split: str) -> ArrayData:
    """Reads Fashion-MNIST from its four idx files (plain or gzipped); images become [N, 28, 28, 1]."""
    image_stem, label_stem = _IDX_FILES[split]
    with _open_maybe_gz(directory, image_stem) as f:
        images = read_idx(f)
    with _open_maybe_gz(directory, label_stem) as f:
        labels = read_idx(f)
    return ArrayData(images[..., None], labels.astype(np.int32))


# --------------------------------------------------------------------------------------------------------------------
# TFDS


def tfds_prepared(name: str, data_dir: Optional[str]) -> bool:
    """True if a prepared TFDS copy of `name` exists (checked on disk, without importing TFDS)."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    base = os.path.join(root, name)
    if not os.path.isdir(base):
        return False
    for version in os.listdir(base):
        if os.path.exists(os.path.join(base, version, "dataset_info.json")):
            return True
    return False


def how_to_get(name: str, data_dir: Optional[str]) -> str:
    where = data_dir or "~/tensorflow_datasets"
    if name == "imagenet2012":
        return (f"imagenet2012 was not found under {where}: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                f"from image-net.org into {where}/downloads/manual/, then run "
                f"`tfds build imagenet2012 --data_dir {where}` (or pass --config.dataset.data_dir=DIR)")
    msg = (f"{name} was not found under {where}: on a machine with internet run `tfds build {name} --data_dir {where}` "
           f"(or pass --config.dataset.download=True and it is fetched on first use)")
    if name == "fashion_mnist":
        msg += (f"; offline, install the Debian package dataset-fashion-mnist (idx files in {FASHION_MNIST_IDX_DIR}) "
                f"or point --config.dataset.data_dir at a folder holding the four idx files")
    return msg


def tfds_arrays(name: str, split: str, data_dir: Optional[str], download: bool, num: Optional[int],
                features: tuple = ()) -> ArrayData:
    """Loads a whole split of a small TFDS data set into memory, in TFDS's deterministic file order, with the
    further per-example `features` (by TFDS feature name; [N, H, W] arrays get a channel axis)."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - exercised only without TF installed
        raise DataNotFoundError(
            f"reading {name} needs tensorflow-datasets and tensorflow-cpu (`pip install tensorflow-datasets "
            f"tensorflow-cpu`): {e}") from e
    tf.config.set_visible_devices([], "GPU")
    sub = split if num is None else f"{split}[:{num}]"
    try:
        ds = tfds.load(name, split=sub, data_dir=data_dir, download=download, try_gcs=False, batch_size=-1,
                       shuffle_files=False)
    except Exception as e:  # TFDS raises AssertionError / DatasetNotFoundError / network errors
        raise DataNotFoundError(how_to_get(name, data_dir) + f" ({type(e).__name__})") from e
    arrays = tfds.as_numpy(ds)
    images = np.asarray(arrays["image"], dtype=np.uint8)
    labels = np.asarray(arrays["label"], dtype=np.int32)
    extra = {}
    for feature in features:
        if feature not in arrays:
            raise DataNotFoundError(f"{name} has no feature {feature!r}; its features: {', '.join(sorted(arrays))}")
        value = np.asarray(arrays[feature])
        extra[feature] = value[..., None] if value.ndim == 3 else value
    return ArrayData(images, labels, extra)
