"""Linear-probe transfer (CRD, Tian et al. 2020, Table 4): a frozen trained network's features, a linear classifier.

    python -m wcord_jax.main --config configs/linear_probe.py:stl10 --workdir runs/probe \\
        --config.student.checkpoint=runs/student

The network comes from a finished run of this library: a distillation run's student (`params['student']` of its
checkpoint) or a teacher run's network (the top-level `params`), told apart by the `task` key of the run's
config.json. Its pooled penultimate features (the last entry of the feature list the zoo's models return) are
computed once, in eval mode, on another data set (images resized to the network's training resolution and normalised
as in evaluation); a linear softmax classifier is fitted on the train split's features and scored on the test split.

Data sets (`PROBE_DATASETS`): `stl10` (TFDS), `tiny_imagenet` (a local copy of the official zip: it is not in
TFDS 4.9), `fashion_mnist_heldout` (offline: the Fashion-MNIST classes `probe.heldout_classes`, relabelled 0..n-1,
for a network trained on the other classes with `--config.dataset.classes`), and the library's own in-memory sets.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wcord_jax import configs as configs_lib
from wcord_jax import data as data_lib
from wcord_jax import metrics as metrics_lib
from wcord_jax import paths, rundir
from wcord_jax.data import augment as aug
from wcord_jax.data import sources
from wcord_jax.data.sources import ArrayData, DataNotFoundError
from wcord_jax.core import ConfigError

log = logging.getLogger("wcord_jax")

# Data sets the probe reads itself, plus the library's in-memory sources (read through `data.load`).
EXTRA_DATASETS = ("stl10", "tiny_imagenet", "fashion_mnist_heldout")
PROBE_DATASETS = EXTRA_DATASETS + tuple(s for s in data_lib.SOURCES if s in sources.IN_MEMORY)
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SUMMARY_FILE = "probe.json"


def probe_config(dataset: str = "stl10") -> ml_collections.ConfigDict:
    """The probe run's configuration; `dataset` is one of PROBE_DATASETS (checked when the run starts)."""
    c = ml_collections.ConfigDict()
    c.task = "probe"
    c.dataset = configs_lib.dataset_config()
    c.dataset.name = dataset
    c.student = ml_collections.ConfigDict()
    # The workdir of a finished teacher or distillation run (its student is probed).
    c.student.checkpoint = ml_collections.FieldReference(None, field_type=str)
    c.student.which = "last"  # last (the final weights) | best (the best test top-1 of that run)
    c.seed = 0  # the linear classifier's batch order (its weights start at zero)
    c.probe = ml_collections.ConfigDict()
    c.probe.heldout_classes = (5, 6, 7, 8, 9)  # fashion_mnist_heldout: the classes the network never saw
    # Input side. image_size None: the network's training resolution (32 for the CIFAR-style zoo, as CRD).
    c.probe.image_size = ml_collections.FieldReference(None, field_type=int)
    c.probe.resize_method = "linear"  # jax.image.resize method (antialiased when shrinking)
    c.probe.normalization = "source"  # source: the mean/std the network was trained with | target: the probe set's
    c.probe.feature_batch_size = 256
    # The linear classifier: softmax regression on standardised features, zero-initialised.
    c.probe.standardize = True  # features scaled by the train split's per-dimension mean / std
    c.probe.optimizer = "sgd"  # sgd (heavy-ball momentum) | adam
    c.probe.learning_rate = 0.1  # peak, cosine-decayed to 0 over the run
    c.probe.momentum = 0.9
    c.probe.weight_decay = 5e-4  # added to the gradient of weights and bias (PyTorch style)
    c.probe.num_epochs = 100
    c.probe.batch_size = 256  # 0: full batch
    c.probe.log_every_epochs = 10
    return c


# --------------------------------------------------------------------------------------------------------------------
# The frozen network


def source_data(run_cfg: dict) -> tuple[str, int, tuple[int, int, int], Optional[tuple]]:
    """(data set name, number of classes, image shape, class subset) a run trained its network on."""
    return rundir.trained_data(run_cfg)


def load_network(path: str, which: str = "last") -> dict:
    """The frozen network of a teacher or distillation run (`wcord_jax.rundir`): module, variables and what it was
    trained on."""
    if not path:
        raise ConfigError("--config.student.checkpoint=DIR is required: the workdir of a finished teacher or "
                          "distillation run")
    if which not in ("last", "best"):
        raise ConfigError(f"unknown student.which {which!r}; valid: last, best")
    try:
        net = rundir.load_network(path, which)
    except rundir.RunDirError as e:
        raise ConfigError(f"student.checkpoint: {e}") from e
    name, num_classes, shape, classes = rundir.trained_data(net.config)
    return {"model": net.model, "variables": net.variables, "model_name": net.model_name, "task": net.task,
            "dataset": name, "num_classes": num_classes, "image_shape": shape, "classes": classes,
            "epoch": net.meta.get("epoch"), "path": path}


# --------------------------------------------------------------------------------------------------------------------
# Probe data


def _tiny_imagenet_root(data_dir: Optional[str]) -> str:
    how = (f"Tiny-ImageNet is not in TFDS 4.9: download {TINY_IMAGENET_URL}, unzip it and pass "
           f"--config.dataset.data_dir=DIR/tiny-imagenet-200")
    if not data_dir:
        raise DataNotFoundError(how)
    for root in (data_dir, os.path.join(data_dir, "tiny-imagenet-200")):
        if os.path.exists(os.path.join(root, "wnids.txt")) and os.path.isdir(os.path.join(root, "train")):
            return root
    raise DataNotFoundError(f"no tiny-imagenet-200 folder (wnids.txt, train/, val/) under {data_dir}. {how}")


def _read_images(paths: list, size: int = 64) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size)) if im.size != (size, size)
                                else im.convert("RGB"))
    return out


def _subset(items: list, num: Optional[int]) -> list:
    """All of `items`, or a seeded random `num` of them in their original order (classes stay balanced on average)."""
    if num is None or num >= len(items):
        return items
    keep = np.sort(np.random.default_rng(0).choice(len(items), num, replace=False))
    return [items[i] for i in keep]


def tiny_imagenet(data_dir: Optional[str], num_train: Optional[int], num_test: Optional[int]):
    """Tiny-ImageNet (200 classes, 64x64) from the official zip's folder; its labelled val split is the test split."""
    root = _tiny_imagenet_root(data_dir)
    with open(os.path.join(root, "wnids.txt"), encoding="utf-8") as f:
        wnids = [w.strip() for w in f if w.strip()]
    label = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        folder = os.path.join(root, "train", w, "images")
        train += [(os.path.join(folder, n), label[w]) for n in sorted(os.listdir(folder))]
    test = []
    with open(os.path.join(root, "val", "val_annotations.txt"), encoding="utf-8") as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2:
                test.append((os.path.join(root, "val", "images", parts[0]), label[parts[1]]))
    splits = []
    for items, num in ((train, num_train), (test, num_test)):
        items = _subset(items, num)
        splits.append(ArrayData(_read_images([p for p, _ in items]), np.asarray([y for _, y in items], np.int32)))
    return splits[0], splits[1], len(wnids)


def probe_channels(config) -> int:
    """The channel count of the probe data set's images (known before reading it)."""
    name = config.dataset.name
    if name == "synthetic":
        return int(config.dataset.num_channels)
    return 1 if name in ("fashion_mnist", "fashion_mnist_heldout") else 3


def load_probe_data(config) -> tuple[ArrayData, ArrayData, int, str]:
    """(train, test, number of classes, description) of the probe data set; images uint8 NHWC."""
    cfg, name = config.dataset, config.dataset.name
    if name not in PROBE_DATASETS:
        raise ConfigError(f"unknown probe data set {name!r}; valid: {', '.join(PROBE_DATASETS)}")
    num_train, num_test = cfg.get("num_train"), cfg.get("num_test")
    if name == "stl10":
        download = cfg.get("download", False)
        if not download and not sources.tfds_prepared(name, cfg.data_dir):
            raise DataNotFoundError(sources.how_to_get(name, cfg.data_dir))
        train = sources.tfds_arrays(name, "train", cfg.data_dir, download, num_train)
        test = sources.tfds_arrays(name, "test", cfg.data_dir, download, num_test)
        return train, test, 10, name
    if name == "tiny_imagenet":
        train, test, num_classes = tiny_imagenet(cfg.data_dir, num_train, num_test)
        return train, test, num_classes, name
    sub = ml_collections.ConfigDict(cfg.to_dict())
    describe = name
    if name == "fashion_mnist_heldout":
        sub.name = "fashion_mnist"
        sub.classes = tuple(int(c) for c in config.probe.heldout_classes)
        describe = f"fashion_mnist classes {','.join(map(str, sub.classes))}"
    elif sub.get("classes"):
        describe = f"{name} classes {','.join(map(str, sub.classes))}"
    ds = data_lib.load(sub, config.seed)
    return ds.train, ds.test, ds.num_classes, describe


# --------------------------------------------------------------------------------------------------------------------
# Features and the linear classifier


def extract_features(model, variables, images: np.ndarray, *, image_size: int, mean, std, batch_size: int,
                     resize_method: str = "linear") -> np.ndarray:
    """Pooled penultimate features [N, D] (float32) of uint8 NHWC `images`, resized to `image_size` and normalised
    with `mean` / `std` (pixel units), in eval mode; one compiled batch shape (the last batch is padded)."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    @jax.jit
    def features(variables, x):
        x = x.astype(jnp.float32)
        if x.shape[1:3] != (image_size, image_size):
            x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), resize_method, antialias=True)
        _, feats = model.apply(variables, aug.normalize(x, mean, std), train=False)
        return feats[-1].reshape(x.shape[0], -1).astype(jnp.float32)

    n = images.shape[0]
    batch = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        if chunk.shape[0] < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)])
        out.append(features(variables, chunk))
    return np.asarray(jnp.concatenate(out))[:n] if out else np.zeros((0, 0), np.float32)


def make_linear_optimizer(optimizer: str, learning_rate: float, momentum: float, weight_decay: float,
                          total_steps: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    if optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=momentum)
    elif optimizer == "adam":
        opt = optax.adam(schedule)
    else:
        raise ConfigError(f"unknown probe.optimizer {optimizer!r}; valid: sgd, adam")
    return optax.chain(optax.add_decayed_weights(weight_decay), opt)


def _logits(params, x):
    return x @ params["w"] + params["b"]


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, *, num_epochs: int, batch_size: int,
               learning_rate: float, seed: int, optimizer: str = "sgd", momentum: float = 0.9,
               weight_decay: float = 0.0) -> tuple[dict, np.ndarray]:
    """Softmax regression on features `x` [N, D] with labels `y`, from zero weights; one jitted call for the whole
    run. Each epoch is a fresh permutation (seeded) cut into N // batch_size batches (the remainder is left out of
    that epoch; batch_size <= 0 or >= N is full batch). Returns (params {'w', 'b'}, mean train loss per epoch)."""
    n, d = x.shape
    batch = n if batch_size <= 0 else min(batch_size, n)
    steps = n // batch
    tx = make_linear_optimizer(optimizer, learning_rate, momentum, weight_decay, num_epochs * steps)
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

    def loss_fn(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()

    @jax.jit
    def run(params, x, y, key):
        def epoch(carry, e):
            perm = jax.random.permutation(jax.random.fold_in(key, e), n)[: steps * batch].reshape(steps, batch)

            def step(carry, idx):
                p, opt_state = carry
                loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
                updates, opt_state = tx.update(grads, opt_state, p)
                return (optax.apply_updates(p, updates), opt_state), loss

            carry, losses = jax.lax.scan(step, carry, perm)
            return carry, losses.mean()

        (params, _), losses = jax.lax.scan(epoch, (params, tx.init(params)), jnp.arange(num_epochs))
        return params, losses

    params, losses = run(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jax.random.PRNGKey(seed))
    return jax.device_get(params), np.asarray(losses)


def evaluate_linear(params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of the linear classifier on features `x`."""
    if len(y) == 0:
        return float("nan"), float("nan")
    logits = _logits(jax.tree.map(jnp.asarray, params), jnp.asarray(x))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(y))), float(loss)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scales every array by the train features' per-dimension mean and std (dimensions constant on train: std 1)."""
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    return [(a - mu) / sd for a in (train, *others)]


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (pixel units) of uint8 images, computed in chunks."""
    c = images.shape[-1]
    s, s2, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, images.shape[0], 4096):
        chunk = images[start:start + 4096].reshape(-1, c).astype(np.float64)
        s, s2, count = s + chunk.sum(0), s2 + (chunk ** 2).sum(0), count + chunk.shape[0]
    mean = s / max(count, 1)
    return mean.astype(np.float32), np.sqrt(np.maximum(s2 / max(count, 1) - mean ** 2, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# The task


def _check_workdir(workdir: str, source: str) -> None:
    if paths.workdir_path(workdir) == paths.workdir_path(source):
        raise ConfigError("--workdir must not be the probed run's workdir: pass a new directory for the probe")
    path = paths.workdir_path(workdir) / "config.json"
    if path.exists():
        task = json.loads(path.read_text(encoding="utf-8")).get("task", "teacher")
        if task != "probe":
            raise ConfigError(f"{workdir} holds a {task!r} run: use another --workdir for the probe")


def probe_and_evaluate(config, workdir: str) -> dict:
    """Fits a linear classifier on a frozen network's features of `config.dataset`; returns train and test top-1.

    Writes WORKDIR/config.json, WORKDIR/metrics.jsonl (the classifier's loss every `log_every_epochs` epochs, then
    the result) and WORKDIR/probe.json (the result with everything needed to read it).
    """
    start = time.perf_counter()
    p = config.probe
    if config.dataset.name not in PROBE_DATASETS:
        raise ConfigError(f"unknown probe data set {config.dataset.name!r}; valid: {', '.join(PROBE_DATASETS)}")
    if p.normalization not in ("source", "target"):
        raise ConfigError(f"unknown probe.normalization {p.normalization!r}; valid: source, target")
    if p.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"unknown probe.optimizer {p.optimizer!r}; valid: sgd, adam")
    if p.num_epochs <= 0 or p.feature_batch_size <= 0:
        raise ConfigError("probe.num_epochs and probe.feature_batch_size must be positive")
    source = config.student.checkpoint
    net = load_network(source, config.student.which)
    _check_workdir(workdir, source)
    channels = probe_channels(config)
    if channels != net["image_shape"][-1]:
        raise ConfigError(f"the network in {source} was trained on {net['image_shape'][-1]}-channel images "
                          f"({net['dataset']}) but {config.dataset.name} has {channels}-channel images: the probed "
                          f"network must have been trained on images with the same channel count")
    train, test, num_classes, describe = load_probe_data(config)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"the probe data set {describe} has an empty split ({len(train)} train / {len(test)} test)")
    if config.dataset.name == "fashion_mnist_heldout":
        seen = set(net["classes"] or range(10)) if net["dataset"] == "fashion_mnist" else set()
        overlap = sorted(seen & {int(c) for c in p.heldout_classes})
        if overlap:
            log.warning("the network was trained on Fashion-MNIST classes %s, which the probe holds out: this is "
                        "not a transfer test (train it with --config.dataset.classes=<the other classes>)", overlap)
    image_size = p.image_size or net["image_shape"][0]
    if p.normalization == "source":
        mean, std = sources.normalization(net["dataset"], channels)
    else:
        mean, std = _channel_stats(train.images)

    is_main = jax.process_index() == 0
    out = paths.workdir_path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n", encoding="utf-8")
        log.info("linear probe: %s (%s run %s, epoch %s) on %s: %d train / %d test images %s -> %dx%d",
                 net["model_name"], net["task"], source, net["epoch"], describe, len(train), len(test),
                 "x".join(map(str, train.images.shape[1:])), image_size, image_size)
    extract = functools.partial(extract_features, net["model"], net["variables"], image_size=image_size, mean=mean,
                                std=std, batch_size=p.feature_batch_size, resize_method=p.resize_method)
    t0 = time.perf_counter()
    f_train, f_test = extract(train.images), extract(test.images)
    feature_seconds = time.perf_counter() - t0
    if p.standardize:
        f_train, f_test = standardize(f_train, f_test)
    t0 = time.perf_counter()
    params, losses = fit_linear(f_train, train.labels, num_classes, num_epochs=p.num_epochs, batch_size=p.batch_size,
                                learning_rate=p.learning_rate, seed=config.seed, optimizer=p.optimizer,
                                momentum=p.momentum, weight_decay=p.weight_decay)
    fit_seconds = time.perf_counter() - t0
    train_top1, train_loss = evaluate_linear(params, f_train, train.labels)
    test_top1, test_loss = evaluate_linear(params, f_test, test.labels)
    result = {"probe/train_top1": train_top1, "probe/test_top1": test_top1}
    summary = {
        **result, "probe/train_loss": train_loss, "probe/test_loss": test_loss,
        "chance_top1": 1.0 / num_classes, "dataset": config.dataset.name, "data": describe,
        "num_classes": num_classes, "num_train": len(train), "num_test": len(test),
        "heldout_classes": list(p.heldout_classes) if config.dataset.name == "fashion_mnist_heldout" else None,
        "image_size": image_size, "feature_dim": int(f_train.shape[1]),
        "source": {"workdir": os.fspath(paths.workdir_path(source)), "task": net["task"],
                   "model": net["model_name"],
                   "dataset": net["dataset"], "classes": list(net["classes"]) if net["classes"] else None,
                   "checkpoint": config.student.which, "epoch": net["epoch"]},
        "recipe": {"normalization": p.normalization, "resize_method": p.resize_method, "standardize": p.standardize,
                   "optimizer": p.optimizer, "learning_rate": p.learning_rate, "momentum": p.momentum,
                   "weight_decay": p.weight_decay, "num_epochs": p.num_epochs, "batch_size": p.batch_size,
                   "seed": config.seed},
        "seconds": {"features": feature_seconds, "fit": fit_seconds, "total": time.perf_counter() - start},
    }
    if is_main:
        writer = metrics_lib.MetricWriter(workdir)
        try:
            every = max(1, p.log_every_epochs)
            for e in range(p.num_epochs):
                if (e + 1) % every == 0 or e + 1 == p.num_epochs:
                    writer.write(e + 1, {"epoch": e + 1, "probe/fit_loss": float(losses[e])})
            writer.write(p.num_epochs, {k: v for k, v in summary.items() if k.startswith("probe/")})
        finally:
            writer.close()
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        log.info("linear probe of %s on %s: test top-1 %.4f, train top-1 %.4f (%d classes, chance %.4f; %d-d "
                 "features)", net["model_name"], describe, test_top1, train_top1, num_classes, 1.0 / num_classes,
                 f_train.shape[1])
    return result
