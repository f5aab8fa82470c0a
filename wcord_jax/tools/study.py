"""The distillation accuracy study: one teacher, the methods over several seeds, a WCoRD ablation, tables and plots.

    python -m wcord_jax.tools.study --config configs/study.py --workdir runs/study            # preset main
    python -m wcord_jax.tools.study --config configs/study.py:ablation --workdir runs/study   # or
    python -m wcord_jax.tools.study --config configs/study.py --config.preset=ablation --workdir runs/study

Protocol (Fashion-MNIST, offline): a resnet32 teacher trained for 2 epochs on all 60,000 training images; resnet8
students distilled for 30 epochs on a 2,000-image subset (batch 64; the recipe's step decays scale with the run
length through lr_schedule_epochs), test top-1 on 5,000 test images, seeds 0, 1, 2; CRD and WCoRD with 1,024
negatives. Every value is a config field (`--config.student_epochs=...`). Presets (`preset`):

* `main` (default): none, kd, crd, crdkd, wcord, wcordkd;
* `ablation`: the WCoRD variants of `ABLATION` (method wcord with wcord.* overrides), with none and wcord (defaults)
  as reference rows;
* `baselines`: none, RepDistiller's 12 baselines, DKD and LS-KD (`BASELINES`);
* `quick`: a smoke run on tiny synthetic data (1 seed; none, kd, crd, wcord, ab).

Each run is an ordinary run of the library (`train.train_and_evaluate` / `distill.distill_and_evaluate`) in its own
workdir under WORKDIR: `teacher_<model>/`, `<method>/seed<N>/`, `ablation/<variant>/seed<N>/`. The path depends only
on the method (or variant) and the seed, so presets run in one WORKDIR share the teacher and their common runs
(`ablation` after `main` trains only the variants). The study resumes where it stopped: finished runs are skipped and
an interrupted one resumes from its checkpoint; a run whose config.json disagrees with the plan (another protocol in
the same WORKDIR) is an error. Several processes may share WORKDIR (the same command started once per core): each
claims a run before training it (`run_runs`, WORKDIR/.claims). At the end (and with `--report_only`) it writes, for
the preset's runs, with the suffix "" for `main` and `_<preset>` for the others (so presets in one WORKDIR do not
overwrite each other's tables):

* `results<suffix>.json`: every run's final-epoch and best-epoch test top-1 and its per-epoch curve;
* `results<suffix>.md`: mean ± sample std over seeds of final and best top-1 per method, the difference from the
  student alone, and (preset `ablation`) the ablation table;
* `curves<suffix>.png`: test top-1 per epoch of the main table's methods among the preset's runs (mean over seeds,
  shaded ± 1 std, teacher dashed), written when there are at least two of them (not for `baselines`);
* `bars<suffix>.png`: final top-1 (mean ± std) of every row of the preset's tables.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import ml_collections
import numpy as np

from wcord_jax import configs as configs_lib
from wcord_jax import distillers, rundir

log = logging.getLogger("wcord_jax")

MAIN_METHODS = ("none", "kd", "crd", "crdkd", "wcord", "wcordkd")
BASELINES = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "dkd", "lskd")
ALL_METHODS = MAIN_METHODS + BASELINES
# name -> wcord.* overrides of the defaults (EMA key heads, m = 0.999, both directions, the newest 1/8 of the student
# queue for teacher anchors); each is run with method wcord over the study's seeds (preset ablation).
ABLATION = {
    "old keys (key_heads=trained)": {"key_heads": "trained", "ablation": True},
    "key momentum 0.99": {"key_momentum": 0.99},
    "whole student queue": {"student_queue_fraction": 1.0},
    "student anchors only": {"directions": "student", "student_queue_fraction": 1.0},
    "in-batch negatives": {"negatives": "batch"},
    "memory bank": {"negatives": "memory"},
    "global only (lambda_local=0)": {"lambda_local": 0.0},
    "local only (lambda_global=0)": {"lambda_global": 0.0},
}
# preset -> (methods, ablation)
PRESETS = {
    "main": (MAIN_METHODS, False),
    "ablation": (("none", "wcord"), True),
    "baselines": (("none",) + BASELINES, False),
    "quick": (("none", "kd", "crd", "wcord", "ab"), False),
    # benchmarks/accelerator.sh's accuracy run: the main methods on all of Fashion-MNIST, seed 0.
    "accelerator": (("none", "kd", "crd", "wcord"), False),
}
# One colour per method of the main table (curves.png).
COLORS = {"none": "tab:gray", "kd": "tab:green", "crd": "tab:blue", "crdkd": "tab:purple", "wcord": "tab:red",
          "wcordkd": "tab:orange"}


def study_config(preset: str = "main") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown study preset {preset!r}; valid: {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.dataset = "fashion_mnist"
    # Where the data set is (config.dataset.data_dir of every run; None: the library's default places), e.g. a
    # folder of Fashion-MNIST's four idx files on a machine without TFDS.
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.teacher = "resnet32"
    c.student = "resnet8"
    c.teacher_epochs = 2
    c.teacher_num_train = ml_collections.FieldReference(None, field_type=int)  # None: the whole training split
    c.student_epochs = 30
    c.student_num_train = 2000
    c.num_test = 5000
    # AB / FT / FSP init stage; None: RepDistiller's 30 of 240 epochs, i.e. 1/8 of student_epochs rounded up.
    c.init_epochs = ml_collections.FieldReference(None, field_type=int)
    c.seeds = (0, 1, 2)
    c.methods, c.ablation = PRESETS[preset]
    c.crd_nce_k = 1024  # negatives per anchor for CRD (RepDistiller: 16384 of 50,000; here the subset is 2,000)
    c.wcord_num_negatives = 1024  # WCoRD queue length: a multiple of batch_size, at most student_num_train
    c.batch_size = 64
    c.extra = ml_collections.ConfigDict()  # any further config key for every student run, e.g. extra.dtype
    if preset == "accelerator":  # every training image, 8 epochs: minutes on one GPU
        c.student_num_train, c.student_epochs, c.num_test = 60_000, 8, 10_000
        c.seeds = (0,)
        c.crd_nce_k = c.wcord_num_negatives = 16_384  # the CRD paper's K
    if preset == "quick":
        c.dataset = "synthetic"
        c.teacher = "resnet8"
        c.teacher_epochs, c.student_epochs = 1, 1
        c.teacher_num_train, c.student_num_train, c.num_test = 256, 128, 64
        c.init_epochs = 1
        c.seeds = (0,)
        c.crd_nce_k = c.wcord_num_negatives = 64
        c.batch_size = 32
    return c


def resolve_config(config, overrides: dict) -> ml_collections.ConfigDict:
    """The study config of preset `overrides.get('preset', config.preset)` with the other command-line overrides
    (`--config.KEY=VALUE`, flattened) applied: `--config.preset=P` then means the same as `configs/study.py:P`."""
    preset = overrides.get("preset", config.preset)
    fresh = study_config(preset)
    fresh.update_from_flattened_dict({k: v for k, v in overrides.items() if k != "preset"})
    # --config.methods=none,kd arrives as the one string 'none,kd' (not a Python literal)
    fresh.methods = tuple(p.strip() for m in fresh.methods for p in str(m).split(",") if p.strip())
    return fresh


def check_config(config) -> None:
    """One-line ValueErrors for settings the runs would reject or misuse."""
    unknown = [m for m in config.methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; valid: {', '.join(ALL_METHODS)}")
    k, b, n = config.wcord_num_negatives, config.batch_size, config.student_num_train
    if k % b or k > n:
        raise ValueError(f"wcord_num_negatives={k} must be a multiple of batch_size={b} and at most "
                         f"student_num_train={n}")


def suffix(config) -> str:
    """File-name suffix of the preset's tables and plots: '' for main, '_<preset>' otherwise."""
    return "" if config.preset == "main" else f"_{config.preset}"


def _dataset(config, cfg, num_train):
    cfg.dataset.name = config.dataset
    cfg.dataset.num_train = num_train
    cfg.dataset.num_test = config.num_test
    if config.get("data_dir"):
        cfg.dataset.data_dir = config.data_dir
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


def init_epochs(config) -> int:
    return config.init_epochs if config.init_epochs is not None else math.ceil(config.student_epochs / 8)


def student_run_config(config, method: str, seed: int, teacher_dir: str,
                       wcord_overrides: Optional[dict] = None) -> ml_collections.ConfigDict:
    cfg = configs_lib.distill_config(method, config.teacher, config.student)
    _dataset(config, cfg, config.student_num_train)
    cfg.teacher.checkpoint = teacher_dir
    cfg.num_epochs = config.student_epochs
    cfg.batch_size = config.batch_size
    cfg.seed = seed
    cfg.progress_bar = False
    if distillers.get(method).init_parts:
        cfg.init_epochs = init_epochs(config)
    if "crd" in cfg:  # CRD, and WCoRD's memory bank
        cfg.crd.nce_k = config.crd_nce_k
        cfg.crd.sample_with_replacement = True  # the faster documented option (RepDistiller draws without)
    if "wcord" in cfg:
        cfg.wcord.num_negatives = config.wcord_num_negatives
    for k, v in (wcord_overrides or {}).items():
        cfg.wcord[k] = v
    for k, v in config.extra.items():
        cfg[k] = v
    return cfg


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def plan(config, workdir: str) -> list[dict]:
    """Every run of the preset: {'group', 'label', 'seed', 'workdir', 'config'} (the teacher first).

    A run's workdir depends only on its method (or ablation variant) and seed, not on the preset."""
    teacher_dir = os.path.join(workdir, f"teacher_{config.teacher}")
    runs = [{"group": "teacher", "label": config.teacher, "seed": 0, "workdir": teacher_dir,
             "config": teacher_run_config(config)}]
    # Seed by seed, so that a study stopped early has every method on its first seeds.
    for seed in config.seeds:
        for method in config.methods:
            runs.append({"group": "method", "label": method, "seed": seed,
                         "workdir": os.path.join(workdir, method, f"seed{seed}"),
                         "config": student_run_config(config, method, seed, teacher_dir)})
    if config.ablation:
        for seed in config.seeds:
            for name, overrides in ABLATION.items():
                runs.append({"group": "ablation", "label": name, "seed": seed,
                             "workdir": os.path.join(workdir, "ablation", _slug(name), f"seed{seed}"),
                             "config": student_run_config(config, "wcord", seed, teacher_dir, overrides)})
    return runs


# The settings a finished or interrupted run must share with the plan to be reused.
_MATCH_KEYS = ("task", "model", "method", "seed", "num_epochs", "batch_size", "init_epochs", "dataset.name",
               "dataset.num_train", "dataset.num_test", "crd.nce_k", "wcord")


def _first_difference(old, new, path: str) -> Optional[tuple]:
    """(path, old value, new value) of the first leaf present in both that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) & set(new)):
            found = _first_difference(old[key], new[key], f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if old is not None and new is not None and old != new:
        return path, old, new
    return None


def _lookup(tree, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def stale_reason(run: dict) -> Optional[str]:
    """Why the run's workdir holds a run of another protocol (its config.json disagrees with the plan), or None."""
    old = rundir.existing_config(run["workdir"])
    if old is None:
        return None
    new = json.loads(run["config"].to_json_best_effort())
    for key in _MATCH_KEYS:  # a section the planned run lacks (another method's) is not compared
        found = _first_difference(_lookup(old, key), _lookup(new, key), key)
        if found:
            return f"{run['workdir']} holds a run with {found[0]}={json.dumps(found[1])}, the study plans " \
                   f"{json.dumps(found[2])}"
    return None


def curve_from_events(events: list[dict]) -> list[float]:
    """Test top-1 after each epoch (the last value logged for each epoch)."""
    by_epoch = {}
    for event in events:
        if "eval/top1" in event:
            by_epoch[int(event["epoch"])] = float(event["eval/top1"])
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_curve(run_dir: str) -> list[float]:
    """Test top-1 after each epoch of a run (the last value logged for each epoch)."""
    return curve_from_events(rundir.read_events(run_dir))


def _total_epochs(cfg) -> int:
    staged = cfg.get("method") in distillers.names() and distillers.get(cfg.get("method")).init_parts
    return cfg.num_epochs + (cfg.get("init_epochs", 0) if staged else 0)


def run_all(config, workdir: str) -> None:
    runs = plan(config, workdir)
    check_runs(runs)
    run_runs(runs, workdir, lambda run: f"{run['label']} seed {run['seed']}")


def check_runs(runs: list) -> None:
    """Refuses a plan whose runs disagree with what their workdirs hold (another protocol in the same WORKDIR)."""
    from wcord_jax import core

    for run in runs:
        reason = stale_reason(run)
        if reason:
            raise core.ConfigError(f"{reason}: use another --workdir")


def run_done(run: dict) -> bool:
    return len(read_curve(run["workdir"])) >= _total_epochs(run["config"])


def train_run(run: dict) -> dict:
    from wcord_jax import distill, train

    fn = train.train_and_evaluate if run["group"] == "teacher" else distill.distill_and_evaluate
    return fn(run["config"], run["workdir"])


CLAIMS = ".claims"


def claim_run(root: str, run_dir: str) -> Optional[str]:
    """Claims `run_dir` for this process: creates ROOT/.claims/<run_dir>, holding 'HOST PID', only if it does not
    exist. Returns its path, or None where another live process holds the run. A claim of a process that is gone
    (one of this host) is taken over; one of another host is kept (remove ROOT/.claims if that host is gone)."""
    import socket

    claims = os.path.join(root, CLAIMS)
    os.makedirs(claims, exist_ok=True)
    path = os.path.join(claims, os.path.relpath(os.path.abspath(run_dir), os.path.abspath(root)).replace(os.sep, "__"))
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    host, pid = f.read().split()
            except (OSError, ValueError):  # released meanwhile, or being written: try once more
                continue
            if host != socket.gethostname() or _alive(int(pid)):
                return None
            log.info("taking over the claim of process %s (gone) on %s", pid, run_dir)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_runs(runs: list, root: str, describe, train=train_run, done=run_done, poll_s: float = 30.0) -> None:
    """Trains the unfinished `runs` in order; several processes may share ROOT, each claiming a run before it trains
    it (`claim_run`), so that the same command started twice (e.g. one per core with `taskset`) shares the work.
    Students (every group but 'teacher') start once every teacher run is finished. Returns when every run is."""
    start, n, waited = time.time(), len(runs), 0.0
    pending = list(enumerate(runs, 1))
    while pending:
        teachers_done = all(done(r) for r in runs if r["group"] == "teacher")
        blocked = []
        for i, run in pending:
            if done(run):
                log.info("[%d/%d] %s: done", i, n, describe(run))
                continue
            claim = None
            if run["group"] == "teacher" or teachers_done:
                claim = claim_run(root, run["workdir"])
            if claim is None:
                blocked.append((i, run))
                continue
            try:
                t0 = time.time()
                result = train(run)
                log.info("[%d/%d] %s: test top-1 %.4f (%.0f s; %.0f min so far)", i, n, describe(run),
                         result["eval/top1"], time.time() - t0, (time.time() - start) / 60)
            finally:
                os.remove(claim)
            break  # from the top: the teachers may be done now, runs claimed by others may be finished
        else:
            pending = blocked
            if pending:
                if time.time() - waited > 600:
                    log.info("waiting for %d run(s) that other processes are training (%s)", len(pending),
                             os.path.join(root, CLAIMS))
                    waited = time.time()
                time.sleep(poll_s)
            continue
        pending = [(i, r) for i, r in pending if not done(r)]


def collect(config, workdir: str) -> dict:
    """The results of the preset's finished runs, grouped: {'teacher': ..., 'methods': {...}, 'ablation': {...}}.

    Runs of another protocol (`stale_reason`) are left out with a warning."""
    out = {"teacher": None, "methods": {}, "ablation": {}}
    for run in plan(config, workdir):
        curve = read_curve(run["workdir"])
        if len(curve) < _total_epochs(run["config"]):
            continue
        reason = stale_reason(run)
        if reason:
            log.warning("left out of the report: %s", reason)
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
        spread = len(entries) > 1  # a sample std needs two seeds: one seed shows the value alone

        def cell(m, s):
            return f"{m:.2f} ± {s:.2f}" if spread else f"{m:.2f}"

        lines.append(f"| {label} | {len(entries)} | {cell(fm, fs)} | {cell(bm, bs)} | {delta} |")
    return lines


def _ablation_rows(results: dict) -> dict:
    """The ablation table's rows: wcord with its defaults (when run), then the variants."""
    groups = {}
    if "wcord" in results["methods"]:
        groups["wcord (defaults)"] = results["methods"]["wcord"]
    groups.update(results["ablation"])
    return groups


def write_report(config, workdir: str) -> dict:
    results = collect(config, workdir)
    end = suffix(config)
    with open(os.path.join(workdir, f"results{end}.json"), "w", encoding="utf-8") as f:
        json.dump({"config": json.loads(config.to_json_best_effort()), **results}, f, indent=1)
    baseline = _stats(results["methods"]["none"], "final")[0] if "none" in results["methods"] else None
    lines = [f"# Distillation study on {config.dataset} (preset {config.preset}): {config.student} students, "
             f"{config.student_epochs} epochs on {config.student_num_train} training images", ""]
    if results["teacher"]:
        t = results["teacher"]
        lines.append(f"Teacher {t['model']}: test top-1 {100 * t['final']:.2f}% after {config.teacher_epochs} "
                     f"epochs on {config.teacher_num_train or 'all'} training images.")
    lines += [f"Students: {config.student}, {config.student_epochs} epochs on {config.student_num_train} training "
              f"images, test top-1 on {config.num_test} test images; mean ± sample std over seeds "
              f"{', '.join(map(str, config.seeds))}; CRD {config.crd_nce_k} and WCoRD {config.wcord_num_negatives} "
              f"negatives.", "", "## Methods", ""]
    lines += _table(results["methods"], baseline)
    if results["ablation"]:
        lines += ["", "## WCoRD ablation", ""]
        lines += _table(_ablation_rows(results), baseline)
    with open(os.path.join(workdir, f"results{end}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plots(config, results, workdir)
    return results


def _curves_plot(config, results: dict, path: str) -> bool:
    """Mean test top-1 per epoch of the main table's methods, ±1 std shaded, teacher dashed. False if < 2 methods."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in MAIN_METHODS if m in results["methods"]]
    if len(shown) < 2:
        return False
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot(1, 1, 1)
    low, high, last_epoch = math.inf, -math.inf, 1
    for method in shown:
        entries = results["methods"][method]
        n = min(len(e["curve"]) for e in entries)
        curves = np.array([e["curve"][:n] for e in entries]) * 100.0
        mean = curves.mean(0)
        std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        epochs = np.arange(1, n + 1)
        color = COLORS[method]
        ax.plot(epochs, mean, color=color, linewidth=1.8, marker="o" if n <= 12 else None, markersize=3,
                label=f"{method} (n={len(entries)})")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
        half = n // 2  # zoom on the second half of training, where the methods separate
        low, high = min(low, float(mean[half:].min())), max(high, float((mean + std)[half:].max()))
        last_epoch = max(last_epoch, n)
    span = high - low
    if results["teacher"]:
        teacher = 100 * results["teacher"]["final"]
        label = f"teacher {results['teacher']['model']} ({teacher:.2f}%)"
        if low - max(3.0, span) <= teacher <= high + max(3.0, span):
            low, high = min(low, teacher), max(high, teacher)
        else:  # far off: keep the zoom on the students, say where the teacher is
            label += ", off the scale"
        ax.axhline(teacher, color="k", linestyle="--", linewidth=1.2, label=label)
    margin = max(0.5, 0.08 * (high - low))
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlim(*((1, last_epoch) if last_epoch > 1 else (0.5, 1.5)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{config.student} students, {config.student_epochs} epochs on {config.student_num_train} images "
                 f"(mean ± 1 std over seeds)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.grid(alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def _bars_plot(groups: dict, path: str) -> None:
    """Final top-1 (mean ± std over seeds) per row, the student alone as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(groups)
    means = [_stats(groups[k], "final")[0] for k in labels]
    stds = [_stats(groups[k], "final")[1] for k in labels]
    colors = ["tab:gray" if k == "none" else "salmon" if k in ABLATION else "tab:red" if k.startswith("wcord") else
              "tab:blue" if k.startswith("crd") else "tab:green" for k in labels]
    fig = Figure(figsize=(max(6.0, 0.6 * len(labels) + 2.0), 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(labels, means, yerr=stds, color=colors, capsize=3)
    if "none" in groups:
        ax.axhline(means[labels.index("none")], color="tab:gray", linestyle=":", linewidth=1)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 2.0), max(m + s for m, s in zip(means, stds)) + 1.0)
    ax.set_ylabel("final test top-1 (%)")
    ax.tick_params(axis="x", rotation=45)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    ax.grid(axis="y", alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _plots(config, results: dict, workdir: str) -> None:
    end = suffix(config)
    _curves_plot(config, results, os.path.join(workdir, f"curves{end}.png"))
    groups = dict(results["methods"])
    if results["ablation"]:
        groups = {k: v for k, v in groups.items() if k != "wcord"}
        groups.update(_ablation_rows(results))
    if groups:
        _bars_plot(groups, os.path.join(workdir, f"bars{end}.png"))


def main(argv: list[str]) -> None:
    from absl import flags

    from wcord_jax import main as cli

    del argv
    overrides = dict(flags.FLAGS["config"].override_values) if cli._CONFIG.value is not None else {}  # noqa: SLF001
    try:
        config = resolve_config(cli._CONFIG.value or study_config(), overrides)  # noqa: SLF001
        check_config(config)
    except OSError as e:  # config_flags defers a missing or broken config file until first use
        cli._fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")  # noqa: SLF001
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        cli._fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)  # noqa: SLF001
    run_and_report(config, flags.FLAGS.workdir or "runs/study", run_all, write_report, f"results{suffix(config)}.md",
                   flags.FLAGS.report_only)


def run_and_report(config, workdir: str, run_all, write_report, report_name: str, report_only: bool) -> None:
    """An experiment's command: its runs (unless `report_only`; a ConfigError is one line and exit status 2), then
    its report, printed."""
    from wcord_jax import main as cli
    from wcord_jax import core
    from wcord_jax.data import DataNotFoundError

    os.makedirs(workdir, exist_ok=True)
    cli._setup_logging()  # noqa: SLF001
    # The runs of one method differ only in their seeds: each program is compiled once and read back from the
    # persistent compilation cache for the other seeds (and for a resumed experiment).
    from wcord_jax import compile_cache

    try:
        compile_cache.configure(config)
    except ValueError as e:
        cli._fail(str(e))  # noqa: SLF001
    try:
        if not report_only:
            run_all(config, workdir)
        write_report(config, workdir)
    except (core.ConfigError, DataNotFoundError) as e:  # a bad setting, or no data set on this machine
        cli._fail(str(e))  # noqa: SLF001
    with open(os.path.join(workdir, report_name), encoding="utf-8") as f:
        print(f.read())


def _define_flags() -> None:
    """main.py's --config (default: configs/study.py) and --workdir (default: runs/study), plus --report_only."""
    from absl import flags

    from wcord_jax import main as cli  # noqa: F401  (defines --config and --workdir, with one-line errors)

    flags.DEFINE_bool("report_only", False, "Only (re)write the tables and plots from the finished runs.")
    flags.FLAGS.set_default("config", "configs/study.py")
    flags.FLAGS.set_default("workdir", "runs/study")


if __name__ == "__main__":
    from absl import app

    from wcord_jax import main as _cli

    _define_flags()
    app.run(main, flags_parser=_cli.parse_flags)
