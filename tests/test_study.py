"""The accuracy study's bookkeeping: its presets and plan, the statistics in its tables and its plots, on fabricated
runs."""
import json
import os

import numpy as np
import pytest

from wcord_jax import configs, distillers
from wcord_jax.tools import study



def _fake_run(workdir, curve):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for epoch, top1 in enumerate(curve, 1):
            f.write(json.dumps({"step": epoch * 10, "epoch": epoch, "train/loss": 1.0}) + "\n")
            f.write(json.dumps({"step": epoch * 10, "epoch": epoch, "eval/top1": top1}) + "\n")


def test_main_preset_plan():
    config = study.study_config("main")
    assert config == study.study_config()  # the default preset
    runs = study.plan(config, "/w")
    teacher = runs[0]
    assert teacher["group"] == "teacher" and teacher["workdir"] == "/w/teacher_resnet32"
    assert teacher["config"].model == "resnet32" and teacher["config"].dataset.num_train is None  # all 60,000
    assert teacher["config"].dataset.name == "fashion_mnist" and teacher["config"].num_epochs == 2
    methods = [r for r in runs if r["group"] == "method"]
    assert [(r["label"], r["seed"]) for r in methods] == [(m, s) for s in (0, 1, 2) for m in ("none", "kd", "crd",
                                                                                               "crdkd", "wcord",
                                                                                               "wcordkd")]
    assert not [r for r in runs if r["group"] == "ablation"]
    for r in methods:
        cfg = r["config"]
        assert cfg.model == "resnet8" and cfg.teacher.model == "resnet32" and cfg.method == r["label"]
        assert cfg.num_epochs == 30 and cfg.dataset.num_train == 2000 and cfg.dataset.num_test == 5000
        assert cfg.batch_size == 64 and cfg.seed == r["seed"] and cfg.teacher.checkpoint == teacher["workdir"]
        assert ("crd" in cfg) == (r["label"] in ("crd", "crdkd", "wcord", "wcordkd"))  # only its method's sections
        assert ("wcord" in cfg) == (r["label"] in ("wcord", "wcordkd"))
        assert cfg.get("crd", {"nce_k": 1024})["nce_k"] == 1024
        assert cfg.get("wcord", {"num_negatives": 1024})["num_negatives"] == 1024
        assert cfg.lr_schedule_epochs == 240  # the step decays scale with num_epochs
    assert len({r["workdir"] for r in runs}) == len(runs)
    assert set(study.ALL_METHODS) == set(distillers.names())  # the presets cover every method of the library


def test_ablation_preset_plan():
    config = study.study_config("ablation")
    runs = study.plan(config, "/w")
    assert {r["label"] for r in runs if r["group"] == "method"} == {"none", "wcord"}
    ablation = [r for r in runs if r["group"] == "ablation"]
    assert len(ablation) == 8 * 3 and len({r["workdir"] for r in ablation}) == 24
    expected = {
        "old keys (key_heads=trained)": {"key_heads": "trained", "ablation": True},
        "key momentum 0.99": {"key_momentum": 0.99},
        "whole student queue": {"student_queue_fraction": 1.0},
        "student anchors only": {"directions": "student", "student_queue_fraction": 1.0},
        "in-batch negatives": {"negatives": "batch"},
        "memory bank": {"negatives": "memory"},
        "global only (lambda_local=0)": {"lambda_local": 0.0},
        "local only (lambda_global=0)": {"lambda_global": 0.0},
    }
    assert study.ABLATION == expected
    defaults = configs.distill_config("wcord", "resnet32", "resnet8").wcord
    for r in ablation:
        cfg = r["config"]
        assert cfg.method == "wcord" and cfg.num_epochs == 30 and cfg.wcord.num_negatives == 1024
        for key in defaults:  # the variant's overrides, the defaults elsewhere
            want = expected[r["label"]].get(key, 1024 if key == "num_negatives" else defaults[key])
            assert cfg.wcord[key] == want, (r["label"], key)
    local_only = next(r for r in ablation if r["label"].startswith("local only"))["config"]
    assert local_only.wcord.lambda_global == 0.0 and local_only.wcord.lambda_local == 1.0
    assert 128 % config.batch_size == 0 and config.wcord_num_negatives % config.batch_size == 0


def test_baselines_preset_plan():
    runs = study.plan(study.study_config("baselines"), "/w")
    labels = [r["label"] for r in runs if r["group"] == "method"]
    assert labels == [m for _ in range(3) for m in ("none", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                                                    "fsp", "nst", "dkd", "lskd")]
    staged = next(r for r in runs if r["label"] == "ab")["config"]
    assert staged.init_epochs == 4 and staged.num_epochs == 30  # RepDistiller's 30 of 240 epochs, rounded up


def test_presets_share_runs_and_paths():
    plans = {p: study.plan(study.study_config(p), "/w") for p in ("main", "ablation", "baselines")}
    by_key = {}
    for preset, runs in plans.items():
        for r in runs:
            by_key.setdefault((r["group"], r["label"], r["seed"]), []).append((r["workdir"], r["config"]))
    shared = {k: v for k, v in by_key.items() if len(v) > 1}
    assert {k[1] for k in shared} == {"resnet32", "none", "wcord"}
    for key, versions in shared.items():  # the same workdir and the same run config in every preset
        assert len({w for w, _ in versions}) == 1, key
        assert len({c.to_json_best_effort() for _, c in versions}) == 1, key
    all_dirs = [r["workdir"] for runs in plans.values() for r in runs]
    assert len(set(all_dirs)) == len(by_key)  # different runs never share a workdir


def test_presets_from_the_command_line_forms():
    colon = study.study_config("ablation")
    flag = study.resolve_config(study.study_config("main"), {"preset": "ablation", "seeds": (0,)})
    assert flag.methods == colon.methods and flag.ablation and flag.seeds == (0,) and flag.preset == "ablation"
    # --config.methods=none,kd reaches the overrides as the one string of a 1-tuple
    assert study.resolve_config(study.study_config("main"), {"methods": ("none, kd",)}).methods == ("none", "kd")
    with pytest.raises(ValueError, match="valid: main, ablation, baselines, quick"):
        study.study_config("nope")
    bad = study.study_config("main")
    bad.wcord_num_negatives = 1000
    with pytest.raises(ValueError, match="multiple of batch_size"):
        study.check_config(bad)
    study.check_config(study.study_config("main"))


def test_stale_runs_are_refused(tmp_path):
    config = study.study_config("quick")
    run = study.plan(config, str(tmp_path))[1]
    assert study.stale_reason(run) is None
    os.makedirs(run["workdir"])
    other = run["config"].copy_and_resolve_references()
    (tmp_path / "none" / "seed0" / "config.json").write_text(other.to_json_best_effort())
    assert study.stale_reason(run) is None
    old = json.loads(other.to_json_best_effort())  # a run written when every config held every method's section:
    old["wcord"] = {"key_momentum": 0.5}  # a WCoRD setting does not concern the student alone ...
    (tmp_path / "none" / "seed0" / "config.json").write_text(json.dumps(old))
    assert study.stale_reason(run) is None
    other.num_epochs = 4
    (tmp_path / "none" / "seed0" / "config.json").write_text(other.to_json_best_effort())
    assert "num_epochs=4" in study.stale_reason(run)
    wcord = next(r for r in study.plan(config, str(tmp_path)) if r["label"] == "wcord")  # ... but a WCoRD run
    os.makedirs(wcord["workdir"])
    changed = wcord["config"].copy_and_resolve_references()
    changed.wcord.key_momentum = 0.5
    with open(os.path.join(wcord["workdir"], "config.json"), "w") as f:
        f.write(changed.to_json_best_effort())
    assert "wcord.key_momentum=0.5" in study.stale_reason(wcord)


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
    table = (tmp_path / "results_quick.md").read_text()
    none_final = np.array([curves[("none", s)][-1] for s in (0, 1, 2)]) * 100
    assert f"| none | 3 | {none_final.mean():.2f} ± {none_final.std(ddof=1):.2f} |" in table
    for name in ("curves_quick.png", "bars_quick.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((tmp_path / "results_quick.json").read_text())
    assert saved["teacher"]["final"] == pytest.approx(curves[(config.teacher, 0)][-1])


def test_main_and_ablation_reports_in_one_workdir(tmp_path):
    rng = np.random.default_rng(1)
    main, ablation = study.study_config("main"), study.study_config("ablation")
    for config in (main, ablation):
        for run in study.plan(config, str(tmp_path)):
            if not os.path.exists(os.path.join(run["workdir"], "metrics.jsonl")):  # shared runs are written once
                n = study._total_epochs(run["config"])
                _fake_run(run["workdir"], list(np.linspace(0.6, 0.85, n) + rng.normal(0, 0.01, n)))
    study.write_report(main, str(tmp_path))
    main_files = {n: (tmp_path / n).read_bytes() for n in ("results.md", "results.json", "curves.png", "bars.png")}
    results = study.write_report(ablation, str(tmp_path))
    for name, data in main_files.items():  # the ablation report does not overwrite the main one
        assert (tmp_path / name).read_bytes() == data
    for name in ("curves_ablation.png", "bars_ablation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main_md, ablation_md = (tmp_path / "results.md").read_text(), (tmp_path / "results_ablation.md").read_text()
    assert "30 epochs on 2000 training images" in main_md.splitlines()[0]
    assert all(f"| {m} | 3 |" in main_md for m in study.MAIN_METHODS) and "WCoRD ablation" not in main_md
    assert "## WCoRD ablation" in ablation_md and "| wcord (defaults) | 3 |" in ablation_md
    assert all(f"| {name} | 3 |" in ablation_md for name in study.ABLATION)
    # the reference rows are the same runs in both tables
    wcord_row = next(l for l in main_md.splitlines() if l.startswith("| wcord | "))
    assert wcord_row.split("|")[3] == next(l for l in ablation_md.splitlines()
                                           if l.startswith("| wcord (defaults) |")).split("|")[3]
    assert sorted(results["ablation"]) == sorted(study.ABLATION)


def test_one_seed_shows_no_spread():
    """A row of one seed shows its value alone (a sample std needs two seeds), rows of several the mean ± std."""
    one = [{"final": 0.8326, "best": 0.8336}]
    two = [{"final": 0.85, "best": 0.86}, {"final": 0.86, "best": 0.86}]
    lines = study._table({"none": one, "wcord": two}, 83.26)
    assert lines[2] == "| none | 1 | 83.26 | 83.36 | +0.00 |"
    assert lines[3] == f"| wcord | 2 | 85.50 ± {np.std([85.0, 86.0], ddof=1):.2f} | 86.00 ± 0.00 | +2.24 |"


def test_beyond_plan_runs_each_task_with_its_views_and_teachers():
    from wcord_jax.tools import beyond

    config = beyond.beyond_config()
    runs = beyond.plan(config, "W")
    by_dir = {r["workdir"]: r for r in runs}
    assert len(by_dir) == len(runs)
    teachers = [r for r in runs if r["group"] == "teacher"]
    assert [t["label"] for t in teachers] == ["teacher_resnet32", "teacher_resnet32_edges",
                                              "teacher_resnet32_classes01234"] + [f"teacher_resnet8_seed{i}"
                                                                                  for i in range(4)]
    assert teachers[1]["config"].view == "edges" and teachers[2]["config"].dataset.classes == (0, 1, 2, 3, 4)
    assert [t["config"].seed for t in teachers[3:]] == [0, 1, 2, 3]
    # The student alone on the image is the study's own run (same path, same config).
    alone = by_dir[os.path.join("W", "none", "seed1")]["config"]
    assert alone.to_dict() == study.student_run_config(study.study_config(), "none", 1,
                                                       os.path.join("W", "teacher_resnet32")).to_dict()
    priv = by_dir[os.path.join("W", "beyond", "privileged", "mask05", "crd", "seed2")]["config"]
    assert priv.view == "mask:0.5" and priv.teacher.checkpoint == os.path.join("W", "teacher_resnet32")
    ens = by_dir[os.path.join("W", "beyond", "ensemble", "m4", "wcord", "seed0")]["config"]
    assert ens.teacher.model == "resnet8" and ens.teacher.checkpoint.split(",") == [
        os.path.join("W", "beyond", f"teacher_resnet8_seed{i}") for i in range(4)]
    cross = by_dir[os.path.join("W", "beyond", "crossmodal", "edgesidentity", "kd", "seed0")]["config"]
    assert cross.view == "identity" and cross.teacher.checkpoint.endswith("teacher_resnet32_edges")
    tasks = [r for r in runs if r["task"] == "tasks"]
    assert sorted({r["method"] for r in tasks}) == ["crd", "wcord"]  # KD is refused for another label space
    students = [r for r in runs if r["group"] == "student"]
    assert len(students) == 3 * (1 + 8 + 3 + 9 + 2)


def _fake_beyond(config, workdir, seeds, rng):
    from wcord_jax.tools import beyond

    config = beyond.beyond_config("quick") if config is None else config
    config.seeds = tuple(seeds)
    for run in beyond.plan(config, str(workdir)):
        if not os.path.exists(os.path.join(run["workdir"], "metrics.jsonl")):
            n = study._total_epochs(run["config"])
            _fake_run(run["workdir"], list(np.clip(rng.uniform(0.5, 0.9, n), 0, 1)))
    return config


def test_beyond_report_adds_the_seeds_of_an_earlier_part(tmp_path):
    """An experiment finished in two parts: the second workdir's report holds both parts' seeds, each entry naming
    its file and CPU; a seed the workdir has itself is not replaced; a file that is not a report is one line."""
    from wcord_jax import core, host
    from wcord_jax.tools import beyond

    rng = np.random.default_rng(3)
    first = _fake_beyond(None, tmp_path / "a", (0, 1), rng)
    part_a = beyond.write_report(first, str(tmp_path / "a"))
    earlier = str(tmp_path / "a" / "results_beyond.json")
    second = _fake_beyond(None, tmp_path / "b", (1, 2), rng)
    second.earlier_results = earlier
    merged = beyond.write_report(second, str(tmp_path / "b"))
    plain = beyond.beyond_config("quick")
    plain.seeds = (1, 2)
    alone_b = beyond.collect(plain, str(tmp_path / "b"))  # the same workdir without the earlier file
    for task, labels in merged["cells"].items():
        for label, methods in labels.items():
            for method, entries in methods.items():
                assert [e["seed"] for e in entries] == [0, 1, 2], (task, label, method)
                a = {e["seed"]: e for e in part_a["cells"][task][label][method]}
                b = {e["seed"]: e for e in alone_b["cells"][task][label][method]}
                assert entries[0]["final"] == a[0]["final"] and entries[0]["source"] == earlier
                assert entries[1]["final"] == b[1]["final"] != a[1]["final"] and entries[1]["source"] == ""
                assert entries[2]["final"] == b[2]["final"]
                assert all(e["cpu"] == host.cpu_model() for e in entries)
    assert merged["earlier"][earlier]["teachers"] == part_a["teachers"]
    md = (tmp_path / "b" / "results_beyond.md").read_text()
    assert f"Runs from {earlier}" in md and "(n=3)" in md and "(n=2)" not in md

    (tmp_path / "bad.json").write_text("{}")
    second.earlier_results = str(tmp_path / "bad.json")
    with pytest.raises(core.ConfigError, match="bad.json is not a results_beyond.json"):
        beyond.collect(second, str(tmp_path / "b"))


def test_cpu_model_reads_proc_cpuinfo(tmp_path):
    from wcord_jax import host

    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu\n")
    assert host.cpu_model(str(info)) == "AMD EPYC 9B45" and host.cpu_vendor(str(info)) == "AuthenticAMD"


def test_a_claim_is_one_process_s_and_a_gone_process_s_claim_is_taken_over(tmp_path):
    import socket
    import subprocess

    root, run = str(tmp_path), str(tmp_path / "crd" / "seed0")
    path = study.claim_run(root, run)
    assert path and open(path).read() == f"{socket.gethostname()} {os.getpid()}"
    assert study.claim_run(root, run) is None  # held (by this live process)
    assert study.claim_run(root, str(tmp_path / "crd" / "seed1")) not in (None, path)  # another run: free
    os.remove(path)
    assert study.claim_run(root, run) == path
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open(path, "w") as f:
        f.write(f"{socket.gethostname()} {gone.pid}")
    assert study.claim_run(root, run) == path and open(path).read().endswith(f" {os.getpid()}")
    with open(path, "w") as f:
        f.write(f"another-host {gone.pid}")  # its liveness cannot be seen from here: kept
    assert study.claim_run(root, run) is None


def test_processes_sharing_a_workdir_skip_each_other_s_runs_and_students_wait_for_the_teachers(tmp_path):
    """run_runs with a run claimed by another live process: this one trains the teacher, then the free student, waits
    for the claimed one to be finished by its holder, and returns; it never trains it."""
    import subprocess
    import threading

    runs = [{"group": g, "label": name, "seed": 0, "workdir": str(tmp_path / name)}
            for g, name in (("teacher", "t"), ("method", "held"), ("method", "free"))]
    finished, trained = set(), []
    other = subprocess.Popen(["sleep", "30"])
    try:
        with open(study.claim_run(str(tmp_path), runs[1]["workdir"]), "w") as f:
            f.write(f"{__import__('socket').gethostname()} {other.pid}")  # the other process's claim

        def train(run):
            assert run["label"] != "held"
            assert run["group"] == "teacher" or "t" in finished  # students after the teacher
            trained.append(run["label"])
            finished.add(run["label"])
            if run["label"] == "free":  # the other process finishes its run a little later
                threading.Timer(0.3, finished.add, ("held",)).start()
            return {"eval/top1": 0.5}

        study.run_runs(runs, str(tmp_path), lambda r: r["label"], train=train, done=lambda r: r["label"] in finished,
                       poll_s=0.05)
    finally:
        other.kill()
    assert trained == ["t", "free"] and finished == {"t", "held", "free"}
    assert sorted(os.listdir(tmp_path / study.CLAIMS)) == ["held"]  # this process released its own claims


@pytest.mark.slow  # trains a teacher and a student
def test_a_quick_study_of_two_methods_runs_and_leaves_no_claims(tmp_path):
    """study.run_all end to end (quick preset: the teacher, then the student alone), and a second call finds every run
    done."""
    config = study.study_config("quick")
    config.methods = ("none",)
    study.run_all(config, str(tmp_path))
    runs = study.plan(config, str(tmp_path))
    assert [r["label"] for r in runs] == ["resnet8", "none"] and all(study.run_done(r) for r in runs)
    assert os.listdir(tmp_path / study.CLAIMS) == []
    mtimes = [os.path.getmtime(os.path.join(r["workdir"], "metrics.jsonl")) for r in runs]
    study.run_all(config, str(tmp_path))  # resumed: nothing left to train
    assert [os.path.getmtime(os.path.join(r["workdir"], "metrics.jsonl")) for r in runs] == mtimes


def _add_heads(workdir, pos, student, teacher, per_teacher=None):
    """Appends a training event with the heads' health keys (and per-teacher ones) to a fake run."""
    event = {"step": 10_000, "epoch": 99, "train/emb_pos_cos": pos, "train/emb_student_cos": student,
             "train/emb_teacher_cos": teacher}
    for i, (s, t) in enumerate(per_teacher or ()):
        event.update({f"train/emb_student_cos_t{i}": s, f"train/emb_teacher_cos_t{i}": t})
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\n")


def test_beyond_report_tells_collapsed_heads_from_learning_ones(tmp_path):
    """The report's heads table: the last window's cosines averaged over seeds, the worst off-diagonal cosine of any
    seed or ensemble member, and "collapsed" from 0.9 on; runs without heads (KD) have no row."""
    from wcord_jax.tools import beyond

    rng = np.random.default_rng(0)
    config = _fake_beyond(None, tmp_path, (0, 1), rng)
    base = tmp_path / "beyond"
    label = config.privileged_views[0]
    for seed, (pos, s, t) in enumerate([(0.8, 0.1, 0.2), (0.6, 0.3, 0.4)]):
        _add_heads(base / "privileged" / beyond._slug(label) / "wcord" / f"seed{seed}", pos, s, t)
        _add_heads(base / "privileged" / beyond._slug(label) / "crd" / f"seed{seed}", 0.99, 0.97, 0.5)
    # an ensemble whose mean off-diagonal cosine looks fine while one teacher's student head has collapsed
    size = str(max(config.ensemble_sizes))
    _add_heads(base / "ensemble" / f"m{size}" / "wcord" / "seed0", 0.9, 0.5, 0.1,
               per_teacher=[(0.05, 0.1)] * (int(size) - 1) + [(0.95, 0.1)])
    beyond.write_report(config, str(tmp_path))
    md = (tmp_path / "results_beyond.md").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in line.split("|")[4:-1]]
            for line in md.split("## The contrastive heads")[1].splitlines() if line.startswith("| ")}
    assert rows[("privileged", label, "wcord")] == ["2", "0.70", "0.20", "0.30", "0.40", "not collapsed"]
    assert rows[("privileged", label, "crd")] == ["2", "0.99", "0.97", "0.50", "0.97", "collapsed"]
    assert rows[("ensemble", size, "wcord")] == ["1", "0.90", "0.50", "0.10", "0.95", "collapsed"]
    assert not any(key[2] in ("none", "kd") for key in rows if key[0] != "task")
    assert len(rows) == 4  # the header and the three cells with heads


def test_a_study_without_its_data_set_ends_with_one_line_and_exit_status_2(tmp_path, capsys):
    """A run of the study that finds no Fashion-MNIST where it looks: the command says where to get it, in one line,
    exit 2 (not a traceback)."""
    from ml_collections import ConfigDict

    from wcord_jax import data

    def run_all(config, workdir):
        data.load(ConfigDict({"name": "fashion_mnist", "data_dir": str(tmp_path / "nowhere"), "download": False,
                              "num_train": 100, "num_test": 100}))

    with pytest.raises(SystemExit) as e:
        study.run_and_report(study.study_config("quick"), str(tmp_path / "w"), run_all, lambda c, w: None,
                             "results.md", False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: fashion_mnist was not found under"), err
