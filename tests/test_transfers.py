"""Between its logging points a training run only feeds the devices: nothing is read back to the host and nothing is
transferred implicitly, whatever the method keeps in its state (WCoRD: queues, momentum key heads, Sinkhorn), on
several devices, several steps per dispatch.

The loop feeds its dispatches inside `loop._dispatch_guard()`; the tests replace it by JAX's
`transfer_guard("disallow")` (which catches implicit host-to-device transfers on every backend, and device-to-host
ones on accelerators) plus a watch on `jax.Array`'s host copy (`_value`, behind `jax.device_get`, `float`, `int`,
`bool`, `.item()` and `.tolist()`), which sees those reads on the CPU too, where JAX's guard lets device-to-host
copies pass (a CPU array's buffer is already in host memory). `np.asarray` of a CPU array reads its buffer directly
and escapes the watch: the library reads values back with `jax.device_get` only, and on a GPU or TPU JAX's guard
catches every read (`benchmarks/accelerator.sh` runs these tests there)."""
import contextlib
import sys

import numpy as np
import pytest
from jax._src import array as array_lib

import jax
from conftest import shrink, small_distill_config
from wcord_jax import configs, distill, loop, metrics, parallel, train


def _lowering() -> bool:
    """Whether JAX is lowering a program (it copies the arrays a step closes over into the program as constants,
    once, at compilation: not a read at run time)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_array_mlir_constant_handler":
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def strict_guard(monkeypatch):
    """Replaces the loop's guard by the strict one; returns the list of reads made inside it."""
    reads, inside = [], [False]
    host_copy = array_lib.ArrayImpl._value

    def value(self):
        if inside[0] and not _lowering():
            reads.append((self.shape, str(self.dtype)))
        return host_copy.fget(self)

    @contextlib.contextmanager
    def guard():
        with jax.transfer_guard("disallow"):
            inside[0] = True
            try:
                yield
            finally:
                inside[0] = False

    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(value))
    monkeypatch.setattr(loop, "_dispatch_guard", guard)
    return reads


def test_a_distillation_reads_nothing_back_between_its_logging_points(small_teachers, tmp_path, strict_guard):
    config = small_distill_config("wcord", small_teachers, num_devices=2, log_every_steps=0, steps_per_dispatch=2)
    config.num_epochs = 2  # the second epoch's dispatches come after an evaluation and a checkpoint
    result = distill.distill_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["eval/loss"])
    assert strict_guard == []
    logged = [e for e in metrics.read_metrics(str(tmp_path)) if "train/loss" in e]
    assert [e["step"] for e in logged] == [4, 8]  # 4 steps an epoch, one log line at each epoch's end


def test_the_guard_catches_a_value_read_back_between_the_logging_points(tmp_path, strict_guard, monkeypatch):
    """The control: a loop that reads each dispatch's loss as it goes is caught."""
    add = parallel.DispatchWindow.add
    monkeypatch.setattr(parallel.DispatchWindow, "add",
                        lambda self, outputs: (add(self, outputs), jax.device_get(outputs["loss"])))
    config = shrink(configs.teacher_config("resnet8"), num_devices=1, log_every_steps=0)
    train.train_and_evaluate(config, str(tmp_path))
    assert len(strict_guard) == 4 and strict_guard[0] == ((1,), "float32"), strict_guard  # one per step
