"""On-device image preprocessing, written to run inside jitted (and shard_mapped) code.

Augmentation randomness is keyed per example by its position in the global batch, so one device and several devices
draw exactly the same crops and flips.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, image: jax.Array, padding: int = 4) -> jax.Array:
    """RandomCrop(H, padding) with zero padding, then RandomHorizontalFlip, on one uint8 HWC image."""
    h, w, c = image.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy = jax.random.randint(k_y, (), 0, 2 * padding + 1)
    dx = jax.random.randint(k_x, (), 0, 2 * padding + 1)
    crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
    flip = jax.random.bernoulli(k_f)
    return jnp.where(flip, crop[:, ::-1, :], crop)


def augment_batch(keys: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Applies `random_crop_flip` to each image of a batch with its own key ([B, 2] uint32 keys)."""
    return jax.vmap(lambda k, x: random_crop_flip(k, x, padding))(keys, images)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """(x - mean) / std per channel; `mean` and `std` are in pixel units (0..255)."""
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def example_keys(step_key: jax.Array, first_position: jax.Array, count: int) -> jax.Array:
    """Keys for `count` consecutive examples starting at global position `first_position` of a step's batch."""
    positions = first_position + jnp.arange(count)
    return jax.vmap(lambda p: jax.random.fold_in(step_key, p))(positions)
