"""`wcord_jax.rundir`: the network a run trained, read back from its directory, for every kind of student (a
method's own heads and modules beside it, an ensemble's per-teacher heads), as the pictures and the probe read it."""
import json

import jax
import numpy as np
import pytest

from conftest import small_distill_config
from wcord_jax import checkpoint, distill, rundir
from wcord_jax import metrics as metrics_lib
from wcord_jax.tools import pictures, probe

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


def test_events_are_read_or_their_absence_named(tmp_path):
    assert rundir.read_events(str(tmp_path)) == []  # a run that has not logged yet
    for workdir, message in ((tmp_path / "nope", f"no such workdir: {tmp_path / 'nope'}$"),
                             (tmp_path, "has no metrics.jsonl")):
        with pytest.raises(rundir.RunDirError, match=message):
            rundir.read_events(str(workdir), required=True)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(rundir.RunDirError, match="metrics.jsonl is empty$"):
        rundir.read_events(str(tmp_path), required=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/loss": 2.0}\n')
    assert [e["train/loss"] for e in rundir.read_events(str(tmp_path), required=True)] == [2.5, 2.0]


def test_a_checkpoint_is_read_from_one_step(tmp_path):
    """Metadata and weights come from the same (newest) step, so a run still writing cannot mix two."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        state = {"params": {"w": np.full((3,), float(step), np.float32)}, "batch_stats": {}}
        ckpt.save(step, state, {"epoch": step, "model": "m"})
    ckpt.close()
    meta, variables = rundir.read_checkpoint(str(tmp_path))
    assert meta["epoch"] == 2
    np.testing.assert_array_equal(variables["params"]["w"], np.full((3,), 2.0, np.float32))
    with pytest.raises(rundir.CheckpointMissing, match="teacher checkpoint not found"):
        rundir.read_checkpoint(str(tmp_path / "empty"), role="teacher ")


def test_a_checkpoint_of_another_layout_is_named_not_taken_for_damage(tmp_path, caplog):
    """A state written with another layout (an earlier version's DistillState) cannot resume: one error naming what
    differs, no fall-back to older steps (they have the same layout); the weights still load."""
    old = {"params": {"student": {"w": np.ones((2,), np.float32)}}, "method_state": {"memory": np.zeros((4, 2))}}
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        ckpt.save(step, old, {"epoch": step})
    ckpt.close()
    new = {"params": {"student": {"w": np.ones((2,), np.float32)}}, "method": {"own": {"memory": np.zeros((4, 2))}}}
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.Checkpointer(str(tmp_path), async_save=False).restore(new)
    assert "at step 2" in str(e.value) and "another layout" in str(e.value)
    assert "only in the checkpoint: method_state/memory" in str(e.value) and "only in this run: method/own/memory" \
        in str(e.value)
    assert "cannot be read" not in caplog.text  # not reported as damage
    state, meta = checkpoint.Checkpointer(str(tmp_path), async_save=False).restore(old)  # the same layout resumes
    assert meta["epoch"] == 2
    np.testing.assert_array_equal(checkpoint.load_variables(str(tmp_path))["params"]["student"]["w"], np.ones(2))
