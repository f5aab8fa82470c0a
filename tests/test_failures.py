"""Fail loudly, lose nothing: divergence stops a run without saving the non-finite state (or skips bad steps),
SIGTERM saves a checkpoint even when signalled twice, and a damaged newest checkpoint falls back to the previous one.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax import checkpoint as ckpt_lib
from wcord_jax import configs, core, data, feeds, loop, models, optim, parallel, train
from wcord_jax import step as step_lib

pytestmark = pytest.mark.slow  # the command line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.name=synthetic", "--config.dataset.num_train=256", "--config.dataset.num_test=32",
        "--config.dataset.image_size=16", "--config.batch_size=32", "--config.eval_batch_size=32",
        "--config.log_every_steps=4", "--config.num_devices=1"]  # 8 steps per epoch


def fast_env(workdir):
    """The CPU, XLA's cheap compilation and a compilation cache shared by the runs of one test (CI time)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(),
                JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cli(workdir, *args, config="configs/teacher.py:resnet8", timeout=300):
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", config, "--workdir", str(workdir), *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=fast_env(workdir), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.startswith("error:")]


def newest_weights(workdir):
    return jax.tree.leaves(ckpt_lib.load_variables(str(workdir)))


# --------------------------------------------------------------------------------------------------------------------
# Divergence


def test_a_diverging_run_stops_without_saving_and_a_rerun_resumes_from_the_last_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = cli(run, "--config.num_epochs=1")
    assert out.returncode == 0, out.stderr[-2000:]
    good = newest_weights(run)

    out = cli(run, "--config.num_epochs=2", "--config.learning_rate=1e6")
    assert out.returncode == train_exit_diverged(), out.stderr[-3000:]
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "non-finite values at step" in lines[0] and "(epoch 2)" in lines[0]
    assert "the newest checkpoint (step 8) is kept" in lines[0]
    assert ckpt_lib.Checkpointer(str(run)).latest_step() == 8  # nothing saved from the diverged state
    for a, b in zip(good, newest_weights(run)):
        np.testing.assert_array_equal(a, b)

    out = cli(run, "--config.num_epochs=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step 8" in out.stderr
    assert all(np.isfinite(leaf).all() for leaf in newest_weights(run))


def train_exit_diverged():
    from wcord_jax import main

    return main.DIVERGED


def _tiny_feed_and_state():
    config = configs.teacher_config("resnet8")
    config.dataset.name, config.dataset.num_train, config.dataset.image_size = "synthetic", 64, 8
    config.batch_size = config.eval_batch_size = 16
    mesh = parallel.make_mesh(2)
    ds = data.load(config.dataset, 0)
    feed = feeds.InMemoryFeed(ds, mesh, config.batch_size, config.eval_batch_size)
    model = models.get_model("resnet8", ds.num_classes, axis_name="data")
    tx = optim.make_optimizer(config, feed.steps_per_epoch)
    state = train.create_train_state(jax.random.PRNGKey(0), model, tx, ds.image_shape)
    return feed, mesh, model, tx, state


def test_skip_drops_the_update_of_a_non_finite_step_on_every_device():
    feed, mesh, model, tx, state = _tiny_feed_and_state()

    def step(st, batch):  # the real step, with a loss made NaN on the steps whose counter is odd
        new, metrics = train.train_step(st, batch, model=model, tx=tx)
        poison = jnp.where(st.step % 2 == 1, jnp.nan, 0.0)
        return new, {**metrics, "loss": metrics["loss"] + poison}

    runs = {mode: feed.make_runner(step, jnp.float32, nonfinite=mode) for mode in ("stop", "skip")}
    order = feeds.epoch_order(jax.random.PRNGKey(0), 0, 64, feed.steps_per_epoch, 16)
    placed = parallel.place(state, mesh)
    before = jax.device_get(placed)
    s1, m1 = runs["skip"](placed, feed.images, feed.labels, parallel.shard_batch(order[0:1], mesh, P(None, "data")))
    after_good = jax.device_get(s1)
    assert float(m1[step_lib.NONFINITE][0]) == 0.0 and int(after_good.step) == 1
    assert not np.array_equal(before.params["fc"]["kernel"], after_good.params["fc"]["kernel"])
    s2, m2 = runs["skip"](s1, feed.images, feed.labels, parallel.shard_batch(order[1:2], mesh, P(None, "data")))
    after_bad = jax.device_get(s2)
    assert float(m2[step_lib.NONFINITE][0]) == 1.0 and int(after_bad.step) == 2  # counted, the counter moves on
    for a, b in zip(jax.tree.leaves((after_good.params, after_good.batch_stats, after_good.opt_state)),
                    jax.tree.leaves((after_bad.params, after_bad.batch_stats, after_bad.opt_state))):
        np.testing.assert_array_equal(a, b)  # the update was dropped

    placed = parallel.place(state, mesh)  # 'stop' flags the step and keeps the step's (non-finite) result
    s1, _ = runs["stop"](placed, feed.images, feed.labels, parallel.shard_batch(order[0:1], mesh, P(None, "data")))
    _, m = runs["stop"](s1, feed.images, feed.labels, parallel.shard_batch(order[1:2], mesh, P(None, "data")))
    assert float(m[step_lib.NONFINITE][0]) == 1.0


class _NoCheckpoint:
    @staticmethod
    def latest_step():
        return 24


def _window(first, rows):
    """A logging window of one dispatch of len(rows) steps: rows of (loss, crd, nonfinite)."""
    loss, crd, bad = (np.array(c, np.float32) for c in zip(*rows))
    return [(first, {"loss": loss, "ce": np.ones_like(loss), "crd": crd, step_lib.NONFINITE: bad})]


def test_the_watch_names_the_step_the_epoch_and_the_terms():
    config = configs.teacher_config("resnet8")
    watch = loop._FiniteWatch(config, steps_per_epoch=10, ckpt=_NoCheckpoint())
    watch.check(_window(30, [(1.0, 0.5, 0.0), (1.0, 0.5, 0.0)]))
    with pytest.raises(loop.Diverged) as e:
        watch.check(_window(32, [(1.0, 0.5, 0.0), (np.nan, np.inf, 1.0)]))
    message = str(e.value)
    assert "step 34 (epoch 4) in crd, loss;" in message and "nonfinite=stop" in message
    assert "the newest checkpoint (step 24) is kept" in message and "\n" not in message

    weights_only = loop._FiniteWatch(config, 10, _NoCheckpoint())
    with pytest.raises(loop.Diverged, match="in the updated weights"):
        weights_only.check(_window(0, [(1.0, 0.5, 1.0)]))


def test_skip_counts_bad_steps_and_stops_after_the_limit_in_a_row():
    config = configs.teacher_config("resnet8")
    config.nonfinite, config.nonfinite_skip_limit = "skip", 3
    watch = loop._FiniteWatch(config, 10, _NoCheckpoint())
    watch.check(_window(0, [(np.nan, 0.5, 1.0), (np.nan, 0.5, 1.0), (1.0, 0.5, 0.0), (np.nan, 0.5, 1.0)]))
    assert (watch.skipped, watch.in_a_row) == (3, 1)
    watch.check(_window(4, [(np.nan, 0.5, 1.0)]))
    with pytest.raises(loop.Diverged, match=r"step 6 .* after 3 such steps in a row \(nonfinite_skip_limit=3\)"):
        watch.check(_window(5, [(np.nan, 0.5, 1.0)]))
    # The logged means leave the skipped steps out and report their fraction.
    host = [m for _, m in _window(0, [(np.nan, 0.5, 1.0), (2.0, 0.5, 0.0), (4.0, 0.5, 0.0), (np.inf, 0.5, 1.0)])]
    values = loop._summarise(host, skip=True)
    assert values["loss"] == 3.0 and values[step_lib.NONFINITE] == 0.5
    assert step_lib.NONFINITE not in loop._summarise(host, skip=False)


@pytest.mark.parametrize("key, value, message", [("nonfinite", "ignore", "nonfinite must be one of stop, skip"),
                                                 ("nonfinite_skip_limit", 0, "nonfinite_skip_limit must be")])
def test_bad_nonfinite_settings_are_refused_naming_the_choices(key, value, message):
    config = configs.teacher_config("resnet8")
    setattr(config, key, value)
    with pytest.raises(core.ConfigError, match=message):  # main.py turns it into one line, exit status 2
        loop.validate_config(config, 1)


# --------------------------------------------------------------------------------------------------------------------
# Preemption


def test_a_second_signal_during_the_stop_does_not_interrupt_the_save():
    stop = loop._StopRequest()
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: the run is already stopping, nothing raised
        time.sleep(0.05)
        with stop.saving():
            os.kill(os.getpid(), signal.SIGINT)  # during the save: still nothing raised
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):  # a further signal outside a save stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)


def test_sigterm_twice_mid_epoch_saves_a_finished_checkpoint_and_the_rerun_finishes_from_it(tmp_path):
    stopped = tmp_path / "stopped"  # (that a resumed run ends with an uninterrupted run's weights: test_cli.py)
    args = ["--config.num_epochs=3", "--config.log_every_steps=1"]
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/teacher.py:resnet8", "--workdir",
           str(stopped), *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fast_env(stopped), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []

    def read():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and not any("epoch 2/3 step 2/8" in l for l in lines):  # inside epoch 2
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    while time.time() < deadline and not any("stop requested" in l for l in lines):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # a tool that signals twice
    proc.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(lines)
    assert proc.returncode == 130, text[-3000:]
    stopped_at = int(text.split("stopped at step ")[1].split(";")[0])
    assert 8 < stopped_at < 16
    last = stopped / "checkpoints" / "last"
    assert ckpt_lib.Checkpointer(str(stopped)).latest_step() == stopped_at
    assert not [p.name for p in last.iterdir() if "tmp" in p.name]  # no partly written checkpoint left

    out = cli(stopped, *args)
    assert out.returncode == 0 and f"resumed from step {stopped_at}" in out.stderr, out.stderr[-2000:]
    assert ckpt_lib.Checkpointer(str(stopped)).latest_step() == 24


# --------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints


def _damage(workdir, step):
    """Truncates every data file of checkpoint `step` to half its length (a full disk, a killed copy)."""
    folder = workdir / "checkpoints" / "last" / str(step) / "state"
    files = [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 0 and not p.name.endswith(".json")]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_a_damaged_teacher_is_one_line(tmp_path):
    run = tmp_path / "run"
    out = cli(run, "--config.num_epochs=2")
    assert out.returncode == 0, out.stderr[-2000:]
    _damage(run, 16)

    out = cli(run, "--config.num_epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint at step 16 cannot be read" in out.stderr
    assert "restored the checkpoint at step 8 instead of the damaged one(s) at step 16" in out.stderr
    assert "resumed from step 8" in out.stderr
    assert ckpt_lib.Checkpointer(str(run)).latest_step() == 24

    _damage(run, 24)
    out = cli(tmp_path / "student", "--config.num_epochs=1", f"--config.teacher.checkpoint={run}",
              config="configs/distill.py:kd,resnet8,resnet8")
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert out.returncode == 2 and len(error_lines(out.stderr)) == 1, out.stderr[-3000:]
    assert f"the teacher checkpoint in {run} cannot be read" in error_lines(out.stderr)[0]
    assert "Traceback" not in out.stderr and len(lines) <= 2  # the error (and the XLA:CPU line before it at most)
