"""Workdirs as local paths or `gs://` URIs: every file of a run goes through `etils.epath`.

There is no offline GCS, so the `gs://` tests run against a fake: `epath.testing.mock_epath` routes every epath call
to a local folder standing for the bucket (and epath is told TensorFlow is absent, so that `gs://` does not go to
`tf.io.gfile`). That covers the run's own files (config.json, metrics.jsonl, TensorBoard events, finding a teacher's
checkpoints); orbax writes arrays to `gs://` through tensorstore's own GCS driver, which no fake reaches.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
from etils import epath
from etils.epath import gpath

from wcord_jax import checkpoint, configs, metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_gcs(tmp_path):
    """`gs://...` paths live under tmp_path/gcs; returns the list of (mode, path) of every open on gs://."""
    bucket_root = tmp_path / "gcs"
    bucket_root.mkdir()
    opened = []

    def local(path):
        path = os.fspath(path)
        return str(bucket_root / path[len("gs://"):]) if path.startswith("gs://") else path

    def one_path(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two_paths(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def open_(fn, path, mode):
        if os.fspath(path).startswith("gs://"):
            opened.append((mode, os.fspath(path)))
        return fn(local(path), mode)

    fns = {name: one_path for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")}
    fns.update(copy=two_paths, rename=two_paths, replace=two_paths, open=open_)
    with epath.testing.mock_epath(**fns), mock.patch.object(gpath, "_is_tf_installed", lambda: False):
        yield bucket_root, opened


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
    assert os.fspath(metrics.workdir_path("runs/../runs/a")) == os.path.join(str(tmp_path), "runs", "a")
    assert metrics.is_local("runs/a") and metrics.is_local(str(tmp_path))
    remote = metrics.workdir_path("gs://bucket/runs/a")
    assert not metrics.is_local(remote)
    assert os.fspath(remote / "checkpoints" / "last") == "gs://bucket/runs/a/checkpoints/last"
    assert os.fspath(metrics.workdir_path(remote)) == "gs://bucket/runs/a"


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


def test_metric_writer_on_gcs_rewrites_whole_objects(fake_gcs):
    root, opened = fake_gcs
    for step in (1, 2):
        writer = metrics.MetricWriter("gs://bucket/run")
        writer.write(step, {"train/loss": 1.0 / step})
        writer.write(step, {"eval/top1": 0.25})
        writer.close()
    assert [r["step"] for r in metrics.read_metrics("gs://bucket/run")] == [1, 1, 2, 2]
    assert (root / "bucket" / "run" / "metrics.jsonl").exists()
    assert opened and all("a" not in mode for mode, _ in opened)  # object storage has no append
    events = [p for p in (root / "bucket" / "run").iterdir() if p.name.startswith("events.out.tfevents.")]
    assert len(events) == 2 and all(len(_records(p.read_bytes())) == 3 for p in events)


def test_config_and_resume_check_on_gcs(fake_gcs):
    root, _ = fake_gcs
    config = configs.teacher_config("resnet8")
    epath.Path("gs://bucket/run").mkdir(parents=True, exist_ok=True)
    train._check_resume_matches("gs://bucket/run", config)  # nothing there yet
    train._write_config("gs://bucket/run", config)
    assert json.loads((root / "bucket" / "run" / "config.json").read_text())["model"] == "resnet8"
    train._check_resume_matches("gs://bucket/run", config)
    with pytest.raises(train.ConfigError, match="gs://bucket/run holds a run with model='resnet8'"):
        train._check_resume_matches("gs://bucket/run", configs.teacher_config("resnet20"))


def test_checkpoint_dir_finds_a_teacher_on_gcs(fake_gcs):
    root, _ = fake_gcs
    (root / "bucket" / "teacher" / "checkpoints" / "last" / "40").mkdir(parents=True)
    expected = "gs://bucket/teacher/checkpoints/last"
    for given in ("gs://bucket/teacher", "gs://bucket/teacher/checkpoints", expected):
        assert checkpoint.checkpoint_dir(given) == expected
    with pytest.raises(FileNotFoundError, match="gs://bucket/other/checkpoints/last/<step>"):
        checkpoint.checkpoint_dir("gs://bucket/other")


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
