"""The run loop every training run shares (a teacher, a student alone, a distillation): the run's set-up (mesh,
data set, feed), resume, epochs of dispatches, evaluation, checkpoints (per epoch, timed inside long epochs, on
SIGTERM / SIGINT), logs, and the finiteness watch. It knows a run by its state (a pytree with `step` and `rng`), a
compiled dispatch (`wcord_jax.step` via a feed) and an evaluator; nothing of what the step computes.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from wcord_jax import backend
from wcord_jax import checkpoint as ckpt_lib
from wcord_jax import compile_cache
from wcord_jax import data as data_lib
from wcord_jax import feeds, host
from wcord_jax import metrics as metrics_lib
from wcord_jax import models, optim, parallel, paths, rundir
from wcord_jax import step as step_lib
from wcord_jax import views as views_lib
from wcord_jax.core import BN_SYNC, ConfigError

log = logging.getLogger("wcord_jax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------------------------------------
# Config checks


def validate_config(config, num_devices: int) -> None:
    """Raises ConfigError, naming the valid choices, for anything that cannot run."""
    if config.model not in models.list_models():
        raise ConfigError(f"unknown model {config.model!r}; valid: {', '.join(models.list_models())}")
    if config.dataset.name not in data_lib.SOURCES:
        raise ConfigError(f"unknown data set {config.dataset.name!r}; valid: {', '.join(data_lib.SOURCES)}")
    if config.dtype not in backend.DTYPES:
        raise ConfigError(f"unknown dtype {config.dtype!r}; valid: {', '.join(backend.DTYPES)}")
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % num_devices:
            raise ConfigError(f"{key}={value} must be a positive multiple of the device count ({num_devices})")
    if config.num_epochs <= 0:
        raise ConfigError(f"num_epochs must be positive, got {config.num_epochs}")
    if config.steps_per_dispatch < 0:
        raise ConfigError(f"steps_per_dispatch must be 0 (auto: the backend's default) or positive, got "
                          f"{config.steps_per_dispatch}")
    if config.get("bn_sync", "global") not in BN_SYNC:
        raise ConfigError(f"bn_sync must be one of {', '.join(BN_SYNC)}, got {config.bn_sync!r}")
    if config.get("stream_prefetch", 2) < 0:
        raise ConfigError(f"stream_prefetch must be at least 0, got {config.stream_prefetch}")
    if config.get("nonfinite", "stop") not in step_lib.NONFINITE_MODES:
        raise ConfigError(f"nonfinite must be one of {', '.join(step_lib.NONFINITE_MODES)}, got {config.nonfinite!r}")
    if int(config.get("nonfinite_skip_limit", 10)) < 1:
        raise ConfigError(f"nonfinite_skip_limit must be at least 1, got {config.nonfinite_skip_limit}")
    parse_view(config.get("view"), "view")


def parse_view(spec, key: str) -> views_lib.View:
    """The view `spec` of config key `key`; ConfigError naming the valid views otherwise."""
    try:
        return views_lib.parse(spec)
    except views_lib.ViewError as e:
        raise ConfigError(f"{key}: {e}") from None


# --------------------------------------------------------------------------------------------------------------------
# The loop


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag that the loop checks between dispatches (then it checkpoints and exits).

    Once a stop is requested the checkpoint is always written: a second signal (a tool that signals twice, a second
    Ctrl-C) only logs that the run is already stopping, and a signal during any checkpoint save waits for the save.
    A third signal outside a save stops the run at once (KeyboardInterrupt); a SIGKILL cannot be caught, and then a
    rerun resumes from the newest finished checkpoint."""

    def __init__(self):
        self.requested = False
        self.signals = 0
        self._saving = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signals += 1
        first, self.requested = not self.requested, True
        if first:
            log.warning("stop requested: saving a checkpoint after the current dispatch")
        elif self._saving or self.signals == 2:
            log.warning("already stopping: the checkpoint is being written first (a third signal outside the save "
                        "stops at once)")
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(RuntimeError):
    """Training stopped on request after saving a checkpoint; re-running the same command resumes."""


class Diverged(RuntimeError):
    """A step's loss, a logged term or the new weights were not finite: the run stopped without saving that state."""


class _FiniteWatch:
    """Reads the steps' `nonfinite` flags (`step_lib.guard_nonfinite`) whenever the host reads the metrics anyway (a
    log line) and before every checkpoint, so no checkpoint is ever written from a non-finite state.

    `nonfinite='stop'`: the first bad step ends the run (`Diverged`, naming the step, the epoch and the terms).
    `'skip'`: the device dropped the bad steps' updates; they are counted, and `nonfinite_skip_limit` bad steps in a
    row end the run."""

    def __init__(self, config, steps_per_epoch: int, ckpt):
        self.mode = config.get("nonfinite", "stop")
        self.limit = int(config.get("nonfinite_skip_limit", 10))
        self.steps_per_epoch, self.ckpt = steps_per_epoch, ckpt
        self.in_a_row, self.skipped = 0, 0

    def check(self, window: list) -> list:
        """`window`: [(step before the dispatch, its metrics)]; returns the host copies of the metrics."""
        host = [(first, jax.device_get(m)) for first, m in window]
        newly = []
        for first, m in host:
            if step_lib.NONFINITE not in m:
                continue
            for i, flag in enumerate(np.atleast_1d(m[step_lib.NONFINITE])):
                if not flag:
                    self.in_a_row = 0
                    continue
                step = first + i + 1
                if self.mode == "stop":
                    raise Diverged(self._message(step, m, i, "the run stopped there (nonfinite=stop)"))
                self.in_a_row += 1
                self.skipped += 1
                newly.append(step)
                if self.in_a_row >= self.limit:
                    raise Diverged(self._message(step, m, i, f"the run stopped after {self.in_a_row} such "
                                                             f"steps in a row (nonfinite_skip_limit={self.limit})"))
        if newly:
            log.warning("skipped %d step(s) with non-finite values (%s); %d so far", len(newly),
                        ", ".join(map(str, newly[:5])) + (", ..." if len(newly) > 5 else ""), self.skipped)
        return [m for _, m in host]

    def _message(self, step: int, metrics: dict, i: int, why: str) -> str:
        bad = [k for k, v in metrics.items()
               if k != step_lib.NONFINITE and np.issubdtype(np.asarray(v).dtype, np.floating)
               and not np.isfinite(np.atleast_1d(v)[i])]
        what = ", ".join(bad) if bad else "the updated weights"
        latest = self.ckpt.latest_step()
        kept = (f"the newest checkpoint (step {latest}) is kept, and a rerun (e.g. with a lower "
                "--config.learning_rate) resumes from it" if latest is not None
                else "no checkpoint had been written yet")
        return (f"non-finite values at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}) in {what}; "
                f"{why}, and nothing was saved from that state: {kept}")


def setup_run(config, validate: Callable, extra_features: tuple = ()) -> tuple:
    """The mesh, activation dtype, data set and feed of a run, after `validate(config, num_devices)`. The feed
    gives the trained network `config.view`; `extra_features` are further data-set features to read (another
    network's `feature:NAME` view)."""
    try:
        mesh = parallel.make_mesh(config.get("num_devices") or None)
    except ValueError as e:  # more devices than there are, or a subset in a multi-process run
        raise ConfigError(f"num_devices={config.get('num_devices')}: {e}") from e
    validate(config, mesh.devices.size)
    view = parse_view(config.get("view"), "view")
    features = tuple(sorted({f for f in (view.feature, *extra_features) if f}))
    dataset = data_lib.load(config.dataset, config.seed, features)
    if not view.is_identity and not dataset.in_memory:
        raise ConfigError(f"view={view.spec}: views other than identity need an in-memory data set, not "
                          f"{dataset.name}")
    try:
        view_in = feeds.view_input(view, dataset) if dataset.in_memory else None
    except views_lib.ViewError as e:
        raise ConfigError(f"view: {e}") from None
    feed = feeds.make_feed(dataset, mesh, config, view_in)
    if feed.steps_per_epoch == 0:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the training set ({dataset.num_train})")
    return mesh, DTYPES[backend.dtype(config.dtype, backend.current())[0]], dataset, feed


def run_training(config, workdir: str, mesh, feed, state, run_steps, evaluate, schedule, describe: str,
                 state_spec=P(), before_training: Optional[Callable[[], dict]] = None,
                 runner_for_epoch: Optional[Callable[[int], Callable]] = None, extra_epochs: int = 0) -> dict:
    """The epoch loop shared by every kind of run: resume, train, evaluate, checkpoint, log.

    `state` is a freshly initialised train state (a pytree with `step` and `rng`), placed on the mesh with
    `state_spec`; `run_steps(state, *args)` is a compiled dispatch from `feed.make_runner`, or, for runs made of
    stages, `runner_for_epoch(epoch)` returns the dispatch of that (0-based) epoch; `evaluate(state)` returns the eval
    metrics; `schedule(step)` the learning rate (for the logs). `extra_epochs` run before `config.num_epochs` (an init
    stage). `before_training()`, if given, returns metrics logged at step 0 of a fresh run (the teacher's accuracy).
    """
    steps_per_epoch = feed.steps_per_epoch
    num_epochs = config.num_epochs + extra_epochs
    total_steps = steps_per_epoch * num_epochs
    is_main = jax.process_index() == 0
    paths.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    rundir.check_resume_matches(workdir, config)
    parallel.sync("wcord_jax:config_checked")  # every process read config.json before process 0 rewrites it
    # Copy first: leaves that share one buffer (equal constants) cannot both be donated to the step.
    state = parallel.place(jax.tree.map(jnp.copy, state), mesh, state_spec)
    ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
    best_top1 = -1.0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        best_top1 = meta.get("best_top1", -1.0)
        log.info("resumed from step %d (epoch %d) in %s", int(state.step), int(state.step) // steps_per_epoch,
                 workdir)
    if is_main:
        rundir.write_config(workdir, config)
        if host.NOTE and jax.default_backend() == "cpu":  # after every config check: an error stays one line
            log.info("%s", host.NOTE)
        if compile_cache.NOTE:
            log.info("%s", compile_cache.NOTE)
        _, why = backend.steps_per_dispatch(config.steps_per_dispatch, backend.current(), feed.dataset.in_memory)
        log.info("%s", backend.describe(config, backend.current(), feed.steps_per_dispatch, why))
        log.info("%s: %d train / %d test examples, %d devices (%s), %d steps per epoch, %d epochs", describe,
                 feed.dataset.num_train, feed.dataset.num_test, mesh.devices.size, jax.devices()[0].platform,
                 steps_per_epoch, num_epochs)
        log.info("learning rate %g, times %g after epochs %s", config.learning_rate, config.lr_decay_rate,
                 ", ".join(f"{e:g}" for e in optim.decay_epochs(config)))
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    if before_training is not None and int(state.step) == 0:
        first = before_training()
        if first:
            writer.write(0, first)
    result = {}
    watch = _FiniteWatch(config, steps_per_epoch, ckpt)
    clock = _CheckpointClock(config)
    compiles = compile_cache.CompileLog(enabled=is_main)
    multi_process = jax.process_count() > 1
    with _StopRequest() as stop:
        try:
            step = int(state.step)
            while step < total_steps:
                epoch = step // steps_per_epoch
                runner = runner_for_epoch(epoch) if runner_for_epoch is not None else run_steps
                state, step = _train_epoch(config, feed, state, step, epoch, num_epochs, runner, schedule, writer,
                                           ckpt, stop, best_top1, watch, clock, compiles)
                with compiles.first_call(evaluate, "evaluation"):
                    result = evaluate(state)
                writer.write(step, {"epoch": epoch + 1, **result})
                is_best = result["eval/top1"] > best_top1
                best_top1 = max(best_top1, result["eval/top1"])
                if is_main:
                    log.info("epoch %d/%d: eval top1 %.4f top5 %.4f loss %.4f", epoch + 1, num_epochs,
                             result["eval/top1"], result["eval/top5"], result["eval/loss"])
                with stop.saving():
                    ckpt.save(step, state, _meta(config, epoch + 1, result, best_top1, feed), best=is_best)
                    clock.saved()
                    if multi_process:
                        stop.requested = parallel.any_process(stop.requested)
                    if stop.requested and step < total_steps:
                        ckpt.wait()
                if stop.requested and step < total_steps:
                    raise Interrupted(f"stopped at step {step}; run the same command again to resume")
            if not result:  # resumed a finished run: report its final evaluation again
                result = evaluate(state)
        finally:
            with stop.saving():  # a save still being written (async) completes, whatever signal comes now
                ckpt.close()
            writer.close()
    return result


def _meta(config, epoch: int, result: dict, best_top1: float, feed=None) -> dict:
    """A checkpoint's metadata: the network, the epoch, the results, and what it was trained on (the data set, its
    classes and the network's view with its normalisation: a teacher's view is read back from here)."""
    meta = {"model": config.model, "task": config.get("task", "teacher"), "epoch": epoch,
            "best_top1": float(best_top1)}
    if feed is not None:
        classes = config.dataset.get("classes")
        meta.update({"dataset": config.dataset.name, "num_classes": int(feed.dataset.num_classes),
                     "classes": [int(c) for c in classes] if classes is not None else None, **feed.view_meta()})
    meta.update({k: float(v) for k, v in result.items()})
    return meta


class _CheckpointClock:
    """When a checkpoint inside an epoch is due: every `checkpoint_every_steps` steps, and once
    `checkpoint_every_minutes` of the run have passed since its last checkpoint (or its start), so that a crash of a
    long epoch loses at most that much work."""

    now = staticmethod(time.monotonic)  # seconds

    def __init__(self, config):
        self.every_steps = int(config.get("checkpoint_every_steps", 0) or 0)
        self.every_minutes = float(config.get("checkpoint_every_minutes", 0) or 0)
        self.last = self.now()

    def saved(self) -> None:
        self.last = self.now()

    def time_due(self) -> bool:
        return self.every_minutes > 0 and self.now() - self.last >= 60 * self.every_minutes

    def steps_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0


def _dispatch_guard():
    """The context a train epoch feeds its dispatches in, between two logging points: none of its own (a transfer
    guard the user set for the process stays in force); tests/test_transfers.py replaces it with a strict one to
    prove that the loop reads nothing back there."""
    return contextlib.nullcontext()


# Without log lines (log_every_steps=0) the processes of a multi-process run still agree on a stop (a signal, a timed
# checkpoint) this often.
STOP_AGREEMENT_STEPS = 100


def _train_epoch(config, feed, state, step, epoch, num_epochs, run_steps, schedule, writer, ckpt, stop, best_top1,
                 watch, clock, compiles):
    """Runs the rest of one epoch from `step`; logs, checkpoints when `clock` or a stop request says so, and returns
    (state, step). The steps' finiteness flags are read (`watch`) with every log line and before every checkpoint."""
    steps_per_epoch = feed.steps_per_epoch
    start = step - epoch * steps_per_epoch
    progress = metrics_lib.Progress(steps_per_epoch, epoch, num_epochs, initial=start,
                                    enabled=jax.process_index() == 0,
                                    use_bar=None if config.progress_bar else False)
    window, window_start, window_steps, checked = [], time.perf_counter(), 0, 0
    multi_process = jax.process_count() > 1
    ahead = parallel.DispatchWindow()
    every = config.log_every_steps
    agree_every = every if every > 0 else STOP_AGREEMENT_STEPS
    dispatches = iter(feed.dispatches(state.rng, epoch, start))
    try:
        while True:
            # Between the logging points the host only feeds the devices: no value is read back, nothing is
            # transferred implicitly (tests/test_transfers.py).
            with _dispatch_guard():
                item = next(dispatches, None)
                if item is None:
                    break
                n, args = item
                with compiles.first_call(run_steps, f"train dispatch ({n} step{'s' if n != 1 else ''})"):
                    state, metrics = run_steps(state, *args)
                ahead.add(metrics)
            window.append((step, metrics))
            window_steps += n
            prev, step = step, step + n
            pos = step - epoch * steps_per_epoch
            progress.update(n)
            if (every > 0 and step // every != prev // every) or pos == steps_per_epoch:
                values = _summarise(watch.check(window[checked:]), watch.mode == "skip", window[:checked])
                elapsed = time.perf_counter() - window_start
                values["lr"] = float(schedule(step - 1))
                values["img_per_s"] = window_steps * config.batch_size / max(elapsed, 1e-9)
                writer.write(step, {"epoch": epoch + 1, **{f"train/{k}": v for k, v in values.items()}})
                progress.log_line(pos, {"loss": values["loss"], "top1": values["top1"],
                                        "img/s": values["img_per_s"]})
                progress.update(0, {"loss": values["loss"], "img/s": values["img_per_s"]})
                window, window_start, window_steps, checked = [], time.perf_counter(), 0, 0
            timed, stopping = clock.time_due(), stop.requested
            if multi_process:
                # Every process stops (and saves) after the same dispatch, whichever of them asked: they agree at
                # the logging points (at least every STOP_AGREEMENT_STEPS steps), not after every dispatch.
                if step // agree_every != prev // agree_every:
                    stopping, timed = parallel.any_process_each([stop.requested, timed])
                    stop.requested = stopping
                else:
                    stopping, timed = False, False
            if pos < steps_per_epoch and (stopping or timed or clock.steps_due(step)):
                window[checked:] = list(zip([f for f, _ in window[checked:]], watch.check(window[checked:])))
                checked = len(window)
                with stop.saving():
                    ckpt.save(step, state, _meta(config, epoch, {}, best_top1, feed))
                    clock.saved()
                    if timed and not stopping and jax.process_index() == 0:
                        log.info("checkpoint at step %d (epoch %d, step %d of %d; one per %g min of training)",
                                 step, epoch + 1, pos, steps_per_epoch, clock.every_minutes)
                    if stopping:
                        ckpt.wait()
                if stopping:
                    raise Interrupted(f"stopped at step {step}; run the same command again to resume")
            # A stop requested in the epoch's last dispatch: the epoch's evaluation and checkpoint come first.
        return state, step
    finally:
        progress.close()


def _summarise(host_metrics: list, skip: bool, checked: list = ()) -> dict:
    """Mean of each metric over the steps of a logging window (`host_metrics`: host copies, after `checked`: those
    read already before a checkpoint). With `nonfinite='skip'` the skipped steps are left out of the means and
    `nonfinite` (the window's fraction of skipped steps) is kept; otherwise the flag is not logged."""
    stacked = [jax.device_get(m) for _, m in checked] + list(host_metrics)
    values = {k: np.concatenate([np.atleast_1d(m[k]) for m in stacked]) for k in stacked[0]}
    bad = values.pop(step_lib.NONFINITE, None)
    out = {}
    for k, v in values.items():
        if skip and bad is not None and bad.any():
            v = v[bad == 0]
        out[k] = float(np.mean(v)) if v.size else float("nan")
    if skip and bad is not None:
        out[step_lib.NONFINITE] = float(np.mean(bad))
    return out
