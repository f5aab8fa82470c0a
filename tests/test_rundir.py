"""`wcord_jax.rundir`: the network a run trained, read back from its directory, for every kind of student (a
method's own heads and modules beside it, an ensemble's per-teacher heads), as the pictures and the probe read it."""
import json

import jax
import numpy as np
import pytest

from conftest import small_distill_config
from wcord_jax import checkpoint, distill, rundir
from wcord_jax.tools import pictures, probe
from wcord_jax import metrics as metrics_lib

# case -> (method, number of teachers): students with regressors (FitNet), variational heads (VID), connectors
# trained in an init stage (AB), paraphrasers and translators (FT), and WCoRD's heads for each of two teachers.
CASES = {"fitnet": ("fitnet", 1), "vid": ("vid", 1), "ab": ("ab", 1), "ft": ("ft", 1), "wcord:2": ("wcord", 2)}
FAST = ("fitnet",)  # the rest: the whole suite


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_every_student_is_read_back_and_gives_its_logged_accuracy(small_teachers, tmp_path, case):
    method, num_teachers = CASES[case]
    config = small_distill_config(method, small_teachers, num_devices=1)
    config.teacher.checkpoint = ",".join([config.teacher.checkpoint] * num_teachers)
    workdir = str(tmp_path / "run")
    distill.distill_and_evaluate(config, workdir)
    saved = checkpoint.load_variables(workdir)["params"]
    assert len(set(saved) - {"student"}) >= 1, sorted(saved)  # the method's own parameters beside the student's

    net = rundir.load_network(workdir)
    assert (net.task, net.model_name, net.num_classes) == ("distill", "resnet8", 4)
    jax.tree.map(np.testing.assert_array_equal, net.variables["params"], saved["student"])  # the student, exactly
    logits, labels = pictures.logits_on_test(workdir)
    logged = [e["eval/top1"] for e in metrics_lib.read_metrics(workdir) if "eval/top1" in e][-1]
    assert abs(float(np.mean(np.argmax(logits, -1) == labels)) - logged) <= 1 / len(labels) + 1e-9
    p = probe.load_network(workdir)
    assert (p["task"], p["num_classes"], p["image_shape"], p["dataset"]) == ("distill", 4, (16, 16, 3), "synthetic")


def test_what_is_not_a_run_is_one_line_naming_the_workdir(tmp_path, small_teachers):
    with pytest.raises(rundir.RunDirError, match=f"no such workdir: {tmp_path / 'nope'}$"):
        rundir.read_config(str(tmp_path / "nope"))
    with pytest.raises(rundir.RunDirError, match="has no config.json"):
        rundir.load_network(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"task": "probe", "model": "resnet8"}))
    with pytest.raises(rundir.RunDirError, match="holds a 'probe' run; pass the workdir of a teacher or distillation"):
        rundir.load_network(str(tmp_path))
    with pytest.raises(rundir.RunDirError, match="unknown checkpoint 'first'; valid: last, best"):
        rundir.load_network(small_teachers["resnet8"], "first")
    teacher = rundir.load_network(small_teachers["resnet8"])
    assert (teacher.task, teacher.model_name, teacher.num_classes, teacher.meta["model"]) == (
        "teacher", "resnet8", 4, "resnet8")
