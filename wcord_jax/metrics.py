"""Where results go: `metrics.jsonl`, TensorBoard event files and the terminal.

Only process 0 writes. Workdirs are local paths or URIs such as `gs://bucket/runs/x` (Cloud TPU): every file of a
run goes through `etils.epath` (`wcord_jax.paths`: `gs://` through gcsfs, local paths through `os`). TensorBoard
files are written with the `tensorboard` package's record format alone (no TensorFlow); without that package the JSON
lines are still written.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Mapping, Optional

from etils import epath

from wcord_jax.paths import PathLike, is_local, workdir_path

log = logging.getLogger("wcord_jax")
_EVENT_FILE_IDS = itertools.count()  # keeps event file names unique within a process (as tensorboard's own writer)


class _WholeObjectFile:
    """A file on object storage (GCS has no append) written by rewriting the whole object at each flush: readers
    never see a partial line, and `initial` (the object's earlier content) continues a resumed run's file."""

    def __init__(self, path: epath.Path, initial: bytes = b""):
        self._path, self._buffer = path, io.BytesIO()
        self._buffer.write(initial)
        self._dirty = True
        self.closed = False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self._path.write_bytes(self._buffer.getvalue())
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def _open_append(path: epath.Path):
    """A binary file to append to: the file itself on a local disk, a `_WholeObjectFile` on object storage."""
    if is_local(path):
        return path.open("ab")
    return _WholeObjectFile(path, path.read_bytes() if path.exists() else b"")


def _open_new(path: epath.Path):
    return path.open("wb") if is_local(path) else _WholeObjectFile(path)


class _EventWriter:
    """A TensorBoard event file (TFRecord-framed `Event` protos) in `directory`, written through epath; the same
    file name and first record as tensorboard's own `EventFileWriter`, which would import TensorFlow when it is
    installed."""

    def __init__(self, directory: epath.Path, event_pb2, record_writer_cls):
        self._event_pb2 = event_pb2
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_EVENT_FILE_IDS)}")
        self._writer = record_writer_cls(_open_new(directory / name))
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2",
                                       source_metadata=event_pb2.SourceMetadata(writer="wcord_jax")))
        self.flush()

    def add_event(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _tensorboard_writer(directory: epath.Path):
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        log.warning("the tensorboard package is not installed: TensorBoard files are not written")
        return None
    return _EventWriter(directory, event_pb2, RecordWriter), event_pb2, summary_pb2


class MetricWriter:
    """Appends one JSON object per event to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: PathLike, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if enabled:
            directory = workdir_path(workdir)
            directory.mkdir(parents=True, exist_ok=True)
            self._file = _open_append(directory / "metrics.jsonl")
            self._tb = _tensorboard_writer(directory)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write((json.dumps(record) + "\n").encode("utf-8"))
        self._file.flush()
        if self._tb is not None:
            writer, event_pb2, summary_pb2 = self._tb
            scalars = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                       if k not in ("step", "epoch") and isinstance(v, (int, float))]
            if scalars:
                event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=scalars))
                writer.add_event(event)
                writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb[0].close()


def _plain(v):
    """numpy / jax scalars become Python numbers so they serialise as JSON."""
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        return v.item()
    return v


def read_metrics(workdir: PathLike) -> list[dict]:
    """The events of a run, in the order they were written."""
    text = (workdir_path(workdir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Progress:
    """A tqdm bar per epoch on a terminal; plain log lines every `log_every` steps otherwise."""

    def __init__(self, total: int, epoch: int, num_epochs: int, initial: int = 0, enabled: bool = True,
                 use_bar: Optional[bool] = None):
        self.epoch, self.num_epochs, self.total = epoch, num_epochs, total
        self.enabled = enabled
        self.bar = None
        if use_bar is None:
            use_bar = sys.stderr.isatty()
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{num_epochs}", unit="step",
                            leave=True, dynamic_ncols=True)

    def update(self, steps: int, postfix: Optional[Mapping[str, float]] = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log_line(self, done: int, values: Mapping[str, float]) -> None:
        """A plain line (only when no bar is shown, so a terminal is not cluttered)."""
        if self.enabled and self.bar is None:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("epoch %d/%d step %d/%d %s", self.epoch + 1, self.num_epochs, done, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
