"""`python -m wcord_jax.tools.pictures`: the correlation maths, and both commands on tiny synthetic runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from wcord_jax.tools import pictures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--config.dataset.name=synthetic", "--config.dataset.num_train=128", "--config.dataset.num_test=32",
        "--config.dataset.image_size=16", "--config.dataset.num_classes=4", "--config.batch_size=16",
        "--config.eval_batch_size=16", "--config.log_every_steps=4", "--config.num_epochs=2",
        "--config.progress_bar=False", "--config.num_devices=1"]


def _run(module, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _pictures(*args):
    return _run("wcord_jax.tools.pictures", *args)


def _assert_png(path):
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == PNG_SIGNATURE, blob[:16]
    assert len(blob) > 10_000, len(blob)  # a drawn figure, not an empty canvas


def _assert_usage_error(out, expected):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(teacher workdir, kd student workdir) of tiny synthetic runs, made with the command line."""
    root = tmp_path_factory.mktemp("pictures")
    teacher, student = root / "teacher", root / "student"
    out = _run("wcord_jax.main", "--config", "configs/teacher.py:resnet8", "--workdir", teacher, *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run("wcord_jax.main", "--config", "configs/distill.py:kd,resnet8,resnet8", "--workdir", student,
               f"--config.teacher.checkpoint={teacher}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return str(teacher), str(student)


# --------------------------------------------------------------------------------------------------------------------
# The maths


def test_correlation_difference_matches_numpy():
    rng = np.random.default_rng(0)
    logits_t = rng.normal(size=(200, 7)) @ rng.normal(size=(7, 7))  # correlated columns
    logits_s = rng.normal(size=(200, 7)).astype(np.float32)
    diff, mean_abs = pictures.correlation_difference(logits_t, logits_s)
    want = np.abs(np.corrcoef(logits_t, rowvar=False) - np.corrcoef(logits_s.astype(np.float64), rowvar=False))
    assert diff.shape == (7, 7)
    np.testing.assert_allclose(diff, want, atol=1e-10)
    assert mean_abs == pytest.approx(want.mean(), abs=1e-12)
    assert 0.0 <= mean_abs <= 2.0
    np.testing.assert_allclose(np.diag(diff), 0.0, atol=1e-12)
    np.testing.assert_allclose(diff, diff.T, atol=1e-12)


def test_correlation_difference_is_zero_for_equal_and_affinely_related_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 5))
    diff, mean_abs = pictures.correlation_difference(logits, logits.copy())
    assert mean_abs == 0.0 and not diff.any()
    # Pearson correlation ignores a positive scale and a shift of each column.
    diff, mean_abs = pictures.correlation_difference(logits, 3.0 * logits + rng.normal(size=5))
    assert mean_abs < 1e-12


def test_correlation_of_a_constant_column_is_zero_not_nan():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(30, 4))
    logits[:, 2] = 1.5
    corr = pictures.correlation_matrix(logits)
    assert np.isfinite(corr).all()
    assert corr[2, 2] == 1.0 and not corr[2, [0, 1, 3]].any()
    np.testing.assert_allclose(corr[np.ix_([0, 1, 3], [0, 1, 3])],
                               np.corrcoef(logits[:, [0, 1, 3]], rowvar=False), atol=1e-12)


def test_correlation_difference_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        pictures.correlation_difference(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="examples >= 2"):
        pictures.correlation_matrix(np.zeros((1, 3)))


def test_series_keeps_the_last_event_of_a_repeated_step():
    records = [{"step": 4, "train/loss": 2.0}, {"step": 8, "train/loss": 1.5}, {"step": 4, "train/loss": 1.9},
               {"step": 8, "epoch": 1, "eval/top1": 0.5}]
    xs, ys = pictures.series(records, "train/loss")
    assert xs.tolist() == [4, 8] and ys.tolist() == [1.9, 1.5]
    assert pictures.loss_terms([{"step": 1, "train/loss": 1, "train/ce": 1, "train/kd": 0, "train/lr": 0.1,
                                 "train/top1": 0.2, "train/img_per_s": 9}]) == ["ce", "kd"]


# --------------------------------------------------------------------------------------------------------------------
# The commands


@pytest.mark.slow
def test_curves_writes_a_png(runs, tmp_path):
    teacher, student = runs
    out = _pictures("curves", teacher, "--out", tmp_path / "one.png")
    assert out.returncode == 0, out.stderr
    _assert_png(tmp_path / "one.png")
    # A teacher and a distillation run together (the student adds train/kd panels), with legend names.
    out = _pictures("curves", teacher, student, "--out", tmp_path / "sub" / "two.png", "--labels", "t", "kd",
                    "--metric", "eval/loss")
    assert out.returncode == 0, out.stderr
    _assert_png(tmp_path / "sub" / "two.png")
    # Chosen term panels only; a term no run logged is a clear error.
    _assert_png(pictures.plot_curves([teacher, student], str(tmp_path / "terms.png"), terms=["kd"]))
    with pytest.raises(pictures.PictureError, match="no run logged train/wcord_global; logged terms: ce, kd"):
        pictures.plot_curves([student], str(tmp_path / "x.png"), terms=["kd", "wcord_global"])


@pytest.mark.slow
def test_correlation_writes_a_png_and_prints_the_mean(runs, tmp_path):
    teacher, student = runs
    out = _pictures("correlation", "--teacher", teacher, "--student", student, "--out", tmp_path / "corr.png", "--json")
    assert out.returncode == 0, out.stderr
    _assert_png(tmp_path / "corr.png")
    result = json.loads(out.stdout)
    assert 0.0 <= result["mean_abs_diff"] <= 2.0
    assert 0.0 <= result["mean_abs_diff"] <= result["max_abs_diff"] <= 2.0
    assert result["num_classes"] == 4 and result["num_test"] == 32
    # The logits are the ones evaluation sees: their top-1 is the run's last logged eval/top1 (one example slack).
    for workdir, key in ((student, "student_top1"), (teacher, "teacher_top1")):
        logged = [r["eval/top1"] for r in pictures.load_run(workdir) if "eval/top1" in r][-1]
        assert abs(result[key] - logged) <= 1 / 32 + 1e-9, (key, result[key], logged)


def test_correlation_prints_one_line_and_defaults_the_teacher(monkeypatch, capsys, tmp_path):
    """Without --json one line carries the number; without --teacher the distillation run's teacher is used."""
    calls = []

    def fake(teacher, student, out, which, batch_size):
        calls.append((teacher, student, out, which, batch_size))
        return {"mean_abs_diff": 0.125, "num_classes": 4, "num_test": 32, "teacher_top1": 0.5, "student_top1": 0.25,
                "out": out}

    monkeypatch.setattr(pictures, "correlation", fake)
    assert pictures.main(["correlation", "--student", str(tmp_path), "--out", "c.png", "--checkpoint", "best"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mean |corr_t - corr_s| = 0.125000 "), lines
    assert calls == [(None, str(tmp_path), "c.png", "best", 256)]

    config = {"task": "distill", "model": "resnet8", "teacher": {"model": "resnet8", "checkpoint": "/t"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.undo()
    with pytest.raises(pictures.PictureError, match="no such workdir: /t"):
        pictures.correlation(None, str(tmp_path), str(tmp_path / "x.png"))


def test_curves_and_correlation_of_two_runs_in_this_process(small_teachers, tmp_path, capsys):
    """Both pictures drawn here from two finished runs (the fast tier's run of the commands' bodies): PNG files, and
    the correlation's top-1s are the ones each run's evaluation logged."""
    teacher, student = small_teachers["resnet8x4"], small_teachers["resnet8"]
    _assert_png(pictures.plot_curves([teacher, student], str(tmp_path / "curves.png"), labels=["x4", "r8"]))
    result = pictures.correlation(teacher, student, str(tmp_path / "corr.png"))
    _assert_png(tmp_path / "corr.png")
    assert 0.0 <= result["mean_abs_diff"] <= result["max_abs_diff"] <= 2.0
    for workdir, key in ((student, "student_top1"), (teacher, "teacher_top1")):
        logged = [r["eval/top1"] for r in pictures.load_run(workdir) if "eval/top1" in r][-1]
        assert abs(result[key] - logged) <= 1 / result["num_test"] + 1e-9, (key, result[key], logged)
    with pytest.raises(SystemExit) as e:
        pictures.main(["curves", str(tmp_path / "no_such_run"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: no such workdir: {tmp_path / 'no_such_run'}")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, expected", [
    (["curves", "{missing}", "--out", "{tmp}/x.png"], "no such workdir"),
    (["correlation", "--teacher", "{missing}", "--student", "{missing}", "--out", "{tmp}/x.png"], "no such workdir"),
    (["curves", "{tmp}", "--out", "{tmp}/x.png"], "has no metrics.jsonl"),
    (["correlation", "--student", "{tmp}", "--out", "{tmp}/x.png"], "has no config.json"),
    (["curves"], "the following arguments are required"),
    (["draw"], "invalid choice"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    args = [a.format(missing=tmp_path / "no_such_run", tmp=tmp_path) for a in args]
    out = _pictures(*args)
    _assert_usage_error(out, expected)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_bad_metric_and_labels_are_one_line_and_exit_2(runs, tmp_path):
    teacher, _ = runs
    _assert_usage_error(_pictures("curves", teacher, "--out", tmp_path / "x.png", "--metric", "eval/top7"),
                        "no run logged 'eval/top7'; logged: eval/loss, eval/top1")
    _assert_usage_error(_pictures("curves", teacher, "--out", tmp_path / "x.png", "--labels", "a", "b"),
                        "--labels has 2 names for 1 workdirs")
    _assert_usage_error(_pictures("correlation", "--student", teacher, "--out", tmp_path / "x.png"),
                        "is not a distillation run")
