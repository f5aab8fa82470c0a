"""Where results go: `metrics.jsonl`, TensorBoard event files and the terminal.

Only process 0 writes. TensorBoard files are written with the `tensorboard` package alone (no TensorFlow); without that
package the JSON lines are still written.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Optional

log = logging.getLogger("wcord_jax")


def _tensorboard_writer(workdir: str):
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        log.warning("the tensorboard package is not installed: TensorBoard files are not written")
        return None
    return EventFileWriter(workdir), event_pb2, summary_pb2


class MetricWriter:
    """Appends one JSON object per event to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = _tensorboard_writer(workdir)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
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


def read_metrics(workdir: str) -> list[dict]:
    """The events of a run, in the order they were written."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
