"""Teachers from PyTorch: `python -m wcord_jax.tools.import_teacher --source S --model M --checkpoint FILE --workdir DIR`.

Reads a published PyTorch checkpoint (RepDistiller's / mdistiller's CIFAR-100 teachers, torchvision's ImageNet
ResNets), maps every tensor onto the zoo's flax network and writes DIR as a finished teacher run, which
`--config.teacher.checkpoint=DIR` then loads like one trained here:

    python -m wcord_jax.tools.import_teacher --source repdistiller --model resnet32x4 \\
        --checkpoint cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth --workdir runs/resnet32x4
    python -m wcord_jax.tools.import_teacher --source torchvision --model resnet34 \\
        --checkpoint resnet34-b627a593.pth --workdir runs/resnet34

* The file: RepDistiller's `{'model': state_dict, ...}` or a bare state_dict, with or without DataParallel's
  `module.` prefix; `*.num_batches_tracked` is ignored. It is read with `torch.load(..., weights_only=True)` and an
  allow-list of the few non-tensor classes the published files hold (`argparse.Namespace`, numpy scalars and
  dtypes): a file that would run code when unpickled is refused, never executed.
* The mapping: convolution kernels OIHW -> HWIO, Linear weights transposed, batch norm weight/bias/running mean/
  running variance -> scale/bias/mean/var. Any missing, unexpected or wrongly shaped tensor ends the command with one
  line naming it (exit status 2). The running variance is copied as it is: in eval mode PyTorch and flax both
  normalise by the stored running variance (PyTorch accumulates it from unbiased batch variances, flax from biased
  ones; that matters only if the teacher were trained further), so the imported teacher's eval-mode logits are
  PyTorch's (tested to 1e-4).
* The workdir: an orbax checkpoint of a train state holding the weights (step 0, a fresh optimizer state), its
  metadata (model, data set, classes, the normalisation RepDistiller / torchvision used) and `config.json`.
* Then the teacher is evaluated on the data set's test split if the data set is available here (`--config.dataset.*`
  as for a run; default CIFAR-100 for `repdistiller`, ImageNet for `torchvision`) and its top-1 is logged and stored.

PyTorch is an optional dependency (`pip install -e '.[torch]'`), imported by this command only.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from wcord_jax import configs

USAGE_ERROR = 2
SOURCES = {
    # source: (default data set, its number of classes, the architectures it publishes in this zoo's names)
    "repdistiller": ("cifar100", 100, ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                       "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1",
                                       "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet50",
                                       "MobileNetV2", "ShuffleV1", "ShuffleV2")),
    "torchvision": ("imagenet2012", 1000, ("resnet18", "resnet34")),
}
# MobileNetV2's Sequential wrappers: the stem and head conv-BN pairs and the classifier, and the positions of the
# inverted residual's convs and BNs in its `conv` Sequential.
_MOBILENET_TOP = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv2.0", "bn2": "conv2.1",
                  "classifier": "classifier.0"}
_MOBILENET_INNER = {"conv_pw": "0", "bn_pw": "1", "conv_dw": "3", "bn_dw": "4", "conv_pwl": "6", "bn_pwl": "7"}

_overridden: set = set()
_FLAGS: dict = {}  # defined by `run()` only, so that importing this module defines no absl flags


def _define_flags() -> None:
    _FLAGS.update(
        source=flags.DEFINE_enum("source", None, list(SOURCES), "Where the checkpoint comes from."),
        model=flags.DEFINE_string("model", None, "The zoo's name of the architecture, e.g. resnet32x4."),
        checkpoint=flags.DEFINE_string("checkpoint", None, "The PyTorch file (.pth)."),
        workdir=flags.DEFINE_string("workdir", None, "The teacher run's directory to write."),
        config=config_flags.DEFINE_config_dict("config", configs.teacher_config("resnet32x4"),
                                               "Run settings; --config.dataset.* selects the evaluation data."))

log = logging.getLogger("wcord_jax")


class ImportFailed(ValueError):
    """The checkpoint cannot be imported; the message names the reason (one line)."""


# --------------------------------------------------------------------------------------------------------------------
# Reading a .pth safely


def _allowed_globals() -> list:
    """The non-tensor classes the published checkpoints hold besides tensors and containers."""
    allowed: list = [argparse.Namespace, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
            allowed.append(module.scalar)
            break
        except (ImportError, AttributeError):
            continue
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    allowed += [np.float64, np.float32, np.int64, np.int32, np.bool_]
    return allowed


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint as numpy arrays, keyed without `module.`; ImportFailed otherwise."""
    try:
        import torch
    except ImportError:
        raise ImportFailed("PyTorch is needed to read a .pth file: pip install -e '.[torch]' (the CPU build is "
                           "enough)") from None
    if not os.path.isfile(path):
        raise ImportFailed(f"--checkpoint {path}: no such file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ImportFailed(f"{path} was refused: it holds Python objects that loading would have to run or build "
                           f"({what.group(1) if what else first}); only tensors, containers and a few numpy and "
                           "argparse classes are read, never arbitrary code") from None
    except Exception as e:  # not a checkpoint at all: a zip / pickle error of some kind
        raise ImportFailed(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # RepDistiller's {'epoch', 'model', 'accuracy', 'optimizer'}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImportFailed(f"{path} holds no state dict (expected {{'model': state_dict}} or a bare state_dict of "
                           "tensors)")
    out = {}
    for key, tensor in obj.items():
        if key.endswith("num_batches_tracked"):
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = tensor.detach().float().numpy()
    return out


# --------------------------------------------------------------------------------------------------------------------
# The mapping


def torch_name(path: tuple[str, ...], model: str) -> str:
    """The PyTorch module name of a flax module path: `layer2_0/down_conv` -> `layer2.0.downsample.0`."""
    if model == "MobileNetV2":  # blocksK_I/conv_dw -> blocks.K.I.conv.3
        m = re.fullmatch(r"blocks(\d+)_(\d+)", path[0])
        if m:
            return f"blocks.{m.group(1)}.{m.group(2)}.conv.{_MOBILENET_INNER[path[1]]}"
        return _MOBILENET_TOP[path[0]]
    if model == "ShuffleV2":  # a stage is Sequential(DownBlock, BasicBlock, ...): layerK_down -> layerK.0
        m = re.fullmatch(r"layer(\d+)_(down|\d+)", path[0])
        if m:
            i = 0 if m.group(2) == "down" else int(m.group(2)) + 1
            return ".".join([f"layer{m.group(1)}", str(i), *path[1:]])
    parts = []
    for part in path:
        m = re.fullmatch(r"(layer|block)(\d+)_(\d+)", part)
        vgg = re.fullmatch(r"block(\d+)_(conv|bn)(\d+)", part)
        if m and m.group(1) == "block":  # RepDistiller's WideResNet: blockK.layer.I
            parts += [f"block{m.group(2)}", "layer", m.group(3)]
        elif m:
            parts += [f"layer{m.group(2)}", m.group(3)]
        elif vgg:  # RepDistiller's VGG: blockK is a Sequential of [conv, bn, relu] * n (the last relu dropped)
            parts += [f"block{vgg.group(1)}", str(3 * int(vgg.group(3)) + (vgg.group(2) == "bn"))]
        else:
            parts.append({"down_conv": "downsample.0", "down_bn": "downsample.1", "conv_shortcut": "convShortcut",
                          "shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(part, part))
    return ".".join(parts)


def _leaf(collection: str, name: str, ndim: int) -> str:
    if collection == "batch_stats":
        return {"mean": "running_mean", "var": "running_var"}[name]
    return {"kernel": "weight", "scale": "weight", "bias": "bias"}[name]


def _to_flax(array: np.ndarray, name: str, flax_ndim: int) -> np.ndarray:
    if name == "kernel" and flax_ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name == "kernel" and flax_ndim == 2:
        return array.T  # Linear [out, in] -> Dense [in, out]
    return array


def convert(model: str, num_classes: int, state_dict: dict[str, np.ndarray], image_size: int) -> dict:
    """`{'params', 'batch_stats'}` of the zoo's `model` from a PyTorch state dict; ImportFailed naming any missing,
    unexpected or wrongly shaped tensor."""
    import jax
    import jax.numpy as jnp

    from wcord_jax import models

    net = models.get_model(model, num_classes)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))
    used, out = set(), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [k.key for k in path]
        collection, modules, name = keys[0], keys[1:-1], keys[-1]
        key = f"{torch_name(tuple(modules), model)}.{_leaf(collection, name, len(leaf.shape))}"
        if key not in state_dict:
            raise ImportFailed(f"the checkpoint has no {key} (needed by {model}'s {'/'.join(keys)}): is it a "
                               f"{model} for {num_classes} classes?")
        value = _to_flax(state_dict[key], name, len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            raise ImportFailed(f"{key} has shape {list(state_dict[key].shape)}, but {model} for {num_classes} "
                               f"classes needs {list(leaf.shape)} ({'/'.join(keys)})")
        used.add(key)
        node = out.setdefault(collection, {})
        for m in modules:
            node = node.setdefault(m, {})
        node[name] = np.ascontiguousarray(value, np.float32)
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise ImportFailed(f"the checkpoint has tensors {model} does not: {', '.join(unexpected[:3])}{more}")
    return {"params": out.get("params", {}), "batch_stats": out.get("batch_stats", {})}


# --------------------------------------------------------------------------------------------------------------------
# Writing the workdir and evaluating


def write_run(workdir: str, config, variables: dict, meta_extra: dict) -> None:
    """DIR as a finished teacher run: an orbax checkpoint (train state at step 0), its metadata and config.json."""
    import jax

    from wcord_jax import checkpoint as ckpt_lib
    from wcord_jax import models, optim, paths, rundir, train
    from wcord_jax.data import sources

    channels = 3
    net = models.get_model(config.model, config.dataset.num_classes)
    tx = optim.make_optimizer(config, 1)
    state = train.create_train_state(jax.random.PRNGKey(0), net, tx,
                                     (config.dataset.image_size, config.dataset.image_size, channels))
    state = state.replace(params=jax.tree.map(np.asarray, variables["params"]),
                          batch_stats=jax.tree.map(np.asarray, variables["batch_stats"]))
    mean, std = sources.normalization(config.dataset.name, channels)
    classes = config.dataset.get("classes")
    meta = {"model": config.model, "task": "teacher", "epoch": 0, "best_top1": -1.0,
            "dataset": config.dataset.name, "num_classes": int(config.dataset.num_classes),
            "classes": [int(c) for c in classes] if classes is not None else None, "view": "identity",
            "view_mean": [float(v) for v in mean], "view_std": [float(v) for v in std], **meta_extra}
    paths.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    try:
        ckpt.save(0, state, meta)
    finally:
        ckpt.close()
    rundir.write_config(workdir, config)


def evaluate(config, variables: dict) -> dict:
    """The teacher's eval metrics on the data set's test split (raises DataNotFoundError without the data)."""
    import jax.numpy as jnp

    from wcord_jax import data, feeds, models, parallel

    mesh = parallel.make_mesh(config.get("num_devices") or None)
    dataset = data.load(config.dataset, config.seed)
    feed = feeds.make_feed(dataset, mesh, config, None)
    net = models.get_model(config.model, dataset.num_classes)
    evaluator = feed.make_evaluator(lambda v, x: net.apply(v, x, train=False)[0], jnp.float32)
    return evaluator(parallel.replicate(variables, mesh))


def import_teacher(source: str, model: str, checkpoint: str, workdir: str, config) -> dict:
    """The whole command; returns the metadata written. ImportFailed for anything that cannot be imported."""
    if source not in SOURCES:
        raise ImportFailed(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    dataset, num_classes, published = SOURCES[source]
    if model not in published:
        raise ImportFailed(f"--source {source} --model {model}: not one of its architectures; valid: "
                           f"{', '.join(published)}")
    config.model = model
    if "dataset.name" not in _overridden:
        config.dataset.name = dataset
    if "dataset.num_classes" not in _overridden:
        config.dataset.num_classes = num_classes
    if source == "torchvision" and "dataset.image_size" not in _overridden:
        config.dataset.image_size = 224
    state_dict = read_state_dict(checkpoint)
    num_classes = int(config.dataset.num_classes)
    if config.dataset.get("classes") is not None:
        num_classes = len(config.dataset.classes)
    variables = convert(model, num_classes, state_dict, int(config.dataset.image_size))
    log.info("read %d tensors of %s from %s", len(state_dict), model, checkpoint)

    from wcord_jax.data import DataNotFoundError

    extra: dict = {"imported_from": os.path.abspath(checkpoint), "source": source}
    try:
        result = evaluate(config, variables)
    except DataNotFoundError as e:
        log.warning("not evaluated: %s", str(e).splitlines()[0])
    else:
        extra.update({k: float(v) for k, v in result.items()})
        extra["best_top1"] = float(result["eval/top1"])
        log.info("%s on %s: test top-1 %.4f top-5 %.4f", model, config.dataset.name, result["eval/top1"],
                 result["eval/top5"])
    write_run(workdir, config, variables, extra)
    log.info("wrote %s: use it with --config.teacher.checkpoint=%s", workdir, workdir)
    return extra


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    _overridden.clear()
    _overridden.update(a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config."))
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        _fail(lines[0] if lines else type(e).__name__)
    return []  # unreachable


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    del argv
    values = {name: flag.value for name, flag in _FLAGS.items()}
    for name in ("source", "model", "checkpoint", "workdir"):
        if not values[name]:
            _fail(f"--{name} is required (python -m wcord_jax.tools.import_teacher --source {'|'.join(SOURCES)} "
                  "--model NAME --checkpoint FILE.pth --workdir DIR)")
    config = values["config"]
    _setup_logging()
    from wcord_jax.data import DataNotFoundError
    from wcord_jax.core import ConfigError

    try:
        import_teacher(values["source"], values["model"], values["checkpoint"], values["workdir"], config)
    except (ImportFailed, ConfigError, DataNotFoundError) as e:
        _fail(str(e))


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
