"""Writes launch/colab.ipynb (nbformat 4) from the cells below: `python launch/make_colab.py`.

Edit the notebook here, not by hand, so it stays valid JSON with stable cell ids; `--check` exits 1 when the committed
notebook differs from what this script writes (a test runs it).
"""
from __future__ import annotations

import argparse
import os
import sys

import nbformat
from nbformat import v4

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab.ipynb")

INTRO = """\
# Knowledge distillation with WCoRD on Fashion-MNIST (wcord_jax)

This notebook trains a small **teacher**, then a smaller **student** twice: distilled from the teacher with
**WCoRD** (Wasserstein Contrastive Representation Distillation, Chen et al., CVPR 2021) and **alone** (cross-entropy
only, method `none`), and compares their test accuracy. Every run is the library's command line,
`python -m wcord_jax.main`, so what you see here is what you would run in a terminal.

* **Runtime.** A GPU runtime (*Runtime → Change runtime type → GPU*) makes an epoch take seconds; on Colab's CPU one
  epoch of each run takes a few minutes.
* **Data.** Fashion-MNIST (`--config.dataset.name=fashion_mnist`): the idx files of Debian's `dataset-fashion-mnist`
  when they are installed, otherwise TFDS downloads it on first use.
* **Results.** Each run writes checkpoints, `metrics.jsonl` and TensorBoard files under `WORKDIR`; running a cell
  again resumes that run from its last checkpoint (raise `EPOCHS` to train on)."""

INSTALL_MD = """\
## Install

In Colab the repository is cloned and installed with `pip install -e`; set `REPO_URL` to its git URL first. Where
`wcord_jax` already imports (a local Jupyter started from the installed checkout) this cell changes nothing."""

INSTALL = '''\
REPO_URL = "https://github.com/OWNER/wcord_jax.git"  # placeholder: this repository's git URL

import importlib
import importlib.util
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules


def find_repo_dir():
    """The checkout that holds configs/ next to an importable wcord_jax (an editable install), else None."""
    spec = importlib.util.find_spec("wcord_jax")
    if spec is None or not spec.origin:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    return root if os.path.isdir(os.path.join(root, "configs")) else None


REPO_DIR = find_repo_dir()
if REPO_DIR is not None:
    print(f"wcord_jax is already installed (checkout {REPO_DIR}): nothing to install")
elif IN_COLAB:
    if "OWNER" in REPO_URL:
        raise ValueError("set REPO_URL at the top of this cell to the repository's git URL")
    REPO_DIR = os.path.abspath("wcord_jax")
    if not os.path.isdir(REPO_DIR):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, REPO_DIR], check=True)  # !git clone REPO_URL
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR], check=True)  # !pip install -e
    sys.path.insert(0, REPO_DIR)  # this kernel started before the install; the training runs are new processes
    importlib.invalidate_caches()
    print(f"installed wcord_jax from {REPO_DIR}")
else:
    raise RuntimeError("wcord_jax is not importable here: run `pip install -e .` in the repository, then restart "
                       "the kernel")'''

PARAMS_MD = """\
## Parameters

`DATASET_ARGS` and `EXTRA_ARGS` are passed to all three runs (any `--config.KEY=VALUE` of the command line, see
docs/training.md in the repository). `NUM_TRAIN` / `NUM_TEST` cap the examples taken from each split (`None`: all)."""

PARAMS = '''\
EPOCHS = 1
NUM_TRAIN = None
NUM_TEST = None
TEACHER = "resnet8x4"
STUDENT = "resnet8"
WORKDIR = "runs/colab"
DATASET_ARGS = ["--config.dataset.name=fashion_mnist"]
EXTRA_ARGS = []'''

HELPER = '''\
import shlex

TEACHER_DIR = os.path.join(WORKDIR, f"teacher_{TEACHER}")
WCORD_DIR = os.path.join(WORKDIR, f"wcord_{TEACHER}_{STUDENT}")
ALONE_DIR = os.path.join(WORKDIR, f"alone_{STUDENT}")


def train(config, workdir, *args):
    """Runs `python -m wcord_jax.main` with the notebook's parameters, streaming its log into the notebook."""
    sizes = [f"--config.dataset.{key}={value}" for key, value in (("num_train", NUM_TRAIN), ("num_test", NUM_TEST))
             if value is not None]
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", os.path.join(REPO_DIR, "configs", config),
           "--workdir", workdir, f"--config.num_epochs={EPOCHS}", *sizes, *DATASET_ARGS, *EXTRA_ARGS, *args]
    print("$ python -m wcord_jax.main " + shlex.join(cmd[3:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"the run in {workdir} failed with exit status {proc.returncode} (its log is above)")'''

TEACHER_MD = "## 1. Train the teacher"
TEACHER_RUN = 'train(f"teacher.py:{TEACHER}", TEACHER_DIR)'

WCORD_MD = """\
## 2. Distil the student with WCoRD

The teacher is restored from its checkpoint and frozen; the loss is cross-entropy + 0.8 × (WCoRD's global
contrastive term + its local optimal-transport term)."""
WCORD_RUN = 'train(f"distill.py:wcord,{TEACHER},{STUDENT}", WCORD_DIR, f"--config.teacher.checkpoint={TEACHER_DIR}")'

ALONE_MD = "## 3. The student alone (cross-entropy only, method `none`), for comparison"
ALONE_RUN = 'train(f"distill.py:none,{TEACHER},{STUDENT}", ALONE_DIR, f"--config.teacher.checkpoint={TEACHER_DIR}")'

RESULTS_MD = "## Results: final test top-1"
RESULTS = '''\
from wcord_jax.metrics import read_metrics

RUNS = {f"teacher {TEACHER}": TEACHER_DIR, f"student {STUDENT} + WCoRD": WCORD_DIR, f"student {STUDENT} alone": ALONE_DIR}
curves = {}
for label, workdir in RUNS.items():
    top1 = {r["epoch"]: r["eval/top1"] for r in read_metrics(workdir) if "eval/top1" in r}  # a resumed run's last
    curves[label] = sorted(top1.items())
    print(f"{label:<32} final test top-1: {curves[label][-1][1]:.4f}")'''

PLOT_MD = "## Test accuracy per epoch"
PLOT = '''\
try:
    import matplotlib.pyplot as plt
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
for label, points in curves.items():
    ax.plot([e for e, _ in points], [t for _, t in points], marker="o", label=label)
ax.set_xlabel("epoch")
ax.set_ylabel("test top-1")
ax.grid(alpha=0.3)
ax.legend()
plt.show()'''


def build() -> nbformat.NotebookNode:
    cells = [
        v4.new_markdown_cell(INTRO),
        v4.new_markdown_cell(INSTALL_MD),
        v4.new_code_cell(INSTALL),
        v4.new_markdown_cell(PARAMS_MD),
        v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        v4.new_code_cell(HELPER),
        v4.new_markdown_cell(TEACHER_MD),
        v4.new_code_cell(TEACHER_RUN),
        v4.new_markdown_cell(WCORD_MD),
        v4.new_code_cell(WCORD_RUN),
        v4.new_markdown_cell(ALONE_MD),
        v4.new_code_cell(ALONE_RUN),
        v4.new_markdown_cell(RESULTS_MD),
        v4.new_code_cell(RESULTS),
        v4.new_markdown_cell(PLOT_MD),
        v4.new_code_cell(PLOT),
    ]
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # stable ids (nbformat would draw random ones)
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "name": "wcord_jax: WCoRD on Fashion-MNIST"},
        "accelerator": "GPU",
    })
    nbformat.validate(nb)
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if launch/colab.ipynb is not up to date")
    args = parser.parse_args()
    text = nbformat.writes(build(), version=4)
    if not text.endswith("\n"):
        text += "\n"
    if args.check:
        with open(PATH, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{PATH} is out of date: run python launch/make_colab.py", file=sys.stderr)
                return 1
        return 0
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
