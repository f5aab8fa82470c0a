"""The CRD step as it is against its two engine changes undone, interleaved in one process (BENCHMARKS.md, "The two
CRD engine changes, re-measured in the whole step"):

    python benchmarks/crd_engine_variants.py [STEPS]

Variants of `python -m wcord_jax.tools.bench`'s real step (resnet32x4 -> resnet8x4, batch 64, CIFAR-100's shapes):
scores by gathering the memory rows (`crd_loss(..., scores="gather")`) instead of one GEMM, the k-th smallest
sampling key by a sort instead of the radix select, and both. Prints one JSON line.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from wcord_jax import configs, losses  # noqa: E402
from wcord_jax.tools import bench
from wcord_jax.losses import crd as crd_module  # noqa: E402


def _kth_by_sort(keys, k):
    return jnp.sort(keys, axis=-1)[:, k - 1:k]


def _sampling_with_sort(*args, **kwargs):
    """`sample_contrast_idx` with `losses.crd.kth_smallest` swapped for a sort while it is traced."""
    radix = crd_module.kth_smallest
    crd_module.kth_smallest = _kth_by_sort
    try:
        return crd_module.sample_contrast_idx(*args, **kwargs)
    finally:
        crd_module.kth_smallest = radix


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    gather = functools.partial(losses.crd_loss, scores="gather")
    config = configs.distill_config("crd", "resnet32x4", "resnet8x4")
    r = bench.run_benchmark(config, steps=steps, warmup=2, shares=False, variants=[
        ("gather_scores", {"crd_loss": gather}),
        ("sort_select", {"sample_contrast_idx": _sampling_with_sort}),
        ("both_as_before", {"crd_loss": gather, "sample_contrast_idx": _sampling_with_sort})])
    print(json.dumps({"ms_per_step": r["ms_per_step"], "img_per_s": r["img_per_s"], "variants": r["variants"],
                      "device_count": r["device_count"], "process_cpu_util": r["process_cpu_util"]}))


if __name__ == "__main__":
    main()
