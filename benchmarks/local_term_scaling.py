"""WCoRD's local term at pod batch sizes: the time and the memory of its forward and backward pass on one device,
against the global batch (every device solves the global batch's OT problem), for each of its gradient modes.

    python benchmarks/local_term_scaling.py [--batches 64,256,1024,4096] [--modes implicit,stop_plan,unrolled]
                                            [--dim 128] [--repeat 3] [--budget_s 900]

The embeddings are D-dimensional student rows s_i and teacher rows t_i = s_i + noise (a batch whose positives are
alike, as after some training), the term at the library's defaults (epsilon 0.05, threshold 1e-3, at most 100
Sinkhorn iterations). Per case: the median wall time of the compiled value-and-gradient over --repeat calls, XLA's
temporary memory for it (`memory_analysis`), the Sinkhorn iterations taken. Cases run smallest batch first; once
--budget_s is spent the rest are skipped. Prints one JSON line per case, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from wcord_jax import host, losses

MODES = {"implicit": {"implicit_diff": "dense"}, "stop_plan": {"stop_plan_gradient": True},
         "unrolled": {"implicit_diff": False}}


def case(batch: int, mode: str, dim: int, repeat: int) -> dict:
    key = jax.random.PRNGKey(batch)
    s = jax.random.normal(key, (batch, dim))
    t = s + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (batch, dim))

    def loss(s, t):
        value, aux = losses.wcord_local_loss(s, t, **MODES[mode])
        return value, aux["n_iters"]

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(s, t).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    (value, n_iters), _ = jax.block_until_ready(compiled(s, t))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(compiled(s, t))
        times.append(time.perf_counter() - start)
    return {"batch": batch, "mode": mode, "dim": dim, "ms": round(1e3 * statistics.median(times), 2),
            "compile_s": round(compile_s, 2), "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "sinkhorn_iterations": int(n_iters), "loss": float(value), "backend": jax.default_backend(),
            "cpu_model": host.cpu_model(), "device_count": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=900.0)
    args = parser.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode {bad[0]!r}; valid: {', '.join(MODES)}")
    start, rows, skipped = time.perf_counter(), [], []
    for batch in (int(b) for b in args.batches.split(",")):
        for mode in modes:
            if time.perf_counter() - start > args.budget_s:
                skipped.append((batch, mode))
                continue
            row = case(batch, mode, args.dim, args.repeat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| global batch | gradient | ms (forward + backward) | temporary MiB | Sinkhorn iterations |")
    print("|---|---|---|---|---|")
    for r in rows:
        mib = f"{r['temp_bytes'] / 2 ** 20:,.1f}" if r["temp_bytes"] is not None else "n/a"
        print(f"| {r['batch']} | {r['mode']} | {r['ms']:,.1f} | {mib} | {r['sinkhorn_iterations']} |")
    for batch, mode in skipped:
        print(f"| {batch} | {mode} | skipped (time budget) | | |")


if __name__ == "__main__":
    main()
