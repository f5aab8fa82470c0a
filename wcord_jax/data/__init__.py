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

__all__ = ["DataSet", "DataNotFoundError", "DataConfigError", "SOURCES", "load", "ArrayData", "select_classes"]


class DataConfigError(DataNotFoundError, ValueError):
    """The `dataset` block asks for examples the data set does not have (e.g. a class id out of range)."""


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

    @property
    def feature_shapes(self) -> dict:
        """{name: (H, W, C)} of the further per-example features held (in-memory data sets)."""
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in self.train.features.items()} if self.train else {}


def _pad_to_32(data: ArrayData) -> ArrayData:
    """Zero-pads 28x28 images to 32x32 (2 pixels each side) so the CIFAR architectures apply unchanged."""
    pad = (32 - data.images.shape[1]) // 2
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return ArrayData(np.pad(data.images, widths), data.labels, {k: np.pad(v, widths) for k, v in data.features.items()})


def select_classes(data: ArrayData, classes) -> ArrayData:
    """The examples of `classes` only (in their original order), relabelled: classes[i] becomes label i."""
    classes = np.asarray(classes, np.int64)
    lut = np.full(max(int(classes.max()), int(data.labels.max(initial=0))) + 1, -1, np.int32)
    lut[classes] = np.arange(len(classes), dtype=np.int32)
    keep = np.isin(data.labels, classes)
    kept = data.rows(keep)
    return ArrayData(kept.images, lut[data.labels[keep]], kept.features)


def _check_classes(classes, num_classes: int, name: str) -> tuple[int, ...]:
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
        raise DataConfigError(f"dataset.classes={classes} must be distinct class ids of {name}, which has classes "
                              f"0..{num_classes - 1}")
    return classes


def _fashion_mnist(cfg, num_train, num_test, features=()) -> tuple[ArrayData, ArrayData]:
    explicit = cfg.get("data_dir")
    if explicit and sources.has_idx_files(explicit):
        directory = explicit
    elif sources.tfds_prepared("fashion_mnist", explicit):
        return (sources.tfds_arrays("fashion_mnist", "train", explicit, False, num_train, features),
                sources.tfds_arrays("fashion_mnist", "test", explicit, False, num_test, features))
    elif explicit is None and sources.has_idx_files(sources.FASHION_MNIST_IDX_DIR):
        directory = sources.FASHION_MNIST_IDX_DIR
    elif cfg.get("download", False):
        return (sources.tfds_arrays("fashion_mnist", "train", explicit, True, num_train, features),
                sources.tfds_arrays("fashion_mnist", "test", explicit, True, num_test, features))
    else:
        raise DataNotFoundError(sources.how_to_get("fashion_mnist", explicit))
    if features:
        raise DataConfigError(f"fashion_mnist read from idx files has no feature {features[0]!r} (only image and label)")
    train = sources.fashion_mnist_idx(directory, "train").take(num_train)
    test = sources.fashion_mnist_idx(directory, "test").take(num_test)
    return train, test


def load(cfg, seed: int = 0, features: tuple = ()) -> DataSet:
    """Reads the data set that `cfg` (the config's `dataset` block) names. Raises ValueError / DataNotFoundError.

    `cfg.classes` (a tuple of class ids, or None for all) keeps only those classes, relabelled 0..n-1 in the order
    given; `num_train` / `num_test` then cap the kept examples (for `synthetic`, the set of `num_train` examples is
    drawn first and then filtered). `features` names further per-example features to read besides the image (a
    second modality for a `feature:NAME` view; the synthetic set always has 'depth').
    """
    name = cfg.name
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(SOURCES)}")
    data_dir = cfg.get("data_dir")
    classes = cfg.get("classes")
    if classes is not None:
        if name == "imagenet2012":
            raise DataConfigError("dataset.classes is not supported for imagenet2012 (a streamed data set)")
        classes = _check_classes(classes, cfg.num_classes if name == "synthetic" else sources.NUM_CLASSES[name], name)
    # With a class subset the caps apply after filtering, so the whole split is read first.
    num_train, num_test = (None, None) if classes is not None else (cfg.get("num_train"), cfg.get("num_test"))
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
        train, test = _fashion_mnist(cfg, num_train, num_test, tuple(features))
        train, test = _pad_to_32(train), _pad_to_32(test)
        num_classes = sources.NUM_CLASSES[name]
    else:
        download = cfg.get("download", False)
        if not download and not sources.tfds_prepared(name, data_dir):
            raise DataNotFoundError(sources.how_to_get(name, data_dir))
        train = sources.tfds_arrays(name, "train", data_dir, download, num_train, tuple(features))
        test = sources.tfds_arrays(name, "test", data_dir, download, num_test, tuple(features))
        num_classes = sources.NUM_CLASSES[name]
    if classes is not None:
        train = select_classes(train, classes).take(cfg.get("num_train") if name != "synthetic" else None)
        test = select_classes(test, classes).take(cfg.get("num_test") if name != "synthetic" else None)
        num_classes = len(classes)
    shape = tuple(int(d) for d in train.images.shape[1:])
    mean, std = sources.normalization(name, shape[-1])
    return DataSet(name, num_classes, shape, len(train), len(test), mean, std, train, test, data_dir)
