"""Runs whose workdirs are `gs://` URIs, against a real GCS-compatible server (conftest's `gcs_server`), as a Cloud TPU
user runs them: a teacher writes its metrics, TensorBoard events and checkpoints to the bucket; one SIGTERM mid-epoch,
and the rerun resumes from the bucket and ends with an uninterrupted run's weights; a student distils from the
`gs://` teacher into the bucket; summary, pictures and the linear probe read the `gs://` runs."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from wcord_jax import checkpoint, metrics
from wcord_jax.tools import pictures, probe, summary

pytestmark = pytest.mark.slow  # the command line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.name=synthetic", "--config.dataset.num_train=256", "--config.dataset.num_test=64",
        "--config.dataset.num_classes=4", "--config.dataset.image_size=16", "--config.batch_size=32",
        "--config.eval_batch_size=32", "--config.log_every_steps=1", "--config.num_devices=1"]  # 8 steps an epoch


def command(workdir, *args, config="configs/teacher.py:resnet8"):
    return [sys.executable, "-m", "wcord_jax.main", "--config", config, "--workdir", workdir, *TINY, *args]


def run(gcs, workdir, *args, **kwargs):
    out = subprocess.run(command(workdir, *args, **kwargs), cwd=ROOT, env=gcs.env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def stop_mid_epoch(gcs, workdir, *args, at="epoch 2/2 step 3/8"):
    """Starts a run and sends it one SIGTERM once its log shows `at`; returns (exit status, its log)."""
    proc = subprocess.Popen(command(workdir, *args), cwd=ROOT, env=gcs.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and not any(at in l for l in lines):
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


def test_a_teacher_on_gcs_resumes_from_the_bucket_and_a_student_distils_from_it(gcs, tmp_path, capsys):
    straight, stopped, student = (f"{gcs.root}/{name}" for name in ("straight", "stopped", "student"))
    cache = f"--config.compilation_cache={gcs.root}/jax_cache"  # the compiled programs in the bucket too
    run(gcs, straight, "--config.num_epochs=2", cache)
    assert any(name.endswith("-cache") for name in gcs.objects(f"{gcs.root}/jax_cache"))
    objects = gcs.objects(straight)
    assert {"config.json", "metrics.jsonl"} <= set(objects)
    assert any(name.startswith("events.out.tfevents.") for name in objects)
    assert any(name.startswith("checkpoints/last/16/") for name in objects)
    assert any(name.startswith("checkpoints/best/") for name in objects)
    evals = [json.loads(l) for l in objects["metrics.jsonl"].decode().splitlines() if "eval/top1" in l]
    assert [e["epoch"] for e in evals] == [1, 2]

    status, log = stop_mid_epoch(gcs, stopped, "--config.num_epochs=2")
    assert status == 130, log[-3000:]
    stopped_at = int(log.split("stopped at step ")[1].split(";")[0])
    assert 8 < stopped_at < 16
    assert checkpoint.Checkpointer(stopped).latest_step() == stopped_at
    out = run(gcs, stopped, "--config.num_epochs=2", cache)
    assert f"resumed from step {stopped_at}" in out.stderr, out.stderr[-2000:]
    assert "train dispatch (1 step): first call" in out.stderr and \
        "its 1 program read from the persistent compilation cache" in out.stderr, out.stderr[-2000:]
    for a, b in zip(jax.tree.leaves(checkpoint.load_variables(straight)),
                    jax.tree.leaves(checkpoint.load_variables(stopped))):
        np.testing.assert_array_equal(a, b)
    assert [e["epoch"] for e in metrics.read_metrics(stopped) if "eval/top1" in e] == [1, 2]

    run(gcs, student, "--config.num_epochs=1", f"--config.teacher.checkpoint={straight}",
        config="configs/distill.py:kd,resnet8,resnet8")
    logged = [e["teacher/top1"] for e in metrics.read_metrics(student) if "teacher/top1" in e]
    assert logged == [pytest.approx(evals[-1]["eval/top1"])]  # the teacher it loaded from the bucket is that run's
    assert any(name.startswith("checkpoints/last/8/") for name in gcs.objects(student))

    # The tools read the gs:// runs.
    assert summary.main([straight, student]) == 0
    table = capsys.readouterr().out
    assert "teacher: resnet8" in table and "kd: resnet8 -> resnet8" in table
    assert pictures.main(["curves", straight, student, "--out", str(tmp_path / "curves.png")]) == 0
    capsys.readouterr()
    assert pictures.main(["correlation", "--student", student, "--out", str(tmp_path / "corr.png"), "--json"]) == 0
    corr = json.loads(capsys.readouterr().out)
    assert corr["teacher"] == straight and corr["teacher_top1"] == pytest.approx(evals[-1]["eval/top1"])
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "corr.png").stat().st_size > 0
    config = probe.probe_config("synthetic")
    config.dataset.update(num_train=128, num_test=64, num_classes=4, image_size=16)
    config.student.checkpoint = student
    config.probe.update(num_epochs=2, batch_size=64)
    result = probe.probe_and_evaluate(config, f"{gcs.root}/probe")
    written = json.loads(gcs.objects(f"{gcs.root}/probe")["probe.json"])
    assert written["probe/test_top1"] == result["probe/test_top1"] and written["source"]["workdir"] == student
