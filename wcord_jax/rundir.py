"""A run directory, local or on object storage (`gs://...`, through `etils.epath`): what a finished (or running)
teacher or distillation run wrote there, read one way by every tool.

    from wcord_jax import rundir
    config = rundir.read_config(workdir)           # its config.json, as a dict
    events = rundir.read_events(workdir)           # its metrics.jsonl, oldest first
    meta, variables = rundir.read_checkpoint(workdir)  # its newest checkpoint: metadata (epoch, view), weights
    net = rundir.load_network(workdir)             # the network it trained: the student of a distillation run
    logits, _ = net.model.apply(net.variables, images, train=False)

Distillation reads its teachers through `read_checkpoint` and `check_network`; the probe, the pictures, summary,
the study and import_teacher through the rest.

Errors are `RunDirError` (a `ConfigError`): one line naming the workdir and what is missing or wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from wcord_jax.core import ConfigError
from wcord_jax.paths import PathLike, workdir_path

TASKS = ("teacher", "distill")  # the runs that train a network


class RunDirError(ConfigError):
    """A workdir that is missing, holds no run, or holds something other than its config.json says."""


class CheckpointMissing(RunDirError):
    """The workdir holds no finished checkpoint."""


class CheckpointDamaged(RunDirError):
    """The newest checkpoint exists but cannot be read (a killed copy, a full disk)."""


def read_config(workdir: PathLike) -> dict:
    """The resolved config the run wrote to WORKDIR/config.json, as a plain dict."""
    check_workdir(workdir)
    config = workdir_path(workdir) / "config.json"
    if not config.exists():
        raise RunDirError(f"{os.fspath(workdir)} has no config.json: pass the workdir of a finished wcord_jax run "
                          "(the --workdir it was trained with)")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunDirError(f"{os.fspath(workdir)}/config.json is not JSON ({e})") from e


def write_config(workdir: PathLike, config) -> None:
    """WORKDIR/config.json: the run's resolved config (an ml_collections ConfigDict)."""
    (workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n", encoding="utf-8")


def check_resume_matches(workdir: PathLike, config) -> None:
    """RunDirError unless the run already in WORKDIR (if any) trains the same model, task and method as `config`."""
    old = existing_config(workdir)
    for key in ("model", "task", "method"):
        if old is not None and key in old and old[key] != config.get(key):
            raise RunDirError(f"{os.fspath(workdir)} holds a run with {key}={old[key]!r}, not "
                              f"{config.get(key)!r}: use another --workdir")


def existing_config(workdir: PathLike) -> Optional[dict]:
    """WORKDIR/config.json as a dict, or None where the workdir or its config.json does not exist yet."""
    path = workdir_path(workdir) / "config.json"
    return read_config(workdir) if path.exists() else None


def check_workdir(workdir: PathLike) -> None:
    """RunDirError unless `workdir` is a directory (a bucket prefix that holds objects, on object storage)."""
    if not workdir_path(workdir).is_dir():
        raise RunDirError(f"no such workdir: {os.fspath(workdir)}")


def read_events(workdir: PathLike, required: bool = False) -> list[dict]:
    """The events of the run's metrics.jsonl, oldest first: none before the run has logged, or (`required`) a
    RunDirError naming what is missing: the workdir, its metrics.jsonl, any event; an unreadable file is one too."""
    from wcord_jax import metrics

    path = workdir_path(workdir) / "metrics.jsonl"
    if required:
        check_workdir(workdir)
    if not path.exists():
        if required:
            raise RunDirError(f"{os.fspath(workdir)} has no metrics.jsonl (is it a wcord_jax workdir?)")
        return []
    try:
        events = metrics.read_metrics(workdir)
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot read {os.fspath(path)}: {e}") from e
    if required and not events:
        raise RunDirError(f"{os.fspath(path)} is empty")
    return events


def _read_checkpoint(read, workdir: PathLike, which: str, role: str):
    from wcord_jax import checkpoint as ckpt_lib

    try:
        return read(workdir, which)
    except FileNotFoundError as e:
        raise CheckpointMissing(f"{role}checkpoint not found: {e}") from e
    except Exception as e:  # a damaged checkpoint: orbax / tensorstore raise many kinds
        raise CheckpointDamaged(f"the {role}checkpoint in {os.fspath(workdir)} cannot be read "
                                f"({ckpt_lib.reason(e)})") from e


def read_checkpoint(workdir: PathLike, which: str = "last", role: str = "") -> tuple[dict, dict]:
    """(metadata, `{'params', 'batch_stats'}` as host arrays) of the run's newest `which` ('last' or 'best')
    checkpoint, both from the same step; `role` ('teacher ', say) names the checkpoint in the errors. A
    distillation run's params hold the student and the method's modules: `load_network` gives the student alone."""
    from wcord_jax import checkpoint as ckpt_lib

    state, meta = _read_checkpoint(ckpt_lib.load_checkpoint, workdir, which, role)
    return meta, ckpt_lib.variables_of(state)


CLASSIFIER_NAMES = ("fc", "linear", "classifier")  # the zoo's names for a network's last layer


def classifier_size(variables: dict) -> Optional[int]:
    """The number of outputs of the classifier in a network's variables (None if it has none the zoo names)."""
    params = variables.get("params", {})
    for name in CLASSIFIER_NAMES:
        if name in params and "bias" in params[name]:
            return int(params[name]["bias"].shape[-1])
    return None


def check_network(model, variables: dict, image_shape) -> bool:
    """Whether `variables` ({'params', 'batch_stats'}) have the shapes `model` has for images of `image_shape`."""
    import jax
    import jax.numpy as jnp

    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    got = {k: variables.get(k) or {} for k in ("params", "batch_stats")}
    return shapes(got) == shapes({k: expected.get(k, {}) for k in ("params", "batch_stats")})


def trained_data(config: dict) -> tuple[str, int, tuple[int, int, int], Optional[tuple]]:
    """(data set name, number of classes, image shape, class subset) a run's network was trained on, from its
    config.json's `dataset` block (and `view`: a gray view gives one channel)."""
    from wcord_jax.data import sources

    ds = config.get("dataset") or {}
    name, classes = ds.get("name"), ds.get("classes")
    if name == "synthetic":
        num_classes, shape = ds["num_classes"], (ds["image_size"], ds["image_size"], ds.get("num_channels", 3))
    elif name == "imagenet2012":
        num_classes, shape = 1000, (224, 224, 3)
    elif name == "fashion_mnist":
        num_classes, shape = 10, (32, 32, 1)  # zero-padded 28 -> 32
    elif name in sources.NUM_CLASSES:
        num_classes, shape = sources.NUM_CLASSES[name], (32, 32, 3)
    else:
        raise RunDirError(f"cannot tell what the run was trained on (dataset.name={name!r} in its config.json)")
    if classes:
        classes = tuple(int(c) for c in classes)
        num_classes = len(classes)
    return name, int(num_classes), tuple(int(s) for s in shape), classes


@dataclasses.dataclass
class Network:
    """The network a run trained, ready for `model.apply(variables, images, train=False)`."""

    path: str
    task: str  # 'teacher' or 'distill' (then this is the student)
    model_name: str
    model: Any  # the flax module
    variables: dict  # {'params', 'batch_stats'} of that network only, as host arrays
    num_classes: int
    meta: dict  # the checkpoint's metadata (epoch, view, view_mean / view_std, ...)
    config: dict  # the run's config.json


def load_network(workdir: PathLike, which: str = "last", dtype=None, num_classes: Optional[int] = None) -> Network:
    """The network the run in `workdir` trained (the student of a distillation run, whatever its method, heads and
    modules), from its `which` ('last' or 'best') checkpoint; `dtype` its activations' (default float32);
    `num_classes` overrides the number its config gives (a data set read with other classes)."""
    import jax
    import jax.numpy as jnp

    from wcord_jax import models

    config = read_config(workdir)
    task = config.get("task", "teacher")
    if task not in TASKS:
        raise RunDirError(f"{os.fspath(workdir)} holds a {task!r} run; pass the workdir of a teacher or "
                          "distillation run")
    if which not in ("last", "best"):
        raise RunDirError(f"unknown checkpoint {which!r}; valid: last, best")
    name = config.get("model")
    if name not in models.list_models():
        raise RunDirError(f"{os.fspath(workdir)}/config.json names an unknown model {name!r}")
    if num_classes is None:
        num_classes = trained_data(config)[1]
    meta, variables = read_checkpoint(workdir, which)
    if meta.get("model") not in (None, name):
        raise RunDirError(f"{os.fspath(workdir)} holds a {meta['model']} checkpoint, but its config.json says {name}")
    params = variables["params"]
    if task == "distill":  # DistillState.params: {'student': ..., the method's heads and modules}
        params = params["student"]
    variables = {"params": params, "batch_stats": variables.get("batch_stats") or {}}
    model = models.get_model(name, num_classes, dtype=dtype or jnp.float32)
    shape = _input_shape(config, meta)
    if not check_network(model, variables, shape):
        raise RunDirError(f"{os.fspath(workdir)} does not hold a {name} for {num_classes} classes and "
                          f"{shape[-1]}-channel images, as its config.json says (its parameters have other shapes)")
    return Network(os.fspath(workdir), task, name, model, jax.tree.map(jnp.asarray, variables), int(num_classes),
                   meta, config)


def _input_shape(config: dict, meta: dict) -> tuple[int, int, int]:
    """The shape of the images the network reads: the data set's, with the channels of the run's view."""
    h, w, c = trained_data(config)[2]
    if meta.get("view_mean") is not None:
        c = len(meta["view_mean"])
    return h, w, c
