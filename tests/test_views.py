"""Views (what each network sees), ensembles of teachers and teachers of another task."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import shrink
from wcord_jax import checkpoint, configs, core, data, distill, feeds, losses, models, parallel, train, views
from wcord_jax.data import augment as aug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_train=128, num_test=32, image_size=16, num_classes=4, log_every_steps=4)


# --------------------------------------------------------------------------------------------------------------------
# The transforms against numpy


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32)


def test_gray_is_bt601_luminance():
    x = _pixels((2, 5, 6, 3))
    expected = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    np.testing.assert_allclose(views.parse("gray").apply(jnp.asarray(x))[..., 0], expected, rtol=1e-5)
    one = _pixels((1, 4, 4, 1))
    np.testing.assert_array_equal(views.parse("gray").apply(jnp.asarray(one)), one)


# sRGB colour -> CIELAB (D65), as published colour tables give them.
KNOWN_LAB = [((255, 255, 255), (100.0, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0)),
             ((255, 0, 0), (53.24, 80.09, 67.20)), ((0, 255, 0), (87.73, -86.18, 83.18)),
             ((0, 0, 255), (32.30, 79.19, -107.86)), ((128, 128, 128), (53.59, 0.0, 0.0))]


def _lab_reference(rgb):
    """CIELAB written out from its definition: sRGB decoding, the sRGB->XYZ matrix, D65 white, the cube-root f."""
    out = []
    for r, g, b in rgb.reshape(-1, 3) / 255.0:
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        X = (0.4124564 * lin[0] + 0.3575761 * lin[1] + 0.1804375 * lin[2]) / 0.95047
        Y = (0.2126729 * lin[0] + 0.7151522 * lin[1] + 0.0721750 * lin[2]) / 1.0
        Z = (0.0193339 * lin[0] + 0.1191920 * lin[1] + 0.9503041 * lin[2]) / 1.08883
        f = [t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in (X, Y, Z)]
        out.append((116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])))
    return np.asarray(out).reshape(*rgb.shape[:-1], 3)


def test_cielab_matches_known_colours_and_the_formula():
    rgb = np.asarray([c for c, _ in KNOWN_LAB], np.float32).reshape(1, 1, -1, 3)
    lab = np.concatenate([views.parse("lab_l").apply(jnp.asarray(rgb)), views.parse("lab_ab").apply(jnp.asarray(rgb))],
                         -1)
    np.testing.assert_allclose(lab.reshape(-1, 3), np.asarray([v for _, v in KNOWN_LAB]), atol=0.02)
    x = _pixels((2, 4, 4, 3), seed=1)
    got = np.concatenate([views.parse("lab_l").apply(jnp.asarray(x)), views.parse("lab_ab").apply(jnp.asarray(x))], -1)
    np.testing.assert_allclose(got, _lab_reference(x), atol=2e-3)
    assert views.parse("lab_ab").channels(3) == 2 and views.parse("lab_l").channels(3) == 1


def test_downsample_is_block_mean_repeated():
    x = _pixels((2, 8, 8, 3))
    got = np.asarray(views.parse("downsample:4").apply(jnp.asarray(x)))
    for by in range(2):
        for bx in range(2):
            block = x[:, 4 * by:4 * by + 4, 4 * bx:4 * bx + 4]
            np.testing.assert_allclose(got[:, 4 * by:4 * by + 4, 4 * bx:4 * bx + 4],
                                       np.broadcast_to(block.mean(axis=(1, 2), keepdims=True), block.shape), rtol=1e-5)


def test_edges_is_the_sobel_magnitude_of_the_luminance():
    x = _pixels((1, 6, 7, 3))
    lum = 0.299 * x[0, ..., 0] + 0.587 * x[0, ..., 1] + 0.114 * x[0, ..., 2]
    p = np.pad(lum, 1, mode="edge")
    kx = np.asarray([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    expected = np.zeros_like(lum)
    for i in range(lum.shape[0]):
        for j in range(lum.shape[1]):
            window = p[i:i + 3, j:j + 3]
            expected[i, j] = np.hypot((window * kx).sum(), (window * kx.T).sum())
    np.testing.assert_allclose(views.parse("edges").apply(jnp.asarray(x))[0, ..., 0], expected, rtol=1e-4, atol=1e-3)


def test_mask_occludes_the_fraction_at_a_seeded_place_and_noise_has_its_std():
    x = jnp.full((3, 32, 32, 1), 200.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    mask = views.parse("mask:0.5")
    got = np.asarray(mask.apply(x, keys))
    side = views.occlusion_side(32, 0.5)
    assert side == 23 and all((got[i] == 0).sum() == side * side for i in range(3))
    np.testing.assert_array_equal(got, mask.apply(x, keys))  # the same keys, the same masks
    assert not np.array_equal(got[0], got[1])  # each example its own place
    noisy = np.asarray(views.parse("noise:0.1").apply(jnp.zeros((4, 32, 32, 3)), jax.random.split(keys[0], 4)))
    assert abs(noisy.std() - 25.5) < 0.5 and abs(noisy.mean()) < 0.5


@pytest.mark.parametrize("spec", ["blur", "downsample:0", "downsample:x", "mask:1.5", "noise:-1", "feature:", "gray:2"])
def test_unknown_views_name_the_valid_ones(spec):
    with pytest.raises(views.ViewError, match="valid: identity, gray, lab_l, lab_ab, downsample:K"):
        views.parse(spec)


# --------------------------------------------------------------------------------------------------------------------
# The feed: both views of an example share its crop and flip


def test_both_views_of_an_example_share_its_crop_and_flip():
    cfg = shrink(configs.teacher_config("resnet8"), **SMALL).dataset
    ds = data.load(cfg, seed=0, features=("depth",))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    student = feeds.view_input(views.parse("gray"), ds)
    teacher = feeds.view_input(views.parse("feature:depth"), ds)
    idx = jnp.asarray([3, 17, 5, 0, 9, 2, 40, 41], jnp.int32)
    sources = {"image": jnp.asarray(ds.train.images), "depth": jnp.asarray(ds.train.features["depth"])}
    rng, step = jax.random.PRNGKey(7), 3

    def get():
        return feeds.device_batch(rng, step, sources, jnp.asarray(ds.train.labels), idx, mean=None, std=None,
                                  dtype=jnp.float32, augment=True, views={"student": student, "teacher": teacher})

    batch = jax.shard_map(get, mesh=mesh, in_specs=(), out_specs=P("data"))()
    keys = aug.example_keys(jax.random.fold_in(jax.random.fold_in(rng, feeds.AUGMENT_STREAM), step), 0, len(idx))
    image = np.asarray(aug.augment_batch(keys, ds.train.images[np.asarray(idx)]), np.float32)
    depth = np.asarray(aug.augment_batch(keys, ds.train.features["depth"][np.asarray(idx)]), np.float32)
    gray = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    np.testing.assert_allclose(np.asarray(batch["image"])[..., 0] * student.std[0] + student.mean[0], gray,
                               rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(np.asarray(batch["teacher_image"])[..., 0] * teacher.std[0] + teacher.mean[0],
                               depth[..., 0], rtol=1e-4, atol=1e-2)
    assert batch["image"].shape == (8, 16, 16, 1) and not np.array_equal(image, ds.train.images[np.asarray(idx)])


# --------------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """resnet8 teachers on the small synthetic set: 'a' and 'b' (seeds 0, 1), 'gray' (on the gray view), 'half'
    (classes 0 and 1 only)."""
    root = tmp_path_factory.mktemp("view_teachers")
    out = {}
    for name, overrides in (("a", {}), ("b", {"seed": 1}), ("gray", {"view": "gray"}),
                            ("half", {"dataset.classes": (0, 1)})):
        out[name] = str(root / name)
        train.train_and_evaluate(shrink(configs.teacher_config("resnet8"), num_devices=1, **SMALL, **overrides),
                                 out[name])
    return out


def test_a_run_evaluates_on_its_own_view(teachers):
    """The gray teacher's logged test accuracy is its accuracy on gray test images, computed here with numpy's gray."""
    meta = checkpoint.load_meta(teachers["gray"])
    assert meta["view"] == "gray" and meta["num_classes"] == 4 and len(meta["view_mean"]) == 1
    ds = data.load(shrink(configs.teacher_config("resnet8"), **SMALL).dataset, seed=0)
    model = models.get_model("resnet8", 4)
    x = ds.test.images.astype(np.float32)
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    gray = (gray - np.asarray(meta["view_mean"])) / np.asarray(meta["view_std"])
    logits = model.apply(checkpoint.load_variables(teachers["gray"]), jnp.asarray(gray), train=False)[0]
    top1 = float(np.mean(np.argmax(np.asarray(logits), -1) == ds.test.labels))
    assert top1 == pytest.approx(meta["eval/top1"], abs=1e-6)


def _config(method, checkpoint_dirs, **overrides):
    config = shrink(configs.distill_config(method, "resnet8", "resnet8"), **SMALL, **overrides)
    config.teacher.checkpoint = ",".join(checkpoint_dirs)
    return config


def _steps(config, num_devices, num_steps=2):
    """Metrics of the first steps, driven by hand as `distill_and_evaluate` runs them, and the final state."""
    config.num_devices = num_devices
    mesh, dtype, ds, feed, eng, _ = distill.setup(config)
    runner = feed.make_runner(eng.main_step, dtype, num_extra=2, state_spec=eng.spec)
    extra = (parallel.replicate(eng.teacher_vars, mesh), parallel.replicate(eng.class_index, mesh))
    state = parallel.place(jax.tree.map(jnp.copy, eng.state), mesh, eng.spec)
    order = feeds.epoch_order(jax.random.PRNGKey(config.seed), 0, ds.num_train, feed.steps_per_epoch,
                              config.batch_size)
    out = []
    for i in range(num_steps):
        state, m = runner(state, *extra, feed.images, feed.labels, parallel.shard_batch(order[i:i + 1], mesh,
                                                                                         P(None, "data")))
        out.append({k: float(v[0]) for k, v in jax.device_get(m).items()})
    return out, state, eng


def test_kd_of_two_copies_of_a_teacher_is_kd_of_that_teacher(teachers):
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 5)) * 3
    s = jax.random.normal(jax.random.PRNGKey(1), (6, 5))
    np.testing.assert_allclose(losses.kd_loss_ensemble(s, [z, z]), losses.kd_loss(s, z), rtol=1e-5)
    p = np.mean([np.exp(np.asarray(jax.nn.log_softmax(v / 4.0))) for v in (z, s)], axis=0)
    q = np.exp(np.asarray(jax.nn.log_softmax(s / 4.0)))
    np.testing.assert_allclose(losses.kd_loss_ensemble(s, [z, s]), 16 * np.mean(np.sum(p * np.log(p / q), -1)),
                               rtol=1e-5)
    one, _, _ = _steps(_config("kd", [teachers["a"]]), 1)
    two, _, eng = _steps(_config("kd", [teachers["a"], teachers["a"]]), 1)
    assert len(eng.teachers) == 2
    for a, b in zip(one, two):
        for term in ("kd", "ce", "loss"):
            np.testing.assert_allclose(a[term], b[term], rtol=1e-5, err_msg=term)


@pytest.mark.slow  # four devices, two teachers: test_distill.py has the fast tier's one-against-four-devices check
@pytest.mark.parametrize("method", ["wcordkd"])  # CRD's per-teacher memory: the single-device tests
def test_views_and_two_teachers_give_the_same_losses_on_one_and_four_devices(teachers, method):
    """A student on a random view (mask) distilled from two teachers: per-teacher heads and state, sharded as for
    one teacher, and the same losses on 1 and 4 devices."""
    terms = ("ce", "kd", "crd") if method == "crdkd" else ("ce", "kd", "wcord_global", "wcord_local")
    results = [_steps(_config(method, [teachers["a"], teachers["b"]], view="mask:0.5"), n, 3) for n in (1, 4)]
    (m1, s1, eng), (m4, s4, _) = results
    assert {"embed_s_t0", "embed_t_t0", "embed_s_t1", "embed_t_t1"} <= set(s1.params)
    assert isinstance(s1.method, tuple) and len(s1.method) == 2  # one state per teacher
    for a, b in zip(m1, m4):
        for term in terms + ("loss", "emb_pos_cos_t1"):
            np.testing.assert_allclose(a[term], b[term], rtol=2e-4, atol=1e-5, err_msg=term)
    if method == "wcordkd":  # each teacher's queue is split over the devices
        assert {s.data.shape for s in s4.method[1]["own"].queue_t.addressable_shards} == {(16, 128)}
        assert all(set(s["key_heads"]) == {"embed_s", "embed_t"} for s in s1.method)
        assert not np.allclose(np.asarray(s1.method[0]["key_heads"]["embed_t"]["linear"]["kernel"]),
                               np.asarray(s1.method[1]["key_heads"]["embed_t"]["linear"]["kernel"]))
    # The two teachers' heads were initialised apart and train apart.
    assert not np.allclose(np.asarray(s1.params["embed_t_t0"]["linear"]["kernel"]),
                           np.asarray(s1.params["embed_t_t1"]["linear"]["kernel"]))


def test_a_teacher_of_other_classes_distils_representations_and_refuses_kd(teachers, tmp_path):
    metrics, _, eng = _steps(_config("crd", [teachers["half"]]), 1)
    assert eng.teachers[0].num_classes == 2 and not eng.teachers[0].same_task
    assert metrics[0]["kd"] == 0.0 and np.isfinite(metrics[0]["crd"])
    for method in ("kd", "crdkd", "dkd"):
        with pytest.raises(core.ConfigError, match="trained on another task .*different label spaces"):
            distill.setup(_config(method, [teachers["half"]]))
    with pytest.raises(core.ConfigError, match="method fitnet cannot distil an ensemble of 2 teachers.*can: none, kd"):
        distill.setup(_config("fitnet", [teachers["a"], teachers["b"]]))
    # The whole run: the student evaluates on its view; the ensemble's and each teacher's accuracy are logged.
    result = distill.distill_and_evaluate(_config("wcord", [teachers["a"], teachers["b"]], view="gray",
                                                  num_devices=1), str(tmp_path / "ens"))
    from wcord_jax import metrics as metrics_lib

    first = next(e for e in metrics_lib.read_metrics(str(tmp_path / "ens")) if "teacher/top1" in e)
    assert {"teacher/top1", "teacher_0/top1", "teacher_1/top1"} <= set(first)
    assert checkpoint.load_meta(str(tmp_path / "ens"))["view"] == "gray" and 0.0 <= result["eval/top1"] <= 1.0


@pytest.mark.slow
def test_bad_view_combinations_are_one_line_and_exit_2(teachers, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    tiny = ["--config.dataset.name=synthetic", "--config.dataset.num_train=128", "--config.dataset.num_test=32",
            "--config.dataset.image_size=16", "--config.dataset.num_classes=4", "--config.batch_size=16",
            "--config.eval_batch_size=16", "--config.num_devices=1"]
    cases = (
        ("configs/teacher.py:resnet8", [], "view: unknown view 'blur'; valid: identity, gray,", ["--config.view=blur"]),
        ("configs/distill.py:kd,resnet8,resnet8", [teachers["half"]], "trained on another task", []),
        ("configs/distill.py:crd,resnet8,resnet8", [teachers["gray"]], "3-channel images (teacher.view identity gives 3 channels; that teacher was trained on view gray)",
         ["--config.teacher.view=identity"]),
        ("configs/distill.py:crd,resnet8,resnet8", [teachers["a"]], "has no feature 'depthx'",
         ["--config.teacher.view=feature:depthx"]),
    )
    for config, dirs, expected, args in cases:
        ckpt = [f"--config.teacher.checkpoint={','.join(dirs)}"] if dirs else []
        out = subprocess.run([sys.executable, "-m", "wcord_jax.main", "--config", config, "--workdir",
                              str(tmp_path / "w"), *tiny, *ckpt, *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
        assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr
