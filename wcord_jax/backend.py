"""Defaults that depend on the backend a run computes on (cpu, gpu, tpu), each with its reason, and the line that
shows them in a run's first log lines (`describe`).

* Steps per dispatch (`steps_per_dispatch`, 0 = auto). CPU: 1. Convolution gradients inside an XLA:CPU while loop
  take a slow path: resnet8 at batch 64 took 65-70 ms a step without a loop and 2.1-2.4 s inside a `lax.scan` of
  length 1 (BENCHMARKS.md, "One train step on XLA:CPU"). GPU and TPU, for an in-memory data set: 8. A CIFAR-size
  step of a small network is a few hundred microseconds of device work there, the order of what launching one
  dispatch costs the host; a `lax.scan` of 8 steps pays it once for 8 (log lines and checkpoints then fall on
  dispatch boundaries). Streamed data sets: 1 (the stream feeds one host batch per dispatch).
* CRD's scores by one GEMM against the whole memory, or by gathering the K+1 rows of each anchor
  (`losses.crd.scores_by_gemm`): the GEMM while N <= ratio (K+1). CPU: 24, measured (losses/crd.py). GPU: 40, TPU:
  76, from the roofline of float32 products (the scores run at HIGHEST precision) against memory bandwidth: a
  forward and backward GEMM does 4 B D N flops where the gather moves about 8 B (K+1) D bytes, so the crossover is
  N / (K+1) = 2 F / W: H100 67 TFLOP/s f32, 3.35 TB/s; TPU v4 about 46 TFLOP/s at HIGHEST (six bf16 passes of
  275), 1.2 TB/s. The accelerator benchmark (benchmarks/accelerator.sh) measures it on the chip at hand.
* The precision of the contrastive scores, WCoRD's critic and the Sinkhorn costs: HIGHEST on every backend
  (`losses/_precision.py`).
* The activation dtype (`dtype`, default auto): float32 on the CPU (every CPU figure is float32, and bfloat16 was not
  faster there: 300-340 img/s either way in the study's runs); bfloat16 on a GPU or TPU (parameters, BatchNorm
  statistics and the loss inputs stay float32), after the 3-seed check on the main study's protocol (BENCHMARKS.md,
  "bfloat16 against float32"): no method ends more than 0.39 points below its float32 mean, and none has a
  non-finite step or a collapsed head. Tensor cores and the TPU's MXU run bfloat16 at twice the rate of TF32.
"""
from __future__ import annotations

from typing import Optional

AUTO = 0
STEPS_PER_DISPATCH = {"cpu": 1, "gpu": 8, "tpu": 8}
DTYPE = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}
DTYPES = ("auto", "float32", "bfloat16")
CRD_GEMM_MAX_RATIO = {"cpu": 24, "gpu": 40, "tpu": 76}
_OTHER = "gpu"  # a backend not listed (a plugin's) takes the accelerator defaults


def current() -> str:
    import jax

    return jax.default_backend()


def _known(backend: str) -> str:
    return backend if backend in STEPS_PER_DISPATCH else _OTHER


def steps_per_dispatch(setting: int, backend: str, in_memory: bool) -> tuple[int, str]:
    """(steps per dispatch, why) for the config value `setting` (0: auto)."""
    if setting != AUTO:
        return int(setting), "steps_per_dispatch"
    if not in_memory:
        return 1, "auto: a streamed data set"
    n = STEPS_PER_DISPATCH[_known(backend)]
    return n, f"auto on {backend}"


def dtype(setting: str, backend: str) -> tuple[str, str]:
    """(activation dtype name, why) for the config value `setting` ('auto', 'float32' or 'bfloat16')."""
    if setting != "auto":
        return setting, "dtype"
    return DTYPE[_known(backend)], f"auto on {backend}"


def crd_gemm_max_ratio(backend: Optional[str] = None) -> int:
    return CRD_GEMM_MAX_RATIO[_known(backend or current())]


def describe(config, backend: str, spd: int, spd_why: str) -> str:
    """The run's line of backend choices."""
    from wcord_jax.losses import _precision

    name, why = dtype(config.dtype, backend)
    parts = [f"steps per dispatch {spd} ({spd_why})", f"dtype {name} ({why})"]
    if "crd" in config:  # CRD's memory bank (CRD, CRD+KD, WCoRD, CC)
        parts.append(f"CRD scores by GEMM while N <= {crd_gemm_max_ratio(backend)} (K+1)")
    if "crd" in config or "wcord" in config:
        parts.append(f"scores, critic and Sinkhorn costs at {_precision.SCORES_NAME} precision")
    return f"backend {backend}: " + ", ".join(parts)
