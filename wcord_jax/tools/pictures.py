"""Pictures of finished runs: training curves and the CRD correlation-difference figure.

    python -m wcord_jax.tools.pictures curves WORKDIR [WORKDIR ...] --out curves.png [--metric eval/top1] [--labels A B ..]
        [--terms TERM ...]
    python -m wcord_jax.tools.pictures correlation --teacher TEACHER_WORKDIR --student STUDENT_WORKDIR --out corr.png [--json]

`curves` reads each run's `metrics.jsonl`: the chosen metric (test top-1 by default) per epoch, the train loss per
logged step and, for distillation runs, each loss term `train/<term>` in a small panel of its own (`--terms` picks
them, e.g. `--terms wcord_global emb_teacher_cos emb_student_cos emb_pos_cos`).

`correlation` is Fig. 2/3 of Tian, Krishnan & Isola (CRD, ICLR 2020): the teacher's and the student's class logits on
the test split, the Pearson correlation between every pair of logit columns across the test examples for each, and
the absolute difference |corr_t - corr_s| drawn as a heatmap. It prints the mean of that matrix over all C x C entries
(the diagonal is 0 by construction); 0 means the student reproduces the teacher's inter-class correlations exactly.

Mistakes (a missing workdir, an unknown metric) end with one line `error: ...` on stderr and exit status 2.
Figures are drawn with matplotlib's Agg canvas (no display needed); the file format follows the extension of --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from wcord_jax import rundir

USAGE_ERROR = 2
# train/<key> entries that are not loss terms.
_NOT_TERMS = ("loss", "top1", "lr", "img_per_s")


class PictureError(Exception):
    """Something about the inputs the user can fix; the CLI prints it as one `error:` line."""


# --------------------------------------------------------------------------------------------------------------------
# Drawing helpers


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (pyplot and its global backend state are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:  # an unwritable place, an extension matplotlib has no writer for
        raise PictureError(f"cannot write {out}: {e}") from e
    return out


def _check_workdir(workdir: str) -> None:
    try:
        rundir.check_workdir(workdir)
    except rundir.RunDirError as e:
        raise PictureError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------------
# Training curves


def load_run(workdir: str) -> list[dict]:
    """The events of a run's metrics.jsonl; PictureError if there are none."""
    try:
        return rundir.read_events(workdir, required=True)
    except rundir.RunDirError as e:
        raise PictureError(str(e)) from None


def series(records: Sequence[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x values, `key` values) over the events that hold both, sorted by x.

    A resumed run may log a step (or an epoch) twice; the later event wins.
    """
    points = {}
    for r in records:
        if key in r and x in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool):
            points[r[x]] = float(r[key])
    xs = sorted(points)
    return np.asarray(xs, dtype=float), np.asarray([points[v] for v in xs], dtype=float)


def loss_terms(records: Sequence[dict]) -> list[str]:
    """The names of the run's loss terms (`train/<term>` other than loss, top1, lr, img_per_s), in first-seen order."""
    terms = []
    for r in records:
        for k in r:
            if k.startswith("train/") and k[len("train/"):] not in _NOT_TERMS and k[len("train/"):] not in terms:
                terms.append(k[len("train/"):])
    return terms


def _metric_axis(records_by_run: Sequence[list[dict]], metric: str) -> str:
    """Eval metrics are drawn per epoch, everything else per step."""
    if metric.startswith("eval/") and all("epoch" in r for recs in records_by_run for r in recs if metric in r):
        return "epoch"
    return "step"


def _line(ax, xs, ys, colour: str, label: str) -> None:
    """A curve, with markers while there are few points (a single logged step is then still visible)."""
    ax.plot(xs, ys, marker="o" if len(xs) <= 60 else None, markersize=3, color=colour, label=label)


def plot_curves(workdirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
                metric: str = "eval/top1", terms: Optional[Sequence[str]] = None) -> str:
    """Draws the runs' curves into `out` and returns its path: the metric, the train loss and one small panel per
    logged term (`train/<term>`; only `terms`, in that order, when given). Raises PictureError for unusable input."""
    if not workdirs:
        raise PictureError("give at least one workdir")
    if labels is None:
        labels = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
    elif len(labels) != len(workdirs):
        raise PictureError(f"--labels has {len(labels)} names for {len(workdirs)} workdirs")
    runs = [load_run(w) for w in workdirs]
    if not any(metric in r for recs in runs for r in recs):
        known = sorted({k for recs in runs for r in recs for k in r if k not in ("step", "epoch")})
        raise PictureError(f"no run logged {metric!r}; logged: {', '.join(known)}")

    logged: list[str] = []
    for recs in runs:
        logged += [t for t in loss_terms(recs) if t not in logged]
    if terms is not None:
        missing = [t for t in terms if t not in logged]
        if missing:
            raise PictureError(f"no run logged train/{missing[0]}; logged terms: {', '.join(logged)}")
        terms = list(terms)
    else:
        terms = [] if set(logged) <= {"ce"} else logged  # cross-entropy alone: train/ce is train/loss
    per_row = 4
    term_rows = math.ceil(len(terms) / per_row)
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0, 3.6 + 2.2 * term_rows)
    grid = fig.add_gridspec(1 + term_rows, 2 * per_row, height_ratios=[1.6] + [1.0] * term_rows)
    ax_metric = fig.add_subplot(grid[0, :per_row])
    ax_loss = fig.add_subplot(grid[0, per_row:])
    term_axes = {t: fig.add_subplot(grid[1 + i // per_row, 2 * (i % per_row):2 * (i % per_row) + 2])
                 for i, t in enumerate(terms)}

    x_metric = _metric_axis(runs, metric)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for recs, label, colour in zip(runs, labels, colours):
        xs, ys = series(recs, metric, x_metric)
        if len(xs):
            _line(ax_metric, xs, ys, colour, label)
        teacher_key = "teacher/" + metric.split("/", 1)[1] if metric.startswith("eval/") else None
        _, t_ys = series(recs, teacher_key) if teacher_key else ((), ())
        if len(t_ys):  # a distillation run logs its teacher's accuracy at step 0
            ax_metric.axhline(t_ys[-1], color=colour, linestyle="--", linewidth=1, label=f"{label} (teacher)")
        xs, ys = series(recs, "train/loss")
        if len(xs):
            _line(ax_loss, xs, ys, colour, label)
        for term, ax in term_axes.items():
            xs, ys = series(recs, f"train/{term}")
            if len(xs):
                _line(ax, xs, ys, colour, label)

    pretty = {"eval/top1": "test top-1", "eval/top5": "test top-5", "eval/loss": "test loss"}
    ax_metric.set_title(pretty.get(metric, metric))
    ax_metric.set_xlabel(x_metric)
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_metric.legend(fontsize="small")
    ax_loss.set_title("train loss")
    ax_loss.set_xlabel("step")
    for term, ax in term_axes.items():
        ax.set_title(f"train/{term}", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("step", fontsize="x-small")
    for ax in [ax_metric, ax_loss, *term_axes.values()]:
        ax.grid(True, alpha=0.3)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------------------------------
# Correlation of class logits (CRD, Fig. 2/3)


def correlation_matrix(logits: np.ndarray) -> np.ndarray:
    """Pearson correlation between the columns of `logits` [N, C] across its N rows: `np.corrcoef(logits.T)`.

    Computed in float64; a constant column (no variance) has correlation 0 with the others and 1 with itself,
    where np.corrcoef would give NaN.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected logits of shape [examples >= 2, classes], got {x.shape}")
    x = x - x.mean(axis=0)
    constant = np.ptp(np.asarray(logits, dtype=np.float64), axis=0) == 0
    x[:, constant] = 0.0
    norm = np.sqrt(np.sum(x * x, axis=0))
    norm[constant] = 1.0
    corr = (x.T @ x) / np.outer(norm, norm)
    corr = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def correlation_difference(logits_t: np.ndarray, logits_s: np.ndarray) -> tuple[np.ndarray, float]:
    """(|corr_t - corr_s| as a [C, C] matrix, its mean over all C x C entries) for teacher and student logits
    [N, C] on the same N examples."""
    logits_t, logits_s = np.asarray(logits_t), np.asarray(logits_s)
    if logits_t.shape != logits_s.shape:
        raise ValueError(f"teacher logits {logits_t.shape} and student logits {logits_s.shape} differ in shape")
    diff = np.abs(correlation_matrix(logits_t) - correlation_matrix(logits_s))
    return diff, float(diff.mean())


def read_config(workdir: str) -> dict:
    """The resolved config a run wrote to WORKDIR/config.json, as a plain dict (`wcord_jax.rundir`)."""
    try:
        return rundir.read_config(workdir)
    except rundir.RunDirError as e:
        raise PictureError(str(e)) from e


def load_dataset(workdir: str):
    """The data set a run was trained on (its config.json's `dataset` block and `seed`)."""
    import ml_collections

    from wcord_jax import data as data_lib

    config = read_config(workdir)
    try:
        return data_lib.load(ml_collections.ConfigDict(config["dataset"]), config.get("seed", 0))
    except (ValueError, KeyError, data_lib.DataNotFoundError) as e:
        raise PictureError(f"cannot load the data set of {workdir}: {e}") from e


def logits_on_test(workdir: str, dataset=None, which: str = "last", batch_size: int = 256,
                   dtype: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C] float32, labels [N]) of the network a run trained (the student of a distillation run) on the
    test split, in eval mode and normalised as the run's evaluation normalises.

    `dataset` (a `wcord_jax.data.DataSet`) defaults to the run's own; `which` picks the `last` or `best` checkpoint;
    `dtype` the activation dtype (default: the run's).
    """
    import jax
    import jax.numpy as jnp

    from wcord_jax import backend
    from wcord_jax.data import augment as aug

    config = read_config(workdir)
    if dataset is None:
        dataset = load_dataset(workdir)
    if not dataset.in_memory:
        raise PictureError(f"{dataset.name} is streamed, not held in memory: logits_on_test needs an in-memory data set")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    dtype = dtype or backend.dtype(config.get("dtype", "float32"), backend.current())[0]  # 'auto': this backend's
    if dtype not in dtypes:
        raise PictureError(f"unknown dtype {dtype!r}; valid: {', '.join(dtypes)}")
    try:
        net = rundir.load_network(workdir, which, dtypes[dtype], num_classes=dataset.num_classes)
    except rundir.RunDirError as e:
        raise PictureError(str(e)) from e
    model, variables = net.model, net.variables
    mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)

    @jax.jit
    def apply(v, images):
        x = aug.normalize(images, mean, std, dtypes[dtype])
        return model.apply(v, x, train=False)[0].astype(jnp.float32)

    images, labels = dataset.test.images, dataset.test.labels
    n = len(labels)
    batch_size = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        rows = len(chunk)
        if rows < batch_size:  # pad the last batch so one compiled shape serves every batch
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(apply(variables, chunk))[:rows])
    return np.concatenate(out), np.asarray(labels)


def _dataset_identity(config: dict) -> dict:
    """What decides the test split's images: for synthetic data its shape and the run's seed too."""
    ds = dict(config.get("dataset", {}))
    keys = ["name", "data_dir"]
    if ds.get("name") == "synthetic":
        keys += ["image_size", "num_channels", "num_classes"]
        ds["seed"] = config.get("seed", 0)
        keys.append("seed")
    return {k: ds.get(k) for k in keys}


def plot_correlation(diff: np.ndarray, mean_abs: float, out: str, title: str) -> str:
    num_classes = diff.shape[0]
    fig = _figure(6.4, 5.4)
    ax = fig.add_subplot()
    image = ax.imshow(diff, cmap="viridis", vmin=0.0, vmax=max(float(diff.max()), 1e-6), interpolation="nearest")
    colourbar = fig.colorbar(image, ax=ax)
    colourbar.set_label("|corr_t - corr_s|")
    if num_classes <= 20:
        ax.set_xticks(range(num_classes))
        ax.set_yticks(range(num_classes))
        ax.tick_params(labelsize="x-small")
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    ax.set_title(f"{title}\nmean |corr_t - corr_s| = {mean_abs:.4f}", fontsize="medium")
    return _save(fig, out)


def correlation(teacher: Optional[str], student: str, out: str, which: str = "last",
                batch_size: int = 256) -> dict:
    """Computes and draws the correlation difference of a teacher and a student on the student run's test split.

    `teacher` defaults to the distillation run's `teacher.checkpoint`; its latest checkpoint is used (the one
    distillation loads), `which` picks the student's. Returns a summary dict.
    """
    student_config = read_config(student)
    if teacher is None:
        teacher = (student_config.get("teacher") or {}).get("checkpoint")
        if not teacher:
            raise PictureError(f"{student} is not a distillation run: name the teacher with --teacher")
    teacher_config = read_config(teacher)
    if _dataset_identity(teacher_config) != _dataset_identity(student_config):
        print(f"warning: {teacher} and {student} were run on different data "
              f"({_dataset_identity(teacher_config)} vs {_dataset_identity(student_config)}); "
              "using the student's test split", file=sys.stderr)
    dataset = load_dataset(student)
    logits_t, labels = logits_on_test(teacher, dataset, "last", batch_size)  # what distillation loads
    logits_s, _ = logits_on_test(student, dataset, which, batch_size)
    diff, mean_abs = correlation_difference(logits_t, logits_s)
    label_t = os.path.basename(os.path.normpath(teacher))
    label_s = os.path.basename(os.path.normpath(student))
    plot_correlation(diff, mean_abs, out, f"teacher {label_t} ({teacher_config.get('model')}) vs "
                                          f"student {label_s} ({student_config.get('model')})")
    return {"mean_abs_diff": mean_abs, "max_abs_diff": float(diff.max()), "num_classes": int(diff.shape[0]),
            "num_test": int(len(labels)), "teacher": teacher, "student": student,
            "teacher_top1": float(np.mean(np.argmax(logits_t, -1) == labels)),
            "student_top1": float(np.mean(np.argmax(logits_s, -1) == labels)), "checkpoint": which, "out": out}


# --------------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one `error: ...` line and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        _fail(message)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m wcord_jax.tools.pictures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{curves,correlation}")
    curves = sub.add_parser("curves", help="training curves of one or more runs")
    curves.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    curves.add_argument("--out", required=True, help="the image to write (e.g. curves.png)")
    curves.add_argument("--metric", default="eval/top1", help="the first panel's metric (default eval/top1)")
    curves.add_argument("--labels", nargs="+", help="legend names, one per workdir (default: their basenames)")
    curves.add_argument("--terms", nargs="+", metavar="TERM",
                        help="the train/TERM panels to draw, in this order (default: every logged term)")
    corr = sub.add_parser("correlation", help="|corr_t - corr_s| of the class logits (CRD Fig. 2/3)")
    corr.add_argument("--teacher", help="the teacher's workdir (default: the student run's teacher.checkpoint)")
    corr.add_argument("--student", required=True, help="the student's workdir (a distillation run, or any run)")
    corr.add_argument("--out", required=True, help="the image to write (e.g. corr.png)")
    corr.add_argument("--checkpoint", choices=("last", "best"), default="last", help="the student's checkpoint to load (the teacher's is always its last, as distillation loads it)")
    corr.add_argument("--batch-size", type=int, default=256, help="test examples per forward pass")
    corr.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "curves":
            print(f"wrote {plot_curves(args.workdirs, args.out, args.labels, args.metric, args.terms)}")
        else:
            if args.batch_size <= 0:
                raise PictureError("--batch-size must be positive")
            for w in (args.teacher, args.student):
                if w is not None:
                    _check_workdir(w)  # before importing JAX
            result = correlation(args.teacher, args.student, args.out, args.checkpoint, args.batch_size)
            if args.json:
                print(json.dumps(result))
            else:
                print(f"mean |corr_t - corr_s| = {result['mean_abs_diff']:.6f} over {result['num_classes']} classes "
                      f"and {result['num_test']} test examples (teacher top-1 {result['teacher_top1']:.4f}, "
                      f"student top-1 {result['student_top1']:.4f}); wrote {result['out']}")
    except PictureError as e:
        _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
