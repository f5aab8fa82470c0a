"""RepDistiller's baselines and DKD through the engine: 1 and 2 devices agree, the init stages train what they should
and hand over to the main stage, and every method runs from the command line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_TEACHER, small_distill_config
from test_step_records import case_config
from wcord_jax import configs, core, distill, distillers
from wcord_jax.distillers.dkd import warmup_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "dkd")
SMALL = dict(num_train=64, num_test=32, image_size=16, num_classes=4)
TEACHER = SMALL_TEACHER


@pytest.fixture(scope="module")
def teachers(small_teachers):
    return small_teachers


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cli(method, teachers, workdir, *args):
    teacher = TEACHER.get(method, "resnet8x4")
    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", f"configs/distill.py:{method},{teacher},resnet8",
           "--workdir", str(workdir), f"--config.teacher.checkpoint={teachers[teacher]}",
           "--config.dataset.name=synthetic", "--config.num_epochs=1", "--config.batch_size=16",
           "--config.eval_batch_size=16", "--config.log_every_steps=1", "--config.progress_bar=False",
           *[f"--config.dataset.{k}={v}" for k, v in SMALL.items()], *args]
    # Compiled without XLA's expensive CPU optimisations: these runs are about compiling, not speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_runs_from_the_cli_on_two_devices_like_one(teachers, shared_first_steps, tmp_path, method):
    """The CLI run on 2 devices logs, step by step, the same losses as the same steps taken by hand on 1 device; an
    init stage (AB, FT, FSP) fills epoch 1 and hands over to the main stage in epoch 2."""
    staged = bool(distillers.get(method).init_parts)
    out = _cli(method, teachers, tmp_path, "--config.num_devices=2", *(["--config.init_epochs=1"] if staged else []))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    train_events = [e for e in events if "train/loss" in e]
    assert len([e for e in events if "eval/top1" in e]) == (2 if staged else 1)
    assert all(np.isfinite(e["train/loss"]) for e in train_events)
    term = f"init_{method}" if staged else method
    if staged:  # epoch 1 is the init stage, epoch 2 the main stage
        assert all(f"train/{term}" in e for e in train_events if e["epoch"] == 1)
        main = [e for e in train_events if e["epoch"] == 2]
        assert main and all("train/ce" in e and f"train/{term}" not in e for e in main)
    else:
        assert all(f"train/{term}" in e for e in train_events)

    # The same steps taken by hand on 1 device (test_step_records checks them against the record).
    metrics, states = shared_first_steps(method, case_config(method, teachers))
    for step in (1, 2):
        logged = next(e for e in train_events if e["step"] == step)
        for key in ("loss", "top1", term):
            np.testing.assert_allclose(logged[f"train/{key}"], metrics[step - 1][key], rtol=2e-4, atol=1e-5,
                                       err_msg=f"step {step} {key}")
    if staged:
        before, after_init, after_main = states[0].params, states[2].params, states[3].params
        head = distill._classifier_name(before["student"])
        # The init stage leaves the classifier alone (FT: the whole student) and trains its own part ...
        assert _tree_equal(before["student"][head], after_init["student"][head])
        trained = {"ab": "connector", "fsp": "student", "ft": "paraphraser"}[method]
        assert not _tree_equal(before[trained], after_init[trained])
        if method == "ft":
            assert _tree_equal(before["student"], after_init["student"])
        # ... and the main stage trains the student, with the connector / paraphraser frozen.
        assert not _tree_equal(after_init["student"][head], after_main["student"][head])
        for frozen in distillers.get(method).frozen_in_main:
            if frozen in after_main:
                assert _tree_equal(after_init[frozen], after_main[frozen])
        if method == "ab":
            assert metrics[2]["loss"] == pytest.approx(metrics[2]["ce"], rel=1e-6)  # main stage: CE only


def test_fsp_needs_equal_channels(teachers, tmp_path):
    config = small_distill_config("fsp", teachers)
    config.teacher.model, config.teacher.checkpoint = "resnet8x4", teachers["resnet8x4"]
    with pytest.raises(core.ConfigError, match="fsp cannot pair resnet8x4 with resnet8"):
        distill.distill_and_evaluate(config, str(tmp_path))


@pytest.mark.slow  # two AB runs; the fast tier resumes a WCoRD run (test_distill.py)
def test_an_init_stage_run_resumes_across_the_stage_boundary(teachers, tmp_path):
    """An AB run stopped inside its init stage resumes and ends with the same weights as an uninterrupted run."""
    import shutil

    from wcord_jax import checkpoint

    config = small_distill_config("ab", teachers, checkpoint_every_steps=2, keep_checkpoints=10)
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    distill.distill_and_evaluate(config, straight)
    distill.distill_and_evaluate(config, resumed)
    last = os.path.join(resumed, "checkpoints", "last")
    for name in os.listdir(last):  # keep only step 2 of the init stage's 4 steps
        if name.isdigit() and int(name) > 2:
            shutil.rmtree(os.path.join(last, name))
    distill.distill_and_evaluate(config, resumed)
    a, b = checkpoint.load_variables(straight), checkpoint.load_variables(resumed)
    assert set(a["params"]) == {"student", "connector"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("num_epochs, lr_schedule_epochs", [(240, 240), (4, 240), (30, 240), (4, 0)])
def test_dkd_warmup_is_absolute(num_epochs, lr_schedule_epochs):
    """DKD's warm-up lasts dkd.warmup_epochs main-stage epochs whatever the run's length (mdistiller), 1-based epochs
    counted from the first main-stage step (after an init stage), constant within an epoch."""

    config = configs.distill_config("dkd", "resnet8", "resnet8")
    config.num_epochs, config.lr_schedule_epochs = num_epochs, lr_schedule_epochs
    config.dkd.warmup_epochs = 20.0
    steps_per_epoch, first_main_step = 10, 30
    # (step, expected): epoch = (step - 30) // 10 + 1, weight = min(epoch / 20, 1)
    for step, expected in ((30, 1 / 20), (39, 1 / 20), (40, 2 / 20), (75, 5 / 20), (219, 19 / 20), (220, 1.0),
                           (5000, 1.0)):
        got = warmup_weight(config, jnp.int32(step), steps_per_epoch, first_main_step)
        np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    config.dkd.warmup_epochs = 2.0
    got = warmup_weight(config, jnp.int32(30), steps_per_epoch, first_main_step)
    np.testing.assert_allclose(float(got), 0.5, rtol=1e-6)
