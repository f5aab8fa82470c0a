"""The launch scripts: launch/tpu_vm.sh (printed and, through a stand-in gcloud, executed) and launch/colab.ipynb
(executed end to end with nbclient at a tiny size)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # the launch scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
TINY = ["--config.dataset.num_train=128", "--config.dataset.num_test=32", "--config.dataset.image_size=16",
        "--config.batch_size=32", "--config.eval_batch_size=32", "--config.num_devices=1"]

# A gcloud that must never run: --dry-run needs no gcloud.
FORBIDDEN_GCLOUD = """#!/usr/bin/env bash
touch "$(dirname "$0")/gcloud-was-called"
exit 97
"""

# A gcloud that runs an ssh --command in $HOME, as if $HOME were the (single) worker, and records every call.
LOCAL_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$HOME/gcloud.calls"
cmd=""
for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
if [ -n "$cmd" ]; then cd "$HOME" && exec bash -c "$cmd"; fi
"""


def _bin_dir(tmp_path, script):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / "gcloud").write_text(script)
    (d / "gcloud").chmod(0o755)
    return d


def tpu_vm(*args, tmp_path, gcloud=FORBIDDEN_GCLOUD, env=None, timeout=60):
    bin_dir = _bin_dir(tmp_path, gcloud)
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path), **(env or {}))
    out = subprocess.run(["bash", TPU_VM, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=timeout)
    return out, bin_dir


def _commands(stdout):
    lines = stdout.strip().splitlines()
    assert lines and all(l.startswith("+ ") for l in lines), stdout
    return [l[2:] for l in lines]


def test_all_dry_run_prints_create_install_and_run_without_calling_gcloud(tmp_path):
    out, bin_dir = tpu_vm("all", "--dry-run", "--name", "t", "--zone", "z", "--project", "p", "--workdir", "gs://b/r",
                          tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (bin_dir / "gcloud-was-called").exists()
    cmds = _commands(out.stdout)
    gcloud = [c for c in cmds if c.startswith("gcloud ")]
    create = [c for c in gcloud if c.startswith("gcloud compute tpus tpu-vm create t ")]
    assert len(create) == 1
    for flag in ("--zone=z", "--project=p", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"):
        assert flag in create[0].split(), create[0]
    ssh = [c for c in gcloud if c.startswith("gcloud compute tpus tpu-vm ssh t ")]
    assert len(ssh) == 2 and all("--worker=all" in c.split() and "--zone=z" in c and "--project=p" in c for c in ssh)
    install, run = ssh
    assert "pip install -q -e . \"jax[tpu]\"" in install, install
    # The default --repo is this checkout: it is packed and copied to every worker before the install.
    assert any(c.startswith("tar -czf ") for c in cmds)
    assert any(c.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in c.split() for c in gcloud)
    assert cmds.index(create[0]) < cmds.index(install) < cmds.index(run)
    assert "nohup " in run and " > \"$log\" 2>&1" in run, run
    assert "WCORD_DISTRIBUTED=1 nohup " in run, run  # one run across the slice's workers
    assert re.search(r"-m wcord_jax\.main --config configs/distill\.py:wcord,resnet34,resnet18 --workdir gs://b/r "
                     r"--config\.dataset\.name=imagenet2012", run), run


def test_run_passes_data_dir_teacher_and_extra_args(tmp_path):
    out, _ = tpu_vm("run", "--dry-run", "--workdir=gs://b/s", "--data-dir", "gs://b/tfds", "--teacher", "gs://b/t",
                    "--", "--config.batch_size=256", "--config.lr_decay_epochs=(30, 60, 90)", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    (run,) = _commands(out.stdout)
    for arg in ("--config.dataset.data_dir=gs://b/tfds", "--config.teacher.checkpoint=gs://b/t",
                "--config.batch_size=256", "--config.lr_decay_epochs='\\''(30, 60, 90)'\\''"):
        assert arg in run, run
    assert "warning" not in out.stderr


def test_install_from_a_git_url_clones_on_every_worker(tmp_path):
    out, _ = tpu_vm("install", "--dry-run", "--repo", "https://example.com/o/wcord_jax.git", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    (install,) = _commands(out.stdout)
    assert "--worker=all" in install.split() and "git clone https://example.com/o/wcord_jax.git wcord_jax" in install


def test_delete_dry_run(tmp_path):
    out, _ = tpu_vm("delete", "--dry-run", "--name", "t", "--zone", "z", "--project", "p", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _commands(out.stdout) == ["gcloud compute tpus tpu-vm delete t --zone=z --project=p --quiet"]


@pytest.mark.parametrize("args, message", [
    (["launch"], "unknown command 'launch'"),
    ([], "missing COMMAND"),
    (["run", "--dry-run"], "run needs --workdir"),
    (["create", "--zone"], "option --zone needs a value"),
    (["create", "--colour", "red"], "unknown option '--colour'"),
    (["create", "stray"], "unexpected argument 'stray'"),
    (["install", "--repo", "/no/such/dir"], "--repo '/no/such/dir' is neither a git URL nor a local directory"),
])
def test_bad_arguments_print_usage_and_exit_2(tmp_path, args, message):
    out, _ = tpu_vm(*args, tmp_path=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"error: {message}" in out.stderr and "usage: bash launch/tpu_vm.sh" in out.stderr, out.stderr


def test_run_starts_a_detached_run_with_a_log(tmp_path):
    """The real `run` path (no --dry-run) against a gcloud that runs the ssh command here, in a fake home."""
    home = tmp_path / "home"
    shutil.copytree(os.path.join(ROOT, "configs"), home / "wcord_jax" / "configs")
    (home / "wcord_venv" / "bin").mkdir(parents=True)
    # The worker's venv python: a script that execs this interpreter (same pid, as `run.pid` must name the run). Not a
    # symlink: a venv's python reached through a link outside its venv does not see the venv's site-packages.
    fake_python = home / "wcord_venv" / "bin" / "python"
    fake_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    fake_python.chmod(0o755)
    workdir = tmp_path / "run"
    env = {"HOME": str(home), "JAX_PLATFORMS": "cpu"}
    out, _ = tpu_vm("run", "--single-process", "--name", "t", "--zone", "z", "--config", "configs/teacher.py:resnet8",
                    "--dataset", "synthetic", "--workdir", str(workdir), "--", "--config.num_epochs=1", *TINY,
                    tmp_path=tmp_path, gcloud=LOCAL_GCLOUD, env=env)
    assert out.returncode == 0, out.stderr
    assert "started pid" in out.stdout and "on each worker's own disk" in out.stderr
    logs = home / "wcord_jax" / "logs"
    pid = int((logs / "run.pid").read_text())
    deadline = time.time() + 240
    while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(1)
    log = (logs / "latest.log").read_text()
    assert "done: eval/loss=" in log, log[-3000:]
    assert (workdir / "metrics.jsonl").exists()
    out, _ = tpu_vm("logs", "--name", "t", "--zone", "z", tmp_path=tmp_path, gcloud=LOCAL_GCLOUD, env=env)
    assert out.returncode == 0 and "done: eval/loss=" in out.stdout, out.stderr
    calls = (home / "gcloud.calls").read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm ssh t --zone=z --worker=all --command=")
    assert calls[1].startswith("compute tpus tpu-vm ssh t --zone=z --worker=0 --command=tail ")


# ---------------------------------------------------------------------------------------------------------------------
# The notebook


def test_notebook_is_valid_and_generated_by_make_colab():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "EPOCHS = 1" in tagged[0].source and "DATASET_ARGS" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "make_colab.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


TINY_PARAMETERS = """\
EPOCHS = 1
NUM_TRAIN = 128
NUM_TEST = 32
TEACHER = "resnet8x4"
STUDENT = "resnet8"
WORKDIR = "runs/colab"
DATASET_ARGS = ["--config.dataset.name=synthetic", "--config.dataset.image_size=16"]
EXTRA_ARGS = ["--config.batch_size=32", "--config.eval_batch_size=32", "--config.num_devices=1"]
"""


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = TINY_PARAMETERS
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if o.output_type == "stream")
    assert "nothing to install" in text
    finals = re.findall(r"^(teacher resnet8x4|student resnet8 \+ WCoRD|student resnet8 alone) +final test top-1: "
                        r"(\d\.\d{4})$", text, flags=re.M)
    assert [label for label, _ in finals] == ["teacher resnet8x4", "student resnet8 + WCoRD", "student resnet8 alone"]
    assert all(0.0 <= float(v) <= 1.0 for _, v in finals)
    images = [o for o in nb.cells[-1].outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1
    for run in ("teacher_resnet8x4", "wcord_resnet8x4_resnet8", "alone_resnet8"):
        assert (tmp_path / "runs" / "colab" / run / "metrics.jsonl").exists()
