"""A distillation accuracy study: one teacher, every method over several seeds, a WCoRD ablation, tables and plots.

    python -m wcord_jax.experiments.study --config configs/study.py --workdir runs/study

Each run is an ordinary run of the library (`train.train_and_evaluate` / `distill.distill_and_evaluate`) in its own
workdir under WORKDIR, so the study resumes where it stopped: finished runs are skipped and an interrupted one
resumes from its checkpoint. At the end (and with `--report_only`) it writes

* `results.json`: every run's final-epoch and best-epoch test top-1 and its per-epoch curve;
* `results.md`: mean ± std over seeds of final and best top-1 per method, and the ablation table;
* `curves.png`: mean test top-1 per epoch per method; `bars.png`: final top-1 per method (mean ± std).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

import ml_collections
import numpy as np

from wcord_jax import configs as configs_lib

log = logging.getLogger("wcord_jax")

ALL_METHODS = ("none", "kd", "crd", "crdkd", "wcord", "wcordkd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt",
               "ab", "ft", "fsp", "nst", "dkd")
# name -> wcord.* overrides; each is run with method wcord over the study's seeds.
ABLATION = {
    "global only (lambda_local=0)": {"lambda_local": 0.0},
    "local only (lambda_global=0)": {"lambda_global": 0.0},
    "lambda_local=0.5": {"lambda_local": 0.5},
    "lambda_local=2": {"lambda_local": 2.0},
    "epsilon=0.02": {"epsilon": 0.02},
    "epsilon=0.2": {"epsilon": 0.2},
}


def study_config(preset: str = "full") -> ml_collections.ConfigDict:
    if preset not in ("full", "quick"):
        raise ValueError(f"unknown study preset {preset!r}; valid: full, quick")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.dataset = "fashion_mnist"
    c.teacher = "resnet8"
    c.student = "resnet8"
    c.teacher_epochs = 2
    c.teacher_num_train = ml_collections.FieldReference(None, field_type=int)  # None: the whole training split
    c.student_epochs = 4
    c.student_num_train = 3000
    c.num_test = 5000
    c.init_epochs = 1  # AB / FT / FSP init stage (RepDistiller: 30 of 240 epochs, i.e. 1/8 of the run, rounded up)
    c.seeds = (0, 1, 2)
    c.methods = ALL_METHODS
    c.ablation = True
    c.crd_nce_k = 2048  # negatives per anchor for CRD (RepDistiller: 16384 of 50,000; here the subset is 3,000)
    c.wcord_num_negatives = 2048  # WCoRD queue length, for the same reason
    c.batch_size = 64
    c.extra = ml_collections.ConfigDict()  # any further config key for every student run, e.g. extra.dtype
    if preset == "quick":
        c.dataset = "synthetic"
        c.teacher_epochs, c.student_epochs = 1, 1
        c.teacher_num_train, c.student_num_train, c.num_test = 256, 128, 64
        c.seeds = (0,)
        c.methods = ("none", "kd", "crd", "wcord", "ab")
        c.crd_nce_k = c.wcord_num_negatives = 64
        c.batch_size = 32
    return c


def _dataset(config, cfg, num_train):
    cfg.dataset.name = config.dataset
    cfg.dataset.num_train = num_train
    cfg.dataset.num_test = config.num_test
    if config.dataset == "synthetic":
        cfg.dataset.image_size = 16
        cfg.dataset.num_classes = 4


def teacher_run_config(config) -> ml_collections.ConfigDict:
    cfg = configs_lib.teacher_config(config.teacher)
    _dataset(config, cfg, config.teacher_num_train)
    cfg.num_epochs = config.teacher_epochs
    cfg.batch_size = config.batch_size
    cfg.progress_bar = False
    return cfg


def student_run_config(config, method: str, seed: int, teacher_dir: str,
                       wcord_overrides: Optional[dict] = None) -> ml_collections.ConfigDict:
    cfg = configs_lib.distill_config(method, config.teacher, config.student)
    _dataset(config, cfg, config.student_num_train)
    cfg.teacher.checkpoint = teacher_dir
    cfg.num_epochs = config.student_epochs
    cfg.batch_size = config.batch_size
    cfg.seed = seed
    cfg.progress_bar = False
    if method in configs_lib.STAGED_METHODS:
        cfg.init_epochs = config.init_epochs
    cfg.crd.nce_k = config.crd_nce_k
    cfg.crd.sample_with_replacement = True  # the faster documented option (RepDistiller draws without replacement)
    cfg.wcord.num_negatives = config.wcord_num_negatives
    for k, v in (wcord_overrides or {}).items():
        cfg.wcord[k] = v
    for k, v in config.extra.items():
        cfg[k] = v
    return cfg


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def plan(config, workdir: str) -> list[dict]:
    """Every run of the study: {'group', 'label', 'seed', 'workdir', 'config'} (the teacher first)."""
    teacher_dir = os.path.join(workdir, f"teacher_{config.teacher}")
    runs = [{"group": "teacher", "label": config.teacher, "seed": 0, "workdir": teacher_dir,
             "config": teacher_run_config(config)}]
    for method in config.methods:
        for seed in config.seeds:
            runs.append({"group": "method", "label": method, "seed": seed,
                         "workdir": os.path.join(workdir, method, f"seed{seed}"),
                         "config": student_run_config(config, method, seed, teacher_dir)})
    if config.ablation:
        for name, overrides in ABLATION.items():
            for seed in config.seeds:
                runs.append({"group": "ablation", "label": name, "seed": seed,
                             "workdir": os.path.join(workdir, "ablation", _slug(name), f"seed{seed}"),
                             "config": student_run_config(config, "wcord", seed, teacher_dir, overrides)})
    return runs


def read_curve(run_dir: str) -> list[float]:
    """Test top-1 after each epoch of a run (the last value logged for each epoch)."""
    from wcord_jax import metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_epoch = {}
    for event in metrics.read_metrics(run_dir):
        if "eval/top1" in event:
            by_epoch[int(event["epoch"])] = float(event["eval/top1"])
    return [by_epoch[e] for e in sorted(by_epoch)]


def _total_epochs(cfg) -> int:
    return cfg.num_epochs + (cfg.get("init_epochs", 0) if cfg.get("method") in configs_lib.STAGED_METHODS else 0)


def run_all(config, workdir: str) -> None:
    from wcord_jax import distill, train

    runs = plan(config, workdir)
    start = time.time()
    for i, run in enumerate(runs, 1):
        cfg = run["config"]
        if len(read_curve(run["workdir"])) >= _total_epochs(cfg):
            log.info("[%d/%d] %s seed %d: done already", i, len(runs), run["label"], run["seed"])
            continue
        t0 = time.time()
        fn = train.train_and_evaluate if run["group"] == "teacher" else distill.distill_and_evaluate
        result = fn(cfg, run["workdir"])
        log.info("[%d/%d] %s seed %d: test top-1 %.4f (%.0f s; %.0f min so far)", i, len(runs), run["label"],
                 run["seed"], result["eval/top1"], time.time() - t0, (time.time() - start) / 60)


def collect(config, workdir: str) -> dict:
    """The results of every finished run, grouped: {'teacher': ..., 'methods': {...}, 'ablation': {...}}."""
    out = {"teacher": None, "methods": {}, "ablation": {}}
    for run in plan(config, workdir):
        curve = read_curve(run["workdir"])
        if len(curve) < _total_epochs(run["config"]):
            continue
        entry = {"seed": run["seed"], "final": curve[-1], "best": max(curve), "curve": curve}
        if run["group"] == "teacher":
            out["teacher"] = {"model": run["label"], **entry}
        else:
            key = "methods" if run["group"] == "method" else "ablation"
            out[key].setdefault(run["label"], []).append(entry)
    return out


def _stats(entries: list, key: str) -> tuple[float, float]:
    values = np.array([e[key] for e in entries]) * 100.0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _table(groups: dict, baseline: Optional[float]) -> list[str]:
    lines = ["| | seeds | final top-1 (%) | best top-1 (%) | final vs. student alone |", "|---|---|---|---|---|"]
    for label, entries in groups.items():
        fm, fs = _stats(entries, "final")
        bm, bs = _stats(entries, "best")
        delta = f"{fm - baseline:+.2f}" if baseline is not None else ""
        lines.append(f"| {label} | {len(entries)} | {fm:.2f} ± {fs:.2f} | {bm:.2f} ± {bs:.2f} | {delta} |")
    return lines


def write_report(config, workdir: str) -> dict:
    results = collect(config, workdir)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": json.loads(config.to_json_best_effort()), **results}, f, indent=1)
    baseline = _stats(results["methods"]["none"], "final")[0] if "none" in results["methods"] else None
    lines = [f"# Distillation study on {config.dataset}", ""]
    if results["teacher"]:
        t = results["teacher"]
        lines.append(f"Teacher {t['model']}: test top-1 {100 * t['final']:.2f}% after {config.teacher_epochs} "
                     f"epochs on {config.teacher_num_train or 'all'} training images.")
    lines += [f"Students: {config.student}, {config.student_epochs} epochs on {config.student_num_train} training "
              f"images, test top-1 on {config.num_test} test images; mean ± sample std over seeds "
              f"{', '.join(map(str, config.seeds))}.", "", "## Methods", ""]
    lines += _table(results["methods"], baseline)
    if results["ablation"]:
        lines += ["", "## WCoRD ablation", ""]
        groups = dict(results["ablation"])
        if "wcord" in results["methods"]:
            groups = {"wcord (defaults)": results["methods"]["wcord"], **groups}
        lines += _table(groups, baseline)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plots(results, workdir)
    return results


def _plots(results: dict, workdir: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = results["methods"]
    if not methods:
        return
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot(1, 1, 1)
    for label, entries in methods.items():
        curves = np.array([e["curve"] for e in entries]) * 100.0
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker="o", markersize=3, label=label,
                linewidth=2.0 if label in ("none", "wcord", "wcordkd", "crd") else 1.0)
    if results["teacher"]:
        ax.axhline(100 * results["teacher"]["final"], color="k", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=120, bbox_inches="tight")

    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(methods)
    means = [_stats(methods[k], "final")[0] for k in labels]
    stds = [_stats(methods[k], "final")[1] for k in labels]
    colors = ["tab:gray" if k == "none" else "tab:red" if k.startswith("wcord") else
              "tab:blue" if k.startswith("crd") else "tab:green" for k in labels]
    ax.bar(labels, means, yerr=stds, color=colors, capsize=3)
    if "none" in methods:
        ax.axhline(means[labels.index("none")], color="tab:gray", linestyle=":", linewidth=1)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 2.0), max(m + s for m, s in zip(means, stds)) + 1.0)
    ax.set_ylabel("final test top-1 (%)")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(os.path.join(workdir, "bars.png"), dpi=120, bbox_inches="tight")


def main(argv: list[str]) -> None:
    from absl import flags

    from wcord_jax import train

    del argv
    config = _CONFIG.value
    workdir = flags.FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    unknown = [m for m in config.methods if m not in ALL_METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; valid: {', '.join(ALL_METHODS)}", file=sys.stderr)
        sys.exit(2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    # The runs of one method differ only in their seeds: compile each program once, keep it for the other seeds
    # (and for a resumed study).
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if not flags.FLAGS.report_only:
        try:
            run_all(config, workdir)
        except train.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    write_report(config, workdir)
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        print(f.read())


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    cfg = config_flags.DEFINE_config_file("config", "configs/study.py", "Study config file (configs/study.py).")
    flags.DEFINE_string("workdir", "runs/study", "Where the runs, tables and plots go.")
    flags.DEFINE_bool("report_only", False, "Only (re)write the tables and plots from the finished runs.")
    return cfg


if __name__ == "__main__":
    from absl import app

    _CONFIG = _define_flags()
    app.run(main)
