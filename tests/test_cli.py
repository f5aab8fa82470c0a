"""The command line as a user runs it: errors are one line with exit status 2; a killed run resumes. The runs of
`python -m wcord_jax.main` are `slow`; the fast tier runs the command's body in this process."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.name=synthetic", "--config.dataset.num_train=256", "--config.dataset.num_test=32",
        "--config.dataset.image_size=16", "--config.batch_size=32", "--config.eval_batch_size=32",
        "--config.log_every_steps=1", "--config.num_devices=1"]


def cli(*args, workdir, timeout=300, platforms="cpu"):
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/teacher.py:resnet8", "--workdir", str(workdir),
           *args]
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    if not platforms:  # as a user runs it: jax looks for every backend
        del env["JAX_PLATFORMS"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the command line
@pytest.mark.parametrize("args, expected", [
    (["--config.model=resnet9"], "unknown model 'resnet9'; valid: "),
    (["--config.dataset.name=mnist"], "unknown data set 'mnist'; valid: cifar100, cifar10, imagenet2012"),
    (["--config.num_epochz=2"], "unknown config key 'num_epochz': config has batch_size,"),
    (["--config.dataset.nam=x"], "unknown config key 'dataset.nam': dataset has classes, data_dir, download,"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    out = cli(*args, workdir=tmp_path / "w")
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.slow  # the command line
def test_missing_data_set_says_how_to_get_it(tmp_path):
    out = cli("--config.dataset.name=cifar100", f"--config.dataset.data_dir={tmp_path}", "--config.dataset.download=False",
              workdir=tmp_path / "w")
    assert out.returncode == 2 and "tfds build cifar100" in out.stderr and "Traceback" not in out.stderr


def _final_weights(workdir):
    from wcord_jax import checkpoint
    import jax

    return jax.tree.leaves(checkpoint.load_variables(str(workdir)))


@pytest.mark.slow  # the command line
def test_killed_run_resumes_and_ends_with_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    out = cli(*TINY, "--config.num_epochs=3", workdir=straight, platforms=None)
    assert out.returncode == 0, out.stderr[-2000:]
    # Only the library's own `HH:MM:SS message` lines: no jax INFO line about backends this machine lacks.
    assert "Unable to initialize backend" not in out.stderr
    # wcord_jax.host's choice, logged once: the tests leave XLA_FLAGS alone, so the run gets a user's default split.
    assert re.search(r"XLA:CPU: \d+ CPU devices? \(auto: \d+ usable cores?", out.stderr), out.stderr
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in out.stderr.splitlines() if line.strip()), out.stderr
    # The persistent compilation cache is on (conftest points JAX_COMPILATION_CACHE_DIR at the session's cache).
    assert f"compilation cache: {os.environ['JAX_COMPILATION_CACHE_DIR']} (JAX_COMPILATION_CACHE_DIR;" in out.stderr
    assert re.search(r"train dispatch \(1 step\): first call [\d.]+ s", out.stderr), out.stderr

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/teacher.py:resnet8", "--workdir", str(killed),
           *TINY, "--config.num_epochs=3", "--config.checkpoint_every_steps=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once it is inside epoch 2
        if metrics.exists() and any(json.loads(l).get("epoch") == 2 for l in metrics.read_text().splitlines() if l):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l]
    assert max(steps_before) < 24, "the run finished before it could be killed"

    out = cli(*TINY, "--config.num_epochs=3", "--config.checkpoint_every_steps=3", workdir=killed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step" in out.stderr
    # The resumed process does not compile the step: it comes from the cache the first runs wrote (the evaluator
    # too where its compilation took longer than the tests' threshold, 0.5 s).
    assert re.search(r"train dispatch \(1 step\): first call [\d.]+ s, its 1 program read from the persistent "
                     r"compilation cache", out.stderr), out.stderr
    assert re.search(r"evaluation: first call [\d.]+ s", out.stderr), out.stderr
    for a, b in zip(_final_weights(straight), _final_weights(killed)):
        np.testing.assert_array_equal(a, b)
    evals = [json.loads(l) for l in metrics.read_text().splitlines() if "eval/top1" in l]
    assert evals[-1]["epoch"] == 3 and evals[-1]["step"] == 24


@pytest.mark.slow  # the command line
def test_distill_config_errors_are_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for arg, expected in (("configs/distill.py:foo,resnet8,resnet8", "unknown method 'foo'; valid: none, kd, crd"),
                          ("configs/distill.py:kd,resnet8,resnet8", "--config.teacher.checkpoint=DIR is required")):
        out = subprocess.run([sys.executable, "-m", "wcord_jax.main", "--config", arg, "--workdir", str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
        assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr


def _forget_config_overrides():
    """Unparses the flags and removes the --config.KEY ones a parse registered (absl refuses to define them twice)."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)


@pytest.fixture
def in_process_cli(monkeypatch):
    """`wcord_jax.main`'s flag parsing and body, run in this process: its changes to XLA_FLAGS, the loggers and the
    parsed flags are undone afterwards."""
    import logging


    from wcord_jax import main

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    loggers = [logging.getLogger(name) for name in ("wcord_jax", "absl", "jax")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield main
    for lg, handlers, level, propagate in saved:
        lg.handlers[:], lg.propagate = handlers, propagate
        lg.setLevel(level)
    _forget_config_overrides()


def test_the_command_trains_and_reports_in_this_process(in_process_cli, tmp_path, capsys, monkeypatch):
    """The body of `python -m wcord_jax.main` on a tiny teacher run: one `done:` line with the test metrics, the
    run's files; a bad config key and a missing workdir are one `error:` line with exit status 2."""
    main, workdir = in_process_cli, tmp_path / "run"
    argv = ["main", "--config", "configs/teacher.py:resnet8", "--workdir", str(workdir), *TINY, "--config.num_epochs=1",
            "--config.progress_bar=False"]

    def run(args):
        _forget_config_overrides()
        monkeypatch.setattr(sys, "argv", args)  # where ml_collections looks for the --config.KEY overrides
        main.parse_flags(args)
        main.main([])

    run(argv)
    done = capsys.readouterr().out.strip().splitlines()
    assert len(done) == 1 and re.fullmatch(rf"done: .*eval/top1=\d\.\d{{4}}.* \(workdir {re.escape(str(workdir))}\)",
                                           done[0]), done
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert f"eval/top1={[e for e in events if 'eval/top1' in e][-1]['eval/top1']:.4f}" in done[0]
    for bad, expected in (([*argv, "--config.num_epochz=2"], "error: unknown config key 'num_epochz': config has "),
                          ([a for a in argv if a not in ("--workdir", str(workdir))], "error: --workdir is required")):
        with pytest.raises(SystemExit) as e:
            run(bad)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(expected), err
