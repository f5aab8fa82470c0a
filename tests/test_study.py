"""The accuracy study's bookkeeping: its plan, the statistics in its tables and its plots, on fabricated runs."""
import json
import os

import numpy as np
import pytest

from wcord_jax import configs
from wcord_jax.experiments import study


def _fake_run(workdir, curve):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for epoch, top1 in enumerate(curve, 1):
            f.write(json.dumps({"step": epoch * 10, "epoch": epoch, "train/loss": 1.0}) + "\n")
            f.write(json.dumps({"step": epoch * 10, "epoch": epoch, "eval/top1": top1}) + "\n")


def test_plan_covers_every_method_seed_and_ablation():
    config = study.study_config("full")
    runs = study.plan(config, "/w")
    assert runs[0]["group"] == "teacher"
    methods = [r for r in runs if r["group"] == "method"]
    assert len(methods) == len(study.ALL_METHODS) * 3
    assert set(study.ALL_METHODS) == set(configs.METHOD_WEIGHTS)  # the study covers every method of the library
    ablation = [r for r in runs if r["group"] == "ablation"]
    assert len(ablation) == len(study.ABLATION) * 3
    local_only = next(r for r in ablation if r["label"].startswith("local only"))["config"]
    assert local_only.method == "wcord" and local_only.wcord.lambda_global == 0.0
    staged = next(r for r in methods if r["label"] == "ab")["config"]
    assert staged.init_epochs == config.init_epochs and staged.num_epochs == config.student_epochs
    assert all(r["config"].teacher.checkpoint == runs[0]["workdir"] for r in runs[1:])
    assert len({r["workdir"] for r in runs}) == len(runs)


def test_report_statistics_and_plots(tmp_path):
    config = study.study_config("quick")
    config.methods = ("none", "kd")
    config.seeds = (0, 1, 2)
    config.ablation = False
    runs = study.plan(config, str(tmp_path))
    rng = np.random.default_rng(0)
    curves = {}
    for run in runs:
        epochs = study._total_epochs(run["config"]) + 2  # longer curves than needed are fine
        curve = list(rng.uniform(0.5, 0.9, size=epochs))
        curves[(run["label"], run["seed"])] = curve
        _fake_run(run["workdir"], curve)
    os.remove(os.path.join(runs[-1]["workdir"], "metrics.jsonl"))  # an unfinished run is left out
    results = study.write_report(config, str(tmp_path))
    assert [e["seed"] for e in results["methods"]["kd"]] == [0, 1]
    for method, seeds in (("none", (0, 1, 2)), ("kd", (0, 1))):
        finals = np.array([curves[(method, s)][-1] for s in seeds]) * 100
        bests = np.array([max(curves[(method, s)]) for s in seeds]) * 100
        got_final = study._stats(results["methods"][method], "final")
        np.testing.assert_allclose(got_final, (finals.mean(), finals.std(ddof=1)), rtol=1e-9)
        np.testing.assert_allclose(study._stats(results["methods"][method], "best")[0], bests.mean(), rtol=1e-9)
    table = (tmp_path / "results.md").read_text()
    none_final = np.array([curves[("none", s)][-1] for s in (0, 1, 2)]) * 100
    assert f"| none | 3 | {none_final.mean():.2f} ± {none_final.std(ddof=1):.2f} |" in table
    for name in ("curves.png", "bars.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["teacher"]["final"] == pytest.approx(curves[(config.teacher, 0)][-1])
