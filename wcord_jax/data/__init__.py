"""Data sets for wcord_jax: which source to read and how to shape it for training.

`load(config.dataset, seed)` returns a `DataSet`: for the small data sets (CIFAR, Fashion-MNIST, synthetic) both splits
as uint8 arrays that the trainer puts on the accelerator once and augments there; for ImageNet a description that the
trainer streams through tf.data (`wcord_jax.data.imagenet`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from wcord_jax.data import sources
from wcord_jax.data.sources import SOURCES, ArrayData, DataNotFoundError

__all__ = ["DataSet", "DataNotFoundError", "SOURCES", "load", "ArrayData"]


@dataclasses.dataclass(frozen=True)
class DataSet:
    """What the trainer needs to know about a data set.

    `train`/`test` hold the arrays for in-memory data sets and are None for streamed ones (ImageNet).
    `mean`/`std` are per-channel, in pixel units. `augment` says whether the on-device crop+flip applies.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: np.ndarray
    std: np.ndarray
    train: Optional[ArrayData] = None
    test: Optional[ArrayData] = None
    data_dir: Optional[str] = None

    @property
    def in_memory(self) -> bool:
        return self.train is not None


def _pad_to_32(data: ArrayData) -> ArrayData:
    """Zero-pads 28x28 images to 32x32 (2 pixels each side) so the CIFAR architectures apply unchanged."""
    pad = (32 - data.images.shape[1]) // 2
    images = np.pad(data.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return ArrayData(images, data.labels)


def _fashion_mnist(cfg) -> tuple[ArrayData, ArrayData]:
    explicit = cfg.get("data_dir")
    if explicit and sources.has_idx_files(explicit):
        directory = explicit
    elif sources.tfds_prepared("fashion_mnist", explicit):
        return (sources.tfds_arrays("fashion_mnist", "train", explicit, False, cfg.get("num_train")),
                sources.tfds_arrays("fashion_mnist", "test", explicit, False, cfg.get("num_test")))
    elif explicit is None and sources.has_idx_files(sources.FASHION_MNIST_IDX_DIR):
        directory = sources.FASHION_MNIST_IDX_DIR
    elif cfg.get("download", False):
        return (sources.tfds_arrays("fashion_mnist", "train", explicit, True, cfg.get("num_train")),
                sources.tfds_arrays("fashion_mnist", "test", explicit, True, cfg.get("num_test")))
    else:
        raise DataNotFoundError(sources.how_to_get("fashion_mnist", explicit))
    train = sources.fashion_mnist_idx(directory, "train").take(cfg.get("num_train"))
    test = sources.fashion_mnist_idx(directory, "test").take(cfg.get("num_test"))
    return train, test


def load(cfg, seed: int = 0) -> DataSet:
    """Reads the data set that `cfg` (the config's `dataset` block) names. Raises ValueError / DataNotFoundError."""
    name = cfg.name
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(SOURCES)}")
    data_dir = cfg.get("data_dir")
    if name == "imagenet2012":
        from wcord_jax.data import imagenet

        try:
            num_train = cfg.get("num_train") or imagenet.num_examples("train", data_dir)
            num_test = cfg.get("num_test") or imagenet.num_examples("validation", data_dir)
        except DataNotFoundError:
            raise
        except Exception as e:
            raise DataNotFoundError(sources.how_to_get(name, data_dir)) from e
        mean, std = sources.normalization(name, 3)
        return DataSet(name, 1000, (224, 224, 3), num_train, num_test, mean, std, data_dir=data_dir)

    if name == "synthetic":
        shape = (cfg.image_size, cfg.num_channels, cfg.num_classes)
        train = sources.synthetic(cfg.num_train or 1024, *shape, seed=seed + 1, template_seed=seed)
        test = sources.synthetic(cfg.num_test or 256, *shape, seed=seed + 2, template_seed=seed)
        num_classes = cfg.num_classes
    elif name == "fashion_mnist":
        train, test = _fashion_mnist(cfg)
        train, test = _pad_to_32(train), _pad_to_32(test)
        num_classes = sources.NUM_CLASSES[name]
    else:
        download = cfg.get("download", False)
        if not download and not sources.tfds_prepared(name, data_dir):
            raise DataNotFoundError(sources.how_to_get(name, data_dir))
        train = sources.tfds_arrays(name, "train", data_dir, download, cfg.get("num_train"))
        test = sources.tfds_arrays(name, "test", data_dir, download, cfg.get("num_test"))
        num_classes = sources.NUM_CLASSES[name]
    shape = tuple(int(d) for d in train.images.shape[1:])
    mean, std = sources.normalization(name, shape[-1])
    return DataSet(name, num_classes, shape, len(train), len(test), mean, std, train, test, data_dir)
