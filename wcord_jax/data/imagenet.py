"""ImageNet (TFDS `imagenet2012`) streamed through tf.data.

Train: random-resized crop to 224 (scale 0.08..1, ratio 3/4..4/3, as torchvision's RandomResizedCrop) and horizontal
flip; eval: resize the shorter side to 256 and centre-crop 224. Images leave tf.data as uint8 and are normalised on the
device. Each example carries its index in the split (`enumerate` before shuffling), which CRD needs.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from wcord_jax.data import sources

IMAGE_SIZE = 224
RESIZE_SIZE = 256


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _random_resized_crop(tf, image, seed, size=IMAGE_SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    bbox = tf.zeros([1, 0, 4], tf.float32)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bbox, seed=seed, min_object_covered=0.0, aspect_ratio_range=ratio,
        area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=False)


def _center_crop(tf, image, size=IMAGE_SIZE, resize=RESIZE_SIZE):
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = resize / tf.minimum(h, w)
    new_h = tf.cast(tf.round(h * scale), tf.int32)
    new_w = tf.cast(tf.round(w * scale), tf.int32)
    image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    return image[top:top + size, left:left + size]


def num_examples(split: str, data_dir: Optional[str]) -> int:
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    return builder.info.splits[split].num_examples


def make_dataset(split: str, *, train: bool, global_batch_size: int, seed: int, epoch: int,
                 data_dir: Optional[str], num: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1, skip_batches: int = 0):
    """A tf.data.Dataset of dicts {image uint8 [b,224,224,3], label, index} for this process's share of the batch.

    Shuffling and augmentation are seeded by (seed, epoch), so re-running an epoch gives the same batches and a
    resumed run can skip the batches it has already trained on.
    """
    tf = _tf()
    import tensorflow_datasets as tfds

    sub = split if num is None else f"{split}[:{num}]"
    try:
        ds = tfds.load("imagenet2012", split=sub, data_dir=data_dir, download=False, try_gcs=False,
                       shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:
        raise sources.DataNotFoundError(sources.how_to_get("imagenet2012", data_dir)) from e
    ds = ds.enumerate()
    if process_count > 1:
        ds = ds.shard(process_count, process_index)
    if train:
        ds = ds.shuffle(16 * global_batch_size, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)

    def prepare(index, ex):
        image = tf.io.decode_jpeg(ex["image"], channels=3)
        if train:
            example_seed = tf.stack([tf.cast(index, tf.int32), tf.constant(seed * 1000 + epoch, tf.int32)])
            image = _random_resized_crop(tf, image, example_seed)
            flip_seed = example_seed + tf.constant([0, 7919], tf.int32)
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        else:
            image = _center_crop(tf, image)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "index": tf.cast(index, tf.int32)}

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    local_batch = global_batch_size // process_count
    ds = ds.batch(local_batch, drop_remainder=train)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def iterate(ds) -> Iterator[dict]:
    for batch in ds.as_numpy_iterator():
        yield {k: np.asarray(v) for k, v in batch.items()}
