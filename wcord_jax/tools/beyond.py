"""Beyond compression: privileged information, cross-modal transfer, ensembles and teachers of another task.

    python -m wcord_jax.tools.beyond --config configs/beyond.py --workdir runs/study

Four tasks on the Fashion-MNIST study's protocol (`wcord_jax.tools.study`: resnet8 students, 30 epochs on
2,000 training images, test top-1 on 5,000 test images, seeds 0, 1, 2), each with the student alone, KD, CRD and
WCoRD (the library's defaults):

* `privileged`: the resnet32 teacher sees the full image, the student `downsample:4` or `mask:0.5` (its test set
  too): the teacher holds information the student never gets;
* `crossmodal`: a resnet32 teacher trained on `edges` (Sobel magnitude) distils into a student on the image;
* `ensemble`: 1, 2 and 4 resnet8 teachers (seeds 0..3, trained as the study's teacher) into a resnet8 student;
  KD distils the averaged probabilities, CRD and WCoRD get a head pair per teacher;
* `tasks`: a resnet32 teacher trained on classes 0-4 only distils into a student of all 10 classes with CRD and
  WCoRD (KD is refused: the logits are of different label spaces).

Every run is an ordinary run of the library in its own workdir; run in the study's WORKDIR, the study's teacher and
its student-alone runs (`none/seed<N>`) are shared. The experiment resumes where it stopped, and several processes
may share its WORKDIR (`study.run_runs`). At the end (and with `--report_only`) it writes `results_beyond.md` /
`.json` and `beyond.png` (one panel per task); the tables end with the contrastive heads' health at the end of
training (positive and off-diagonal cosines, "collapsed" from 0.9 on).

An experiment too long for one machine's session can be finished in parts: `--config.seeds=1,2` runs some seeds
only, and `--config.earlier_results=A.json,B.json` adds the runs recorded in earlier `results_beyond.json` files
(cells and seeds this workdir has not finished) to the report, each entry keeping the file and the CPU it came from.
"""
from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np

from wcord_jax import configs as configs_lib
from wcord_jax import rundir
from wcord_jax.tools import study

log = logging.getLogger("wcord_jax")

TASKS = ("privileged", "crossmodal", "ensemble", "tasks")
METHODS = ("none", "kd", "crd", "wcord")
COLORS = {"none": "tab:gray", "kd": "tab:green", "crd": "tab:blue", "wcord": "tab:red"}
HEALTH = ("emb_pos_cos", "emb_student_cos", "emb_teacher_cos")
COLLAPSED = 0.9  # an off-diagonal cosine at or above this: every example maps to nearly one direction


def beyond_config(preset: str = "main") -> ml_collections.ConfigDict:
    if preset not in ("main", "quick"):
        raise ValueError(f"unknown preset {preset!r}; valid: main, quick")
    c = study.study_config("quick" if preset == "quick" else "main")
    c.preset = preset
    c.methods = METHODS
    c.tasks = TASKS
    c.privileged_views = ("downsample:4", "mask:0.5")
    c.crossmodal_teacher_view = "edges"
    c.crossmodal_student_view = "identity"
    c.ensemble_teacher = "resnet8"
    c.ensemble_sizes = (1, 2, 4)
    c.other_task_classes = (0, 1, 2, 3, 4)
    # Comma-separated results_beyond.json files of earlier parts of the experiment (see the module docstring).
    c.earlier_results = ""
    if preset == "quick":
        c.ensemble_sizes = (1, 2)
        c.privileged_views = ("downsample:4",)
        c.other_task_classes = (0, 1)
    return c


def _slug(text: str) -> str:
    return study._slug(text.replace(":", "")).replace("_", "")  # noqa: SLF001


def _teacher(config, workdir: str, name: str, model: str, seed: int = 0, view: str = "identity",
             classes=None) -> dict:
    cfg = study.teacher_run_config(config)
    cfg.model = model
    cfg.learning_rate = configs_lib.teacher_config(model).learning_rate
    cfg.seed = seed
    cfg.view = view
    if classes is not None:
        cfg.dataset.classes = tuple(classes)
    return {"group": "teacher", "task": "teacher", "label": name, "method": None, "seed": seed,
            "workdir": os.path.join(workdir, name), "config": cfg}


def _student(config, task: str, label: str, method: str, seed: int, workdir: str, teacher_dirs: list,
             teacher_model: str, view: str = "identity") -> dict:
    cfg = study.student_run_config(config, method, seed, ",".join(teacher_dirs))
    cfg.teacher.model = teacher_model
    cfg.view = view
    return {"group": "student", "task": task, "label": label, "method": method, "seed": seed, "workdir": workdir,
            "config": cfg}


def plan(config, workdir: str) -> list[dict]:
    """Every run: the teachers first, then the students seed by seed (a stopped experiment has every cell's first
    seeds). The student alone on the image is the study's `none/seed<N>` run."""
    base = os.path.join(workdir, "beyond")
    main_teacher = _teacher(config, workdir, f"teacher_{config.teacher}", config.teacher)
    main_teacher["config"] = study.teacher_run_config(config)  # exactly the study's
    runs = [main_teacher]
    edges = other = None
    if "crossmodal" in config.tasks:
        edges = _teacher(config, base, f"teacher_{config.teacher}_{_slug(config.crossmodal_teacher_view)}",
                         config.teacher, view=config.crossmodal_teacher_view)
        runs.append(edges)
    if "tasks" in config.tasks:
        other = _teacher(config, base, f"teacher_{config.teacher}_classes{''.join(map(str, config.other_task_classes))}",
                         config.teacher, classes=config.other_task_classes)
        runs.append(other)
    members = []
    if "ensemble" in config.tasks:
        members = [_teacher(config, base, f"teacher_{config.ensemble_teacher}_seed{i}", config.ensemble_teacher, seed=i)
                   for i in range(max(config.ensemble_sizes))]
        runs += members
    t_dir = main_teacher["workdir"]
    for seed in config.seeds:
        alone = {"group": "student", "task": "reference", "label": "none", "method": "none", "seed": seed,
                 "workdir": os.path.join(workdir, "none", f"seed{seed}"),
                 "config": study.student_run_config(config, "none", seed, t_dir)}
        runs.append(alone)
        if "privileged" in config.tasks:
            for view in config.privileged_views:
                for m in config.methods:
                    runs.append(_student(config, "privileged", view, m, seed,
                                         os.path.join(base, "privileged", _slug(view), m, f"seed{seed}"), [t_dir],
                                         config.teacher, view=view))
        if edges is not None:
            label = f"{config.crossmodal_teacher_view} -> {config.crossmodal_student_view}"
            for m in config.methods:
                if m == "none" and config.crossmodal_student_view == "identity":
                    continue  # the reference run
                runs.append(_student(config, "crossmodal", label, m, seed,
                                     os.path.join(base, "crossmodal", _slug(label), m, f"seed{seed}"),
                                     [edges["workdir"]], config.teacher, view=config.crossmodal_student_view))
        for size in config.ensemble_sizes if members else ():
            for m in config.methods:
                if m == "none":
                    continue
                runs.append(_student(config, "ensemble", str(size), m, seed,
                                     os.path.join(base, "ensemble", f"m{size}", m, f"seed{seed}"),
                                     [t["workdir"] for t in members[:size]], config.ensemble_teacher))
        if other is not None:
            for m in config.methods:
                if m in ("none", "kd"):
                    continue  # none: the reference run; kd: refused (another label space)
                runs.append(_student(config, "tasks", "classes " + ",".join(map(str, config.other_task_classes)),
                                     m, seed, os.path.join(base, "tasks", m, f"seed{seed}"), [other["workdir"]],
                                     config.teacher))
    seen, unique = set(), []
    for run in runs:
        if run["workdir"] not in seen:
            seen.add(run["workdir"])
            unique.append(run)
    return unique


def run_all(config, workdir: str) -> None:
    runs = plan(config, workdir)
    study.check_runs(runs)
    study.run_runs(runs, workdir, lambda r: f"{r['task']} {r['label']} {r['method'] or ''} seed {r['seed']}")


def _teacher_and_heads(events: list[dict]) -> tuple[dict, dict]:
    """The step-0 teacher metrics a student run logged (`teacher/top1`, `teacher_<i>/top1`), and the heads' health
    of its last logged training window (`emb_pos_cos`, `emb_student_cos`, `emb_teacher_cos`, averaged over the
    teachers, and with an ensemble each teacher's `..._t<i>`; empty for a method without contrastive heads)."""
    teacher, heads = {}, {}
    for event in events:
        if not teacher:
            teacher = {k: float(v) for k, v in event.items() if k.startswith("teacher") and k.endswith("/top1")}
        if "train/emb_pos_cos" in event:
            heads = {k[len("train/"):]: float(v) for k, v in event.items() if k.startswith("train/emb_")}
    return teacher, heads


def collect(config, workdir: str) -> dict:
    """{'teachers': {name: top-1}, 'cells': {task: {label: {method: [entries]}}}, 'cpu', 'earlier'} of the finished
    runs, then the entries of `config.earlier_results` whose (task, label, method, seed) this workdir lacks."""
    from wcord_jax import host

    cpu = host.cpu_model()
    out = {"teachers": {}, "cells": {}, "cpu": cpu, "earlier": {}}
    for run in plan(config, workdir):
        events = rundir.read_events(run["workdir"])
        curve = study.curve_from_events(events)
        if len(curve) < study._total_epochs(run["config"]):  # noqa: SLF001
            continue
        if run["group"] == "teacher":
            out["teachers"][run["label"]] = curve[-1]
            continue
        teacher, heads = _teacher_and_heads(events)
        entry = {"seed": run["seed"], "final": curve[-1], "best": max(curve), "teacher": teacher, "heads": heads,
                 "source": "", "cpu": cpu}
        out["cells"].setdefault(run["task"], {}).setdefault(run["label"], {}).setdefault(run["method"], []).append(
            entry)
    for path in filter(None, (p.strip() for p in config.get("earlier_results", "").split(","))):
        _merge_earlier(out, path)
    return out


def _merge_earlier(out: dict, path: str) -> None:
    """Adds an earlier report's entries for (task, label, method, seed) that `out` lacks, tagged with the file (and
    its CPU where the entry does not name one); its teachers go under out['earlier'][path]."""
    from wcord_jax import core

    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        cells = earlier["cells"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise core.ConfigError(f"earlier_results: {path} is not a results_beyond.json ({type(e).__name__}: {e})")
    out["earlier"][path] = {"teachers": earlier.get("teachers", {}), "cpu": earlier.get("cpu", "")}
    for task, labels in cells.items():
        for label, methods in labels.items():
            for method, entries in methods.items():
                mine = out["cells"].setdefault(task, {}).setdefault(label, {}).setdefault(method, [])
                have = {e["seed"] for e in mine}
                for e in entries:
                    if e["seed"] not in have:
                        mine.append({**e, "source": e.get("source") or path,
                                     "cpu": e.get("cpu") or earlier.get("cpu", "")})
                        have.add(e["seed"])
                mine.sort(key=lambda e: e["seed"])


def _cell(entries) -> str:
    if not entries:
        return "–"
    m, s = study._stats(entries, "final")  # noqa: SLF001
    return f"{m:.2f} ± {s:.2f} (n={len(entries)})" if len(entries) > 1 else f"{m:.2f} (n=1)"


def _mean(entries):
    return study._stats(entries, "final")[0] if entries else None  # noqa: SLF001


def _table(rows: dict, columns: list, reference: dict) -> list[str]:
    """rows: {method: {column: entries}}; reference: {column: entries of the student alone}."""
    head = "| method | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for method, cells in rows.items():
        parts = []
        for col in columns:
            text = _cell(cells.get(col))
            ref, mine = _mean(reference.get(col)), _mean(cells.get(col))
            if method != "none" and ref is not None and mine is not None:
                text += f" {mine - ref:+.2f}"
            parts.append(text)
        lines.append(f"| {method} | " + " | ".join(parts) + " |")
    return lines


def write_report(config, workdir: str) -> dict:
    results = collect(config, workdir)
    cells = results["cells"]
    reference = {e["seed"]: e for e in cells.get("reference", {}).get("none", {}).get("none", [])}
    alone = list(reference.values())
    lines = ["# Beyond compression on Fashion-MNIST: privileged information, cross-modal transfer, ensembles, "
             "another task", "",
             f"Students {config.student}, {config.student_epochs} epochs on {config.student_num_train} training "
             f"images, test top-1 (%) on {config.num_test} test images seen through the student's view; mean ± "
             f"sample std over seeds (n = seeds finished); after each cell its difference from the student alone "
             "on the same view. Teachers (test top-1 on their own view): " +
             ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(results["teachers"].items())) + ".",
             "", f"Runs in this workdir: on {results['cpu'] or 'an unnamed CPU'}."]
    for path, earlier in results["earlier"].items():
        lines.append(f"Runs from {path} (where this workdir has none of that cell and seed): on "
                     f"{earlier['cpu'] or 'an unnamed CPU'}; their teachers: " +
                     ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(earlier["teachers"].items())) + ".")
    lines.append("")
    if "privileged" in cells:
        views = list(config.privileged_views)
        rows = {m: {v: cells["privileged"].get(v, {}).get(m, []) for v in views} for m in config.methods}
        lines += ["## Privileged information (teacher: the full image; student: the view)", ""]
        lines += _table(rows, views, {v: rows["none"][v] for v in views})
        lines.append("")
    if "crossmodal" in cells:
        label = next(iter(cells["crossmodal"]))
        rows = {"none": {label: alone}}
        rows.update({m: {label: cells["crossmodal"][label].get(m, [])} for m in config.methods if m != "none"})
        lines += [f"## Cross-modal transfer (teacher on {config.crossmodal_teacher_view}, student on "
                  f"{config.crossmodal_student_view})", ""]
        lines += _table(rows, [label], {label: alone})
        lines.append("")
    if "ensemble" in cells:
        sizes = [str(s) for s in config.ensemble_sizes]
        rows = {"none": {s: alone for s in sizes}}
        rows.update({m: {s: cells["ensemble"].get(s, {}).get(m, []) for s in sizes} for m in config.methods
                     if m != "none"})
        lines += [f"## Ensembles of {config.ensemble_teacher} teachers (columns: number of teachers)", ""]
        lines += _table(rows, sizes, {s: alone for s in sizes})
        ens = _ensemble_teacher_top1(cells["ensemble"])
        if ens:
            lines += ["", "The teachers' ensemble (averaged probabilities): " +
                      ", ".join(f"{s} teachers {100 * v:.2f}" for s, v in ens.items()) + "."]
        lines.append("")
    if "tasks" in cells:
        label = next(iter(cells["tasks"]))
        rows = {"none": {label: alone}}
        rows.update({m: {label: cells["tasks"][label].get(m, [])} for m in config.methods if m not in ("none", "kd")})
        lines += [f"## A teacher of another task (teacher on {label}; student on all classes)", ""]
        lines += _table(rows, [label], {label: alone})
        lines.append("")
    lines += _health_table(cells)
    with open(os.path.join(workdir, "results_beyond.json"), "w", encoding="utf-8") as f:
        json.dump({"config": json.loads(config.to_json_best_effort()), **results}, f, indent=1)
    with open(os.path.join(workdir, "results_beyond.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(config, results, alone, os.path.join(workdir, "beyond.png"))
    return results


def _health_table(cells: dict) -> list[str]:
    """The contrastive heads at the end of training, per cell: mean over the seeds that recorded them of the positive
    pairs' cosine and the off-diagonal (different examples') cosines; "collapsed" where an off-diagonal cosine of
    any seed (and, with an ensemble, of any teacher's head pair) reaches COLLAPSED."""
    rows = []
    for task in TASKS:
        for label, methods in cells.get(task, {}).items():
            for method, entries in methods.items():
                heads = [e["heads"] for e in entries if e.get("heads")]
                if not heads:
                    continue
                mean = {k: float(np.mean([h[k] for h in heads])) for k in HEALTH}
                worst = max(v for h in heads for k, v in h.items() if not k.startswith("emb_pos_cos"))
                verdict = "collapsed" if worst >= COLLAPSED else "not collapsed"
                rows.append(f"| {task} | {label} | {method} | {len(heads)} | {mean['emb_pos_cos']:.2f} | "
                            f"{mean['emb_student_cos']:.2f} | {mean['emb_teacher_cos']:.2f} | {worst:.2f} | "
                            f"{verdict} |")
    if not rows:
        return []
    return ["## The contrastive heads at the end of training", "",
            "The last logged training window of each run, mean over seeds: the positive pairs' cosine and the mean "
            "cosine between different examples' embeddings (off-diagonal; near 1: the heads have collapsed and the "
            f"term teaches nothing); worst: the largest off-diagonal cosine of any seed and teacher; collapsed "
            f"where it reaches {COLLAPSED}.", "",
            "| task | column | method | seeds | positive cos | student off-diag | teacher off-diag | worst | heads |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _ensemble_teacher_top1(cells: dict) -> dict:
    out = {}
    for size, by_method in cells.items():
        values = [e["teacher"]["teacher/top1"] for entries in by_method.values() for e in entries
                  if "teacher/top1" in e["teacher"]]
        if values:
            out[size] = float(np.mean(values))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _plot(config, results: dict, alone: list, path: str) -> None:
    """One panel per task: final top-1 (mean ± std) per method; the ensemble panel against the number of teachers
    (the CRD paper's ensemble figure), the teachers' ensemble dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = results["cells"]
    panels = [t for t in TASKS if t in cells]
    if not panels:
        return
    fig = Figure(figsize=(4.2 * len(panels), 4))
    for n, task in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), n)
        if task == "ensemble":
            sizes = sorted(cells[task], key=int)
            for m in config.methods:
                pts = [(int(s), *study._stats(cells[task][s][m], "final")) for s in sizes  # noqa: SLF001
                       if cells[task][s].get(m)]
                if pts:
                    x, mean, std = map(np.array, zip(*pts))
                    ax.errorbar(x, mean, yerr=std, color=COLORS[m], marker="o", capsize=3, label=m)
            if alone:
                ax.axhline(_mean(alone), color=COLORS["none"], linestyle=":", label="student alone")
            ens = _ensemble_teacher_top1(cells[task])
            if ens:
                ax.plot([int(s) for s in ens], [100 * v for v in ens.values()], "k--", marker="s", markersize=4,
                        label="teachers' ensemble")
            ax.set_xticks([int(s) for s in sizes])
            ax.set_xlabel("number of teachers")
            ax.set_title(f"ensembles of {config.ensemble_teacher}", fontsize=10)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)  # below: no line hidden
        else:
            labels = list(cells[task])
            methods = [m for m in config.methods if any(cells[task][lab].get(m) for lab in labels)
                       or (m == "none" and alone)]
            width = 0.8 / max(len(methods), 1)
            for j, m in enumerate(methods):
                stats = []
                for lab in labels:
                    entries = cells[task][lab].get(m) or (alone if m == "none" else [])
                    stats.append(study._stats(entries, "final") if entries else (np.nan, 0.0))  # noqa: SLF001
                x = np.arange(len(labels)) + (j - (len(methods) - 1) / 2) * width
                ax.bar(x, [s[0] for s in stats], width, yerr=[s[1] for s in stats], color=COLORS[m], capsize=2,
                       label=m)
            ax.set_xticks(np.arange(len(labels)))
            ax.set_xticklabels(labels, fontsize=8)
            title = {"privileged": "privileged information (student's view)", "crossmodal": "cross-modal",
                     "tasks": "teacher of another task"}[task]
            ax.set_title(title, fontsize=10)
            values = [v for lab in labels for m in methods
                      for v in [_mean(cells[task][lab].get(m) or (alone if m == "none" else []))] if v is not None]
            if values:
                ax.set_ylim(min(values) - 3, max(values) + 2)
            ax.legend(fontsize=8)
        ax.set_ylabel("final test top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    from absl import flags

    from wcord_jax import main as cli

    del argv
    config = cli._CONFIG.value or beyond_config()  # noqa: SLF001
    study.run_and_report(config, flags.FLAGS.workdir or "runs/study", run_all, write_report, "results_beyond.md",
                         flags.FLAGS.report_only)


if __name__ == "__main__":
    from absl import app, flags

    from wcord_jax import main as _cli

    flags.DEFINE_bool("report_only", False, "Only (re)write the tables and plots from the finished runs.")
    flags.FLAGS.set_default("config", "configs/beyond.py")
    flags.FLAGS.set_default("workdir", "runs/study")
    app.run(main, flags_parser=_cli.parse_flags)
