"""Workdirs as local paths or `gs://` URIs: every file of a run goes through `etils.epath` (`wcord_jax.paths`).

The `gs://` tests talk to a real GCS-compatible server started on a loopback port (conftest's `gcs_server`): epath
reaches it through gcsfs, orbax's arrays through tensorstore, each by its own emulator setting; what landed in the
bucket is read back over the server's JSON API with plain HTTP, not through the clients under test. The command-line
runs on `gs://` (a resumed teacher, a student of a `gs://` teacher, the tools) are in test_gcs_runs.py.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from etils import epath

from wcord_jax import checkpoint, configs, metrics, paths, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(data: bytes) -> list:
    """The payloads of a TFRecord file (TensorBoard's event format), checking the framing."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
    assert pos == len(data)
    return out


def test_local_paths_are_absolute_and_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.workdir_path("runs/../runs/a")) == os.path.join(str(tmp_path), "runs", "a")
    assert paths.is_local("runs/a") and paths.is_local(str(tmp_path))
    remote = paths.workdir_path("gs://bucket/runs/a")
    assert not paths.is_local(remote)
    assert os.fspath(remote / "checkpoints" / "last") == "gs://bucket/runs/a/checkpoints/last"
    assert os.fspath(paths.workdir_path(remote)) == "gs://bucket/runs/a"


def test_local_metric_writer_appends_and_writes_tensorboard_events(tmp_path):
    for step in (1, 2):  # a second writer (a resumed run) appends
        writer = metrics.MetricWriter(str(tmp_path / "run"))
        writer.write(step, {"train/loss": 0.5 * step, "epoch": 1})
        writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "run"))] == [1, 2]
    # events.out.tfevents.TIME.HOST.PID.N, N counting the process's writers (it can pass 9 within one second)
    events = sorted((p for p in os.listdir(tmp_path / "run") if p.startswith("events.out.tfevents.")),
                    key=lambda p: (int(p.split(".")[3]), int(p.rsplit(".", 1)[1])))
    assert len(events) == 2

    from tensorboard.compat.proto import event_pb2

    payloads = _records((tmp_path / "run" / events[0]).read_bytes())
    first, scalar = (event_pb2.Event.FromString(p) for p in payloads)
    assert first.file_version == "brain.Event:2"
    assert scalar.step == 1 and scalar.summary.value[0].tag == "train/loss"
    assert scalar.summary.value[0].simple_value == pytest.approx(0.5)


def test_metric_writer_on_gcs_writes_whole_objects_a_resumed_writer_continues(gcs):
    run = f"{gcs.root}/run"
    for step in (1, 2):  # a second writer (a resumed run) continues the same object (GCS has no append)
        writer = metrics.MetricWriter(run)
        writer.write(step, {"train/loss": 1.0 / step})
        writer.write(step, {"eval/top1": 0.25})
        writer.close()
    assert [r["step"] for r in metrics.read_metrics(run)] == [1, 1, 2, 2]
    objects = gcs.objects(run)
    assert [json.loads(l)["step"] for l in objects["metrics.jsonl"].decode().splitlines()] == [1, 1, 2, 2]
    events = [name for name in objects if name.startswith("events.out.tfevents.")]
    assert len(events) == 2 and all(len(_records(objects[name])) == 3 for name in events)


def test_config_and_resume_check_on_gcs(gcs):
    run = f"{gcs.root}/run"
    config = configs.teacher_config("resnet8")
    paths.workdir_path(run).mkdir(parents=True, exist_ok=True)
    rundir.check_resume_matches(run, config)  # nothing there yet
    rundir.write_config(run, config)
    assert json.loads(gcs.objects(run)["config.json"])["model"] == "resnet8"
    rundir.check_resume_matches(run, config)
    with pytest.raises(rundir.RunDirError, match=f"{run} holds a run with model='resnet8'"):
        rundir.check_resume_matches(run, configs.teacher_config("resnet20"))


def test_checkpoint_dir_finds_a_teacher_on_gcs(gcs):
    (epath.Path(gcs.root) / "teacher" / "checkpoints" / "last" / "40" / "_CHECKPOINT_METADATA").write_text("{}")
    expected = f"{gcs.root}/teacher/checkpoints/last"
    for given in (f"{gcs.root}/teacher", f"{gcs.root}/teacher/checkpoints", expected):
        assert checkpoint.checkpoint_dir(given) == expected
    with pytest.raises(FileNotFoundError, match=f"{gcs.root}/other/checkpoints/last/<step>"):
        checkpoint.checkpoint_dir(f"{gcs.root}/other")


def test_a_listing_sees_what_another_writer_added_since(gcs):
    """No stale listings: a checkpoint another process (or tensorstore) wrote after this process looked is found."""
    last = f"{gcs.root}/checkpoints/last"
    gcs.upload(f"{last}/8/_CHECKPOINT_METADATA", b"{}")
    assert [p.name for p in epath.Path(last).iterdir()] == ["8"]
    gcs.upload(f"{last}/16/_CHECKPOINT_METADATA", b"{}")
    assert sorted(p.name for p in epath.Path(last).iterdir()) == ["16", "8"]


def test_a_checkpoint_round_trips_through_the_bucket(gcs):
    """orbax on gs://: tensorstore writes the arrays, epath the metadata; the last `keep` are kept."""
    import numpy as np

    state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "batch_stats": {},
             "step": np.int32(0)}
    ckpt = checkpoint.Checkpointer(gcs.root, keep=2, async_save=False)
    try:
        for step in (1, 2, 3):
            ckpt.save(step, dict(state, step=np.int32(step)), {"epoch": step})
    finally:
        ckpt.close()
    assert checkpoint.load_meta(gcs.root)["epoch"] == 3
    np.testing.assert_array_equal(checkpoint.load_variables(gcs.root)["params"]["w"], state["params"]["w"])
    steps = {name.split("/")[2] for name in gcs.objects(gcs.root) if name.startswith("checkpoints/last/")}
    assert steps == {"2", "3"}


def test_local_checkpoint_dir_is_absolute(tmp_path, monkeypatch):
    (tmp_path / "t" / "checkpoints" / "best" / "3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert checkpoint.checkpoint_dir("t", "best") == str(tmp_path / "t" / "checkpoints" / "best")


def test_metric_files_do_not_import_tensorflow(tmp_path):
    """TensorBoard's own writer imports TensorFlow when it is installed; the run's files must not."""
    script = textwrap.dedent("""
        import sys
        from wcord_jax import metrics
        w = metrics.MetricWriter(sys.argv[1])
        w.write(1, {"train/loss": 1.0})
        w.close()
        assert metrics.read_metrics(sys.argv[1])[0]["step"] == 1
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
