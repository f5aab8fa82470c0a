"""Views: what each network sees of an example, as an on-device transform applied after augmentation.

A teacher and its student can see different inputs of the same example (`teacher.view` and `view` in a config):
the teacher the full image and the student a degraded one (privileged information), or the two networks different
modalities (cross-modal transfer). A view is named by a string:

=================  =====================================================================================  ========
view               what the network sees                                                                  channels
=================  =====================================================================================  ========
`identity`         the image                                                                              C
`gray`             luminance, 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601; a 1-channel image is itself)     1
`lab_l`            CIELAB lightness L* (sRGB, D65 white; the CRD paper's colour-to-colour split)           1
`lab_ab`           CIELAB chroma a*, b*                                                                   2
`downsample:K`     K x K average pooling, then each pooled pixel repeated K x K (nearest) back to H x W    C
`mask:FRACTION`    a square of FRACTION of the image's area, at a random place per example, set to 0     C
`edges`            Sobel gradient magnitude of the luminance (borders replicated)                          1
`noise:STD`        the image plus Gaussian noise of standard deviation STD x 255 (STD in [0, 1] units)     C
`feature:NAME`     another feature of the data set (a second modality, e.g. `depth`), not the image      its own
=================  =====================================================================================  ========

Every view maps float32 pixels (0..255, [B, H, W, C]) to float32 values in pixel-like units; the feed then
normalises them per channel (`stats`: the data set's mean and std for the views that keep the image's channels,
measured on the training split for the others). The random views (`mask`, `noise`) draw from one key per example:
in training the example's augmentation key (so 1 and D devices see the same views), in evaluation a fixed key per
test example (so every evaluation sees the same test set).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

VALID = ("identity", "gray", "lab_l", "lab_ab", "downsample:K", "mask:FRACTION", "edges", "noise:STD",
         "feature:NAME")
# Views whose output keeps the image's channels and roughly its statistics: normalised with the data set's constants.
_SAME_STATS = ("identity", "downsample", "mask", "noise")
_RANDOM = ("mask", "noise")
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)
# sRGB (linear) -> CIE XYZ for the D65 white point, and that white point.
SRGB_TO_XYZ = np.asarray([[0.4124564, 0.3575761, 0.1804375],
                          [0.2126729, 0.7151522, 0.0721750],
                          [0.0193339, 0.1191920, 0.9503041]], np.float32)
D65_WHITE = np.asarray([0.95047, 1.0, 1.08883], np.float32)


class ViewError(ValueError):
    """A view name that does not exist, or one that cannot apply to the data (one line naming the choices)."""


@dataclasses.dataclass(frozen=True)
class View:
    """A parsed view: `kind` (identity, gray, ...) and its argument (`arg`: K, FRACTION, STD or NAME)."""

    spec: str
    kind: str
    arg: Optional[object] = None

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    @property
    def random(self) -> bool:
        return self.kind in _RANDOM

    @property
    def feature(self) -> Optional[str]:
        """The data-set feature this view reads (None: the image)."""
        return self.arg if self.kind == "feature" else None

    @property
    def keeps_image_stats(self) -> bool:
        return self.kind in _SAME_STATS

    def channels(self, image_channels: int, feature_channels: Optional[int] = None) -> int:
        if self.kind in ("gray", "lab_l", "edges"):
            return 1
        if self.kind == "lab_ab":
            return 2
        if self.kind == "feature":
            return int(feature_channels)
        return image_channels

    def check(self, image_shape, features: dict) -> None:
        """ViewError when this view cannot apply to images of `image_shape` (H, W, C) with these extra features
        ({name: shape})."""
        h, w, c = image_shape
        if self.kind in ("lab_l", "lab_ab") and c != 3:
            raise ViewError(f"view {self.spec} needs 3-channel (RGB) images; these have {c}")
        if self.kind == "downsample" and (h % self.arg or w % self.arg):
            raise ViewError(f"view {self.spec}: {h}x{w} images are not divisible into {self.arg}x{self.arg} blocks")
        if self.kind == "feature":
            if self.arg not in features:
                have = ", ".join(sorted(features)) or "none besides image and label"
                raise ViewError(f"view {self.spec}: the data set has no feature {self.arg!r} (its extra features: "
                                f"{have})")
            if tuple(features[self.arg][:2]) != (h, w):
                raise ViewError(f"view {self.spec}: the feature is {features[self.arg][0]}x{features[self.arg][1]}, "
                                f"the images {h}x{w}; both views of an example must share their crop")

    def apply(self, x: jax.Array, keys: Optional[jax.Array] = None) -> jax.Array:
        """This view of float32 pixels `x` [B, H, W, C] (for `feature:NAME`, `x` is that feature); `keys` [B, 2]
        per-example keys for the random views."""
        kind = self.kind
        if kind in ("identity", "feature"):
            return x
        if kind == "gray":
            return gray(x)
        if kind == "lab_l":
            return rgb_to_lab(x)[..., :1]
        if kind == "lab_ab":
            return rgb_to_lab(x)[..., 1:]
        if kind == "downsample":
            return downsample(x, self.arg)
        if kind == "edges":
            return sobel_magnitude(gray(x))
        if kind == "mask":
            return jax.vmap(lambda k, im: occlude(k, im, self.arg))(keys, x)
        if kind == "noise":
            return jax.vmap(lambda k, im: im + self.arg * 255.0 * jax.random.normal(k, im.shape, jnp.float32))(keys, x)
        raise AssertionError(kind)


def parse(spec: Optional[str]) -> View:
    """The view named by `spec` (None or '' is identity); ViewError naming the valid views otherwise."""
    spec = (spec or "identity").strip()
    kind, _, arg = spec.partition(":")
    if kind in ("identity", "gray", "lab_l", "lab_ab", "edges") and not arg:
        return View(spec, kind)
    try:
        if kind == "downsample" and int(arg) >= 1 and str(int(arg)) == arg:
            return View(spec, kind, int(arg))
        if kind == "mask" and 0.0 < float(arg) < 1.0:
            return View(spec, kind, float(arg))
        if kind == "noise" and float(arg) >= 0.0:
            return View(spec, kind, float(arg))
    except ValueError:
        pass
    if kind == "feature" and arg:
        return View(spec, kind, arg)
    raise ViewError(f"unknown view {spec!r}; valid: {', '.join(VALID)} (K a positive integer, FRACTION in (0, 1), "
                    "STD >= 0)")


# --------------------------------------------------------------------------------------------------------------------
# The transforms (pure functions of float32 pixels in 0..255)


def gray(x: jax.Array) -> jax.Array:
    """ITU-R BT.601 luminance [..., 1]; a 1-channel image is returned as it is."""
    if x.shape[-1] == 1:
        return x
    return jnp.einsum("...c,c->...", x[..., :3], jnp.asarray(LUMA))[..., None]


def rgb_to_lab(x: jax.Array) -> jax.Array:
    """CIELAB (L* in 0..100, a*, b* roughly -128..127) of sRGB pixels in 0..255, D65 white."""
    c = x / 255.0
    linear = jnp.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = jnp.einsum("...c,dc->...d", linear, jnp.asarray(SRGB_TO_XYZ)) / jnp.asarray(D65_WHITE)
    delta = 6.0 / 29.0
    f = jnp.where(xyz > delta ** 3, jnp.cbrt(jnp.maximum(xyz, delta ** 3)), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def downsample(x: jax.Array, k: int) -> jax.Array:
    """k x k average pooling, then nearest-neighbour upsampling back to the input's size."""
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))
    return jnp.repeat(jnp.repeat(pooled, k, axis=1), k, axis=2)


def sobel_magnitude(x: jax.Array) -> jax.Array:
    """sqrt(Gx^2 + Gy^2) of the 3x3 Sobel filters, per channel, with the border pixels replicated."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]

    def at(dy, dx):
        return p[:, 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return jnp.sqrt(gx * gx + gy * gy)


def occlusion_side(size: int, fraction: float) -> int:
    """The side of the square that covers `fraction` of a size x size image (at least 1 pixel)."""
    return max(1, min(size, int(round(size * np.sqrt(fraction)))))


def occlude(key: jax.Array, image: jax.Array, fraction: float) -> jax.Array:
    """One image [H, W, C] with a square of `fraction` of its area set to 0, at a position drawn from `key`
    (uniform over the positions where the square fits)."""
    h, w = image.shape[0], image.shape[1]
    side_y, side_x = occlusion_side(h, fraction), occlusion_side(w, fraction)
    ky, kx = jax.random.split(key)
    y0 = jax.random.randint(ky, (), 0, h - side_y + 1)
    x0 = jax.random.randint(kx, (), 0, w - side_x + 1)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= y0) & (rows < y0 + side_y) & (cols >= x0) & (cols < x0 + side_x)
    return jnp.where(inside[..., None], 0.0, image)


def measure_stats(view: View, pixels: np.ndarray, max_examples: int = 10_000, chunk: int = 1000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of `view` over the first `max_examples` rows of `pixels` (the view's source array,
    un-augmented; random views with fixed keys)."""
    pixels = pixels[:max_examples]
    fn = jax.jit(lambda x, k: view.apply(x.astype(jnp.float32), k))
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(pixels), chunk):
        x = pixels[start: start + chunk]
        keys = jax.random.split(jax.random.PRNGKey(seed + start), len(x))
        y = np.asarray(fn(x, keys), np.float64)
        total = total + y.sum(axis=(0, 1, 2))
        total_sq = total_sq + (y * y).sum(axis=(0, 1, 2))
        count += y.shape[0] * y.shape[1] * y.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)
