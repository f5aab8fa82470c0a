"""Linear-probe transfer: the class-subset option, the linear classifier, feature extraction and the CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax import checkpoint as ckpt_lib
from wcord_jax import configs, data, models
from wcord_jax.tools import probe
from wcord_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_FMNIST = sources.has_idx_files(sources.FASHION_MNIST_IDX_DIR)


def _synthetic_cfg(**kw):
    cfg = configs.dataset_config()
    cfg.name, cfg.num_train, cfg.num_test, cfg.image_size, cfg.num_classes = "synthetic", 200, 50, 8, 6
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_select_classes_relabels_like_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300).astype(np.int32)
    images = rng.integers(0, 256, (300, 4, 4, 1)).astype(np.uint8)
    classes = (7, 2, 5)
    got = data.select_classes(data.ArrayData(images, labels), classes)
    keep = np.flatnonzero(np.isin(labels, classes))
    assert np.array_equal(got.images, images[keep])
    assert np.array_equal(got.labels, np.array([classes.index(l) for l in labels[keep]]))
    assert got.labels.dtype == np.int32


def test_load_with_classes_filters_then_caps():
    full = data.load(_synthetic_cfg())
    sub = data.load(_synthetic_cfg(classes=(4, 1)))
    assert sub.num_classes == 2 and set(np.unique(sub.train.labels)) == {0, 1}
    keep = np.isin(full.train.labels, (4, 1))
    assert np.array_equal(sub.train.images, full.train.images[keep])
    assert np.array_equal(sub.train.labels, np.where(full.train.labels[keep] == 4, 0, 1))
    assert sub.num_train == int(keep.sum()) and sub.num_test == int(np.isin(full.test.labels, (4, 1)).sum())
    for bad in ((1, 1), (6,), (-1, 2), ()):
        with pytest.raises(data.DataConfigError, match="dataset.classes"):
            data.load(_synthetic_cfg(classes=bad))


@pytest.mark.skipif(not HAS_FMNIST, reason="the Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_classes_cap_applies_after_filtering():
    cfg = configs.dataset_config()
    cfg.name, cfg.classes, cfg.num_train, cfg.num_test = "fashion_mnist", (9, 0), 300, 100
    ds = data.load(cfg)
    assert (ds.num_train, ds.num_test, ds.num_classes) == (300, 100, 2)
    raw = sources.fashion_mnist_idx(sources.FASHION_MNIST_IDX_DIR, "train")
    keep = np.flatnonzero(np.isin(raw.labels, (9, 0)))[:300]
    assert np.array_equal(ds.train.labels, np.where(raw.labels[keep] == 9, 0, 1))
    assert np.array_equal(ds.train.images[:, 2:30, 2:30], raw.images[keep])


def test_linear_classifier_separates_separable_features():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 4
    y = rng.integers(0, 4, 400).astype(np.int32)
    x = (centres[y] + rng.normal(size=(400, 16))).astype(np.float32)
    x_train, x_test = probe.standardize(x[:300], x[300:])
    for optimizer, batch in (("sgd", 64), ("adam", 0)):
        params, losses = probe.fit_linear(x_train, y[:300], 4, num_epochs=30, batch_size=batch, learning_rate=0.1,
                                          seed=0, optimizer=optimizer, weight_decay=5e-4)
        assert probe.evaluate_linear(params, x_train, y[:300])[0] == 1.0
        assert probe.evaluate_linear(params, x_test, y[300:])[0] >= 0.99
        assert losses.shape == (30,) and losses[-1] < losses[0]
    again, _ = probe.fit_linear(x_train, y[:300], 4, num_epochs=30, batch_size=batch, learning_rate=0.1, seed=0,
                                optimizer=optimizer, weight_decay=5e-4)
    np.testing.assert_array_equal(again["w"], params["w"])  # seeded


def test_features_resize_and_do_not_depend_on_the_batch():
    model = models.get_model("resnet8", 3)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    images = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3)).astype(np.uint8)
    got = probe.extract_features(model, variables, images, image_size=8, mean=np.full(3, 127.5),
                                 std=np.full(3, 64.0), batch_size=4)  # the last batch is padded
    assert got.shape == (5, 64)
    small = jax.image.resize(images.astype(np.float32), (5, 8, 8, 3), "linear", antialias=True)
    _, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, (small - 127.5) / 64.0)
    np.testing.assert_allclose(got, feats[-1], rtol=1e-4, atol=1e-5)


def _fake_run(workdir, task, variables, dataset):
    """A run directory as a teacher or distillation run leaves it: config.json and an orbax checkpoint."""
    params = {"student": variables["params"], "embed_s": {"w": jnp.ones((2, 2))}} if task == "distill" \
        else variables["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": variables["batch_stats"]}
    ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
    ckpt.save(1, state, {"model": "resnet8", "task": task, "epoch": 1})
    ckpt.close()
    with open(workdir / "config.json", "w") as f:
        json.dump({"task": task, "model": "resnet8", "dataset": dataset}, f)


def test_load_network_finds_the_student_of_a_distillation_run(tmp_path):
    model = models.get_model("resnet8", 4)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 3)), train=False)
    dataset = {"name": "synthetic", "num_classes": 6, "image_size": 8, "num_channels": 3, "classes": [5, 0, 2, 3]}
    for task in ("teacher", "distill"):
        _fake_run(tmp_path / task, task, variables, dataset)
        net = probe.load_network(str(tmp_path / task))
        assert (net["task"], net["num_classes"], net["image_shape"]) == (task, 4, (8, 8, 3))
        jax.tree.map(np.testing.assert_array_equal, net["variables"]["params"], variables["params"])
    dataset["classes"] = None  # 6 classes: the checkpoint's classifier does not fit
    with open(tmp_path / "teacher" / "config.json", "w") as f:
        json.dump({"task": "teacher", "model": "resnet8", "dataset": dataset}, f)
    with pytest.raises(probe.ConfigError, match="parameters have other shapes"):
        probe.load_network(str(tmp_path / "teacher"))


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for i, w in enumerate(wnids):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(folder / f"{w}_{j}.JPEG")
        Image.fromarray(rng.integers(0, 256, (64, 64)).astype(np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[2 - i]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train, test, num_classes = probe.tiny_imagenet(str(tmp_path), None, None)
    assert num_classes == 3 and train.images.shape == (6, 64, 64, 3) and test.images.shape == (3, 64, 64, 3)
    assert list(train.labels) == [0, 0, 1, 1, 2, 2] and list(test.labels) == [2, 1, 0]
    assert len(probe.tiny_imagenet(str(root), 4, 2)[0]) == 4
    with pytest.raises(data.DataNotFoundError, match="tiny-imagenet-200.zip"):
        probe.tiny_imagenet(str(tmp_path / "nothing"), None, None)


# --------------------------------------------------------------------------------------------------------------------
# The command line


def _main(config, workdir, *args):
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", config, "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def teacher_0to4(tmp_path_factory):
    """A resnet8 trained briefly on Fashion-MNIST classes 0-4 only."""
    workdir = tmp_path_factory.mktemp("probe") / "t04"
    out = _main("configs/teacher.py:resnet8", workdir, "--config.dataset.name=fashion_mnist",
                "--config.dataset.classes=0,1,2,3,4", "--config.dataset.num_train=512", "--config.dataset.num_test=64",
                "--config.num_epochs=1", "--config.batch_size=64", "--config.eval_batch_size=64",
                "--config.num_devices=1", "--config.log_every_steps=100")
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="the Debian package dataset-fashion-mnist is not installed")
def test_probe_on_heldout_fashion_mnist_classes(teacher_0to4, tmp_path):
    out = _main("configs/linear_probe.py:fashion_mnist_heldout", tmp_path / "p", f"--config.student.checkpoint={teacher_0to4}",
                "--config.dataset.num_train=1000", "--config.dataset.num_test=500", "--config.probe.num_epochs=30")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: probe/train_top1=" in out.stdout and "test top-1" in out.stderr
    summary = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert summary["heldout_classes"] == [5, 6, 7, 8, 9] and summary["num_classes"] == 5
    assert (summary["num_train"], summary["num_test"], summary["feature_dim"]) == (1000, 500, 64)
    assert summary["source"]["task"] == "teacher" and summary["source"]["classes"] == [0, 1, 2, 3, 4]
    assert summary["chance_top1"] == 0.2 and summary["probe/test_top1"] > 0.6 and summary["probe/train_top1"] > 0.6
    records = [json.loads(l) for l in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["probe/test_top1"] == summary["probe/test_top1"]
    assert json.loads((tmp_path / "p" / "config.json").read_text())["task"] == "probe"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="the Debian package dataset-fashion-mnist is not installed")
def test_probe_channel_mismatch_is_one_line_and_exit_2(teacher_0to4, tmp_path):
    out = _main("configs/linear_probe.py:stl10", tmp_path / "p", f"--config.student.checkpoint={teacher_0to4}")
    lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and "trained on 1-channel images (fashion_mnist) but stl10 has 3-channel images" in lines[0]
    assert "same channel count" in lines[0]


def test_probe_config_errors(tmp_path):
    config = probe.probe_config("svhn")
    with pytest.raises(probe.ConfigError, match="unknown probe data set 'svhn'; valid: stl10, tiny_imagenet"):
        probe.probe_and_evaluate(config, str(tmp_path / "p"))
    config = probe.probe_config("fashion_mnist_heldout")
    with pytest.raises(probe.ConfigError, match="student.checkpoint=DIR is required"):
        probe.probe_and_evaluate(config, str(tmp_path / "p"))
    config.student.checkpoint = str(tmp_path / "missing")
    with pytest.raises(probe.ConfigError, match=f"^student.checkpoint: no such workdir: {tmp_path / 'missing'}$"):
        probe.probe_and_evaluate(config, str(tmp_path / "p"))
    (tmp_path / "run").mkdir()
    config.student.checkpoint = str(tmp_path / "run")
    with pytest.raises(probe.ConfigError, match="has no config.json"):
        probe.probe_and_evaluate(config, str(tmp_path / "p"))
    (tmp_path / "run" / "config.json").write_text('{"task": "teacher", "model": "resnet8", '
                                                  '"dataset": {"name": "fashion_mnist"}}')
    with pytest.raises(probe.ConfigError, match="student.checkpoint: checkpoint not found"):
        probe.probe_and_evaluate(config, str(tmp_path / "p"))
