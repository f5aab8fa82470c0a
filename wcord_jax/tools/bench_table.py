"""One table of distillation step speeds on an accelerator: `bash benchmarks/accelerator.sh` (or
`python -m wcord_jax.tools.bench_table`).

Times `wcord_jax.tools.bench.run_benchmark` (the real train step, random teacher weights, synthetic data of CIFAR-100's
shapes) for CRD and WCoRD on resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2, float32 and bfloat16, global batch
64, 256 and 1024, steps_per_dispatch 1 and 8, in one process, and prints one Markdown table: img/s, ms/step, compile
seconds, peak device memory and the projected wall time of the 240-epoch CIFAR-100 recipe (240 x 50,000 images at
the measured speed; compilation and evaluation not included). The rows run most important first (WCoRD
resnet32x4 -> resnet8x4 in bfloat16 at the largest batch leads) and the rest are skipped, and listed as skipped,
once `--budget_s` (default 420 s) is spent, so that the whole script ends within about 8 minutes on one GPU.
`--smallest` runs one small row per method (wrn_40_2 -> wrn_16_2, float32, batch 64, a 4,096-image data set): the
CPU check that keeps the script working. JSON records of every row go to `--out` (default bench_table.jsonl).
"""
from __future__ import annotations

import itertools
import json
import logging
import time

from absl import app, flags

from wcord_jax import main as cli
from wcord_jax.tools import bench

_BUDGET = flags.DEFINE_float("budget_s", 420.0, "Start no new row after this many seconds.")
_SMALLEST = flags.DEFINE_boolean("smallest", False, "One small float32 row per method (a CPU check).")
_OUT = flags.DEFINE_string("out", "bench_table.jsonl", "Where the rows' JSON records go.")

log = logging.getLogger("wcord_jax")
METHODS = ("wcord", "crd")
PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"))
DTYPES = ("bfloat16", "float32")
BATCHES = (1024, 256, 64)
DISPATCH = (8, 1)
RECIPE_IMAGES = 240 * 50_000  # the CIFAR-100 recipe: 240 epochs of 50,000 training images


def rows(smallest: bool = False) -> list[dict]:
    """The rows to time, most important first."""
    if smallest:
        return [{"method": m, "teacher": "wrn_40_2", "student": "wrn_16_2", "dtype": "float32", "batch_size": 64,
                 "steps_per_dispatch": 1, "small": True} for m in METHODS]
    return [{"method": m, "teacher": t, "student": s, "dtype": d, "batch_size": b, "steps_per_dispatch": k}
            for (t, s), m, d, b, k in itertools.product(PAIRS, METHODS, DTYPES, BATCHES, DISPATCH)]


SMALL_OVERRIDES = ("dataset.num_train",)


def config_of(row: dict):
    from wcord_jax import configs

    c = configs.distill_config(row["method"], row["teacher"], row["student"])
    c.dtype, c.batch_size, c.steps_per_dispatch = row["dtype"], row["batch_size"], row["steps_per_dispatch"]
    c.progress_bar = False
    if row.get("small"):  # the bench's defaults keep these (SMALL_OVERRIDES)
        c.dataset.num_train = 4096
        c.crd.nce_k = 1024
        if "wcord" in c:
            c.wcord.num_negatives = 1024
    return c


def projected_minutes(img_per_s: float) -> float:
    return RECIPE_IMAGES / img_per_s / 60.0


def table(records: list[dict], skipped: list[dict]) -> str:
    head = ("| method | teacher -> student | dtype | batch | steps/dispatch | img/s | ms/step | TFLOP/s | % of peak | "
            "compile s | peak GiB | 240-epoch CIFAR-100 |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        peak = f"{r['peak_memory_bytes'] / 2 ** 30:.2f}" if r.get("peak_memory_bytes") else "n/a"
        tflops = f"{r['tflop_per_s']:.2f}" if r.get("tflop_per_s") is not None else "n/a"
        share = (f"{100 * r['tflop_per_s'] / r['peak_tflop_per_s']:.1f}"
                 if r.get("tflop_per_s") is not None and r.get("peak_tflop_per_s") else "n/a")
        lines.append(f"| {r['method']} | {r['teacher']} -> {r['student']} | {r['dtype']} | {r['batch_size']} | "
                     f"{r['steps_per_dispatch']} | {r['img_per_s']:,.0f} | {r['ms_per_step']:.2f} | {tflops} | "
                     f"{share} | {r['compile_s']:.1f} | {peak} | {projected_minutes(r['img_per_s']):,.1f} min |")
    for r in skipped:
        lines.append(f"| {r['method']} | {r['teacher']} -> {r['student']} | {r['dtype']} | {r['batch_size']} | "
                     f"{r['steps_per_dispatch']} | skipped (time budget) | | | | | | |")
    return "\n".join(lines)


def run_table(budget_s: float, steps: int, smallest: bool, out: str) -> tuple[list, list]:
    import jax

    start, records, skipped = time.perf_counter(), [], []
    plan = rows(smallest)
    with open(out, "w", encoding="utf-8") as f:
        for i, row in enumerate(plan):
            if time.perf_counter() - start > budget_s:
                skipped = plan[i:]
                log.info("time budget of %.0f s spent: %d row(s) skipped", budget_s, len(skipped))
                break
            overridden = frozenset(SMALL_OVERRIDES if row.get("small") else ())
            record = bench.run_benchmark(config_of(row), steps=2 if smallest else steps, warmup=1 if smallest else 3,
                                         shares=False, overridden=overridden)
            record["steps_per_dispatch"] = row["steps_per_dispatch"]
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            log.info("[%d/%d] %s %s->%s %s batch %d spd %d: %.0f img/s (%.0f s so far)", i + 1, len(plan),
                     row["method"], row["teacher"], row["student"], row["dtype"], row["batch_size"],
                     row["steps_per_dispatch"], record["img_per_s"], time.perf_counter() - start)
            jax.clear_caches()
    return records, skipped


def main(argv: list[str]) -> None:
    del argv
    cli._setup_logging()  # noqa: SLF001
    import jax

    records, skipped = run_table(_BUDGET.value, bench._STEPS.value, _SMALLEST.value, _OUT.value)  # noqa: SLF001
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}"
    data = "a 4,096-image synthetic set" if _SMALLEST.value else "synthetic data of CIFAR-100's shapes"
    print(f"Distillation step speed on {device}; {data}, random teacher weights; the last column is "
          "240 x 50,000 images at that speed.\n")
    print(table(records, skipped), flush=True)


if __name__ == "__main__":
    app.run(main)
