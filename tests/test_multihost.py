"""A run over 2 processes (2 CPU devices each) takes the same distillation steps as 1 process with 4 devices.

Every run goes through the command line: a tiny teacher, then `crdkd` (CRD's memory bank) and `wcordkd` (WCoRD's
negative queue, sharded over the devices, so split across the processes) once in one process and once in two,
connected by `WCORD_COORDINATOR` on 127.0.0.1. The losses of every step, the evaluations and the whole final
checkpoint (parameters, optimizer state, memory, queue) must agree.

Speed (2 CPU cores): XLA's backend optimisation is turned off and the runs share a persistent compilation cache;
the one-process runs and the two-process runs go side by side.
"""
import json
import signal
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from wcord_jax import checkpoint, parallel

pytestmark = pytest.mark.slow  # several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.name=synthetic", "--config.dataset.num_train=64", "--config.dataset.num_test=16",
        "--config.dataset.image_size=16", "--config.batch_size=16", "--config.eval_batch_size=16",
        "--config.num_epochs=1", "--config.log_every_steps=1", "--config.progress_bar=False"]
# Memories and queues that fit the tiny set; a run's config holds only its method's sections (WCoRD's includes crd).
DISTILL = {"crdkd": TINY + ["--config.crd.nce_k=32"],
           "wcordkd": TINY + ["--config.crd.nce_k=32", "--config.wcord.num_negatives=64"]}
METHODS = ("crdkd", "wcordkd")
TIMEOUT = 240
RTOL, ATOL = 2e-4, 1e-6


def _env(devices: int, cache: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WCORD_")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    env.update(extra)
    return env


def _start(config: str, workdir, env: dict, *args) -> tuple:
    """Starts one process of the command line; its output goes to files beside the workdir."""
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", config, "--workdir", str(workdir), *args]
    log = f"{workdir}.{env.get('WCORD_PROCESS_ID', 0)}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, log


def _finish(procs: list) -> list:
    """Waits for a group of processes (killing them all if one fails or hangs) and returns their output."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                time.sleep(5)  # a failed process: give the others a moment to fail too, then stop them
                break
            time.sleep(0.2)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outs = []
    for p, log in procs:
        with open(log) as f:
            outs.append(f.read())
    for (p, log), out in zip(procs, outs):
        assert p.returncode == 0 and "done:" in out, f"{log} (exit {p.returncode}):\n{out[-3000:]}"
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher_and_students(tmp_path, cache: str, teacher_dir) -> None:
    args = {m: [f"--config.teacher.checkpoint={teacher_dir}", *DISTILL[m]] for m in METHODS}
    failures = []

    def one_process():
        try:
            for method in METHODS:
                _finish([_start(f"configs/distill.py:{method},resnet8,resnet8", tmp_path / f"{method}_1proc",
                                _env(4, cache), *args[method])])
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    thread = threading.Thread(target=one_process)
    thread.start()
    try:
        for method in METHODS:
            port = _free_port()
            procs = [_start(f"configs/distill.py:{method},resnet8,resnet8", tmp_path / f"{method}_2proc",
                            _env(2, cache, WCORD_COORDINATOR=f"127.0.0.1:{port}", WCORD_NUM_PROCESSES="2",
                                 WCORD_PROCESS_ID=str(i)), *args[method])
                     for i in range(2)]
            outs = _finish(procs)
            assert "4 devices" in outs[0], outs[0][-2000:]
            assert "epoch 1/1" not in outs[1]  # only process 0 logs the run
    finally:
        thread.join()
    if failures:
        raise failures[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multihost")
    cache = str(tmp_path / "jax_cache")
    teacher_dir = tmp_path / "teacher"
    _finish([_start("configs/teacher.py:resnet8", teacher_dir, _env(1, cache), *TINY, "--config.num_devices=1")])
    _teacher_and_students(tmp_path, cache, teacher_dir)
    return tmp_path


def _records(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_take_the_same_steps_as_one(runs, method):
    one, two = _records(runs / f"{method}_1proc"), _records(runs / f"{method}_2proc")
    assert [r["step"] for r in one] == [r["step"] for r in two]  # written once, by process 0
    train_steps = [r["step"] for r in one if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in a:
            if key in ("step", "epoch") or key.endswith("img_per_s"):
                continue
            np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=ATOL, err_msg=f"{key} at step {a['step']}")
    terms = {"crdkd": ("train/crd", "train/kd"), "wcordkd": ("train/wcord_global", "train/wcord_local", "train/kd")}
    assert all(t in one[-2] for t in terms[method])


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_write_the_same_checkpoint(runs, method):
    one = checkpoint.load_state(runs / f"{method}_1proc")
    two = checkpoint.load_state(runs / f"{method}_2proc")
    assert jax.tree.structure(one) == jax.tree.structure(two)
    memory = one["method"]["own"]
    assert memory, "the method state (CRD memory / WCoRD queue) is in the checkpoint"
    for path, a in jax.tree_util.tree_leaves_with_path(one):
        b = two
        for key in path:
            b = b[key.key if hasattr(key, "key") else key.idx]
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WCORD_DISTRIBUTED": "0"}, None),
    ({"WCORD_DISTRIBUTED": "1"}, {}),
    ({"WCORD_DISTRIBUTED": "auto"}, {}),
    ({"WCORD_COORDINATOR": "10.0.0.1:1234", "WCORD_NUM_PROCESSES": "4", "WCORD_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
])
def test_distributed_settings_from_the_environment(env, expected):
    assert parallel.distributed_settings(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"WCORD_DISTRIBUTED": "maybe"}, "WCORD_DISTRIBUTED='maybe'"),
    ({"WCORD_COORDINATOR": "10.0.0.1:1234"}, "needs WCORD_NUM_PROCESSES and WCORD_PROCESS_ID"),
    ({"WCORD_COORDINATOR": "10.0.0.1", "WCORD_NUM_PROCESSES": "2", "WCORD_PROCESS_ID": "0"}, "HOST:PORT"),
    ({"WCORD_COORDINATOR": "h:1", "WCORD_NUM_PROCESSES": "2", "WCORD_PROCESS_ID": "2"}, "must be in 0..1"),
    ({"WCORD_COORDINATOR": "h:1", "WCORD_NUM_PROCESSES": "two", "WCORD_PROCESS_ID": "0"}, "is not an integer"),
    ({"WCORD_PROCESS_ID": "1"}, "need WCORD_COORDINATOR"),
])
def test_bad_distributed_settings_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        parallel.distributed_settings(env)


def test_sigterm_to_every_process_saves_one_checkpoint_at_one_step_and_the_rerun_resumes(tmp_path):
    """A preemption of a 2-process run: every process gets SIGTERM; they stop after the same dispatch, write one
    finished checkpoint together and exit with status 130; the rerun of both resumes from that step and finishes."""
    cache, workdir = str(tmp_path / "jax_cache"), tmp_path / "teacher"
    args = [*TINY, "--config.num_epochs=8"]  # 4 steps per epoch

    def start_both():
        port = _free_port()
        return [_start("configs/teacher.py:resnet8", workdir, _env(2, cache, WCORD_COORDINATOR=f"127.0.0.1:{port}",
                                                                   WCORD_NUM_PROCESSES="2", WCORD_PROCESS_ID=str(i)),
                       *args) for i in range(2)]

    procs = start_both()
    deadline = time.monotonic() + TIMEOUT
    log0 = procs[0][1]
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p, _ in procs), open(log0).read()[-3000:]
        if "epoch 2/8 step 1/4" in open(log0).read():
            break
        time.sleep(0.05)
    for p, _ in procs:
        p.send_signal(signal.SIGTERM)
    try:
        for p, _ in procs:
            p.wait(timeout=120)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    outs = [open(log).read() for _, log in procs]
    assert [p.returncode for p, _ in procs] == [130, 130], "\n".join(o[-2000:] for o in outs)
    stopped = {int(o.split("stopped at step ")[1].split(";")[0]) for o in outs}
    assert len(stopped) == 1, outs
    step = stopped.pop()
    assert 4 < step < 32
    last = workdir / "checkpoints" / "last"
    assert checkpoint.Checkpointer(str(workdir)).latest_step() == step
    assert not [p.name for p in last.iterdir() if "tmp" in p.name]

    outs = _finish(start_both())
    assert f"resumed from step {step}" in outs[0]
