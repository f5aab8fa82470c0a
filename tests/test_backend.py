"""The defaults that depend on the backend (wcord_jax.backend) and the run's line that shows them."""
import logging

import pytest

from conftest import shrink
from wcord_jax import backend, configs, train
from wcord_jax.core import ConfigError
from wcord_jax.losses import crd as crd_lib


def test_steps_per_dispatch_auto_is_one_on_the_cpu_and_eight_on_accelerators_for_in_memory_data():
    assert backend.steps_per_dispatch(0, "cpu", in_memory=True) == (1, "auto on cpu")
    assert backend.steps_per_dispatch(0, "gpu", in_memory=True) == (8, "auto on gpu")
    assert backend.steps_per_dispatch(0, "tpu", in_memory=True) == (8, "auto on tpu")
    assert backend.steps_per_dispatch(0, "tpu", in_memory=False) == (1, "auto: a streamed data set")
    assert backend.steps_per_dispatch(4, "cpu", in_memory=True) == (4, "steps_per_dispatch")
    assert backend.steps_per_dispatch(0, "metal", in_memory=True)[0] == 8  # another accelerator: as a GPU


def test_the_activation_dtype_auto_is_float32_on_the_cpu_and_bfloat16_on_accelerators():
    assert backend.dtype("auto", "cpu") == ("float32", "auto on cpu")
    assert backend.dtype("auto", "gpu") == ("bfloat16", "auto on gpu")
    assert backend.dtype("auto", "tpu") == ("bfloat16", "auto on tpu")
    assert backend.dtype("float32", "tpu") == ("float32", "dtype")
    assert configs.teacher_config("resnet8").dtype == "auto"


def test_the_crd_gemm_rule_takes_the_backend_s_ratio():
    """CIFAR-100 (N = 50,000, K = 16,384) scores by GEMM everywhere; ImageNet (N = 1.28 M) by the gather everywhere;
    in between (N = 40 (K+1)) the backends part."""
    for on in ("cpu", "gpu", "tpu"):
        assert crd_lib.scores_by_gemm(50_000, 16_385, on=on)
        assert not crd_lib.scores_by_gemm(1_281_167, 16_385, on=on)
    n = 30 * 16_385
    assert [crd_lib.scores_by_gemm(n, 16_385, on=on) for on in ("cpu", "gpu", "tpu")] == [False, True, True]
    assert crd_lib.scores_by_gemm(n, 16_385) is False  # traced for this machine's backend: the CPU


def test_a_run_logs_the_backend_s_choices_in_its_first_lines(tmp_path, caplog):
    config = shrink(configs.teacher_config("resnet8"), num_devices=1)
    assert config.steps_per_dispatch == 0
    with caplog.at_level(logging.INFO, logger="wcord_jax"):
        train.train_and_evaluate(config, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records]
    line = "backend cpu: steps per dispatch 1 (auto on cpu), dtype float32 (auto on cpu)"
    assert line in lines, lines[:8]
    assert lines.index(line) < 4


def test_a_contrastive_run_s_line_names_the_scoring_rule_and_the_precision():
    config = configs.distill_config("wcord", "resnet32", "resnet8")
    line = backend.describe(config, "tpu", 8, "auto on tpu")
    assert line == ("backend tpu: steps per dispatch 8 (auto on tpu), dtype bfloat16 (auto on tpu), CRD scores by GEMM "
                    "while N <= 76 (K+1), scores, critic and Sinkhorn costs at highest precision")


def test_a_negative_steps_per_dispatch_is_refused_naming_auto(tmp_path):
    config = shrink(configs.teacher_config("resnet8"), num_devices=1, steps_per_dispatch=-1)
    with pytest.raises(ConfigError, match=r"steps_per_dispatch must be 0 \(auto: the backend's default\) or positive"):
        train.train_and_evaluate(config, str(tmp_path))
