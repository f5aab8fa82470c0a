"""The CPU device split, idle and beside other CPU-bound work: img/s of one device against several, and of how far
the host may run ahead of the devices (`parallel.MAX_DISPATCHES_AHEAD`).

    python benchmarks/busy_cpu.py [--reps 3] [--load 2] [--out benchmarks/busy_cpu.json]

Two workloads, each run as its own process (the device split is fixed when JAX starts):

* `teacher`: the README demo's first run, a resnet14 teacher on Fashion-MNIST (batch 64), cut to its first
  `--teacher-steps` steps (`dataset.num_train`); img/s is the median of its logged windows after the first (which
  holds the compilation);
* `crd`: `python -m wcord_jax.tools.bench --config configs/distill.py:crd,resnet32x4,resnet8x4` (CRD's whole step, K = 16,384,
  CIFAR-100's shapes, random weights), `--steps` timed steps.

Variants: `1 device` (`cpu_devices=1`); `D devices, ahead A` (`cpu_devices=D`, at most A dispatches queued ahead of
the devices). Conditions: idle, and with `--load` competing CPU-bound processes (`python -c 'while True: pass'`,
started before and killed after each block of runs). The runs are interleaved: every repetition runs every variant
of a workload once idle and once loaded, so a change in the machine hits them alike. Prints a table per workload
(median, min and max img/s over the repetitions) and writes every run to `--out` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BURNER = "while True: pass"


def _teacher_run(devices: int, ahead: int, steps: int) -> float:
    """One teacher run in this process: img/s (the median of the logged windows after the first)."""
    sys.path.insert(0, ROOT)
    from wcord_jax import configs, host, parallel

    config = configs.teacher_config("resnet14")
    config.dataset.name = "fashion_mnist"
    config.dataset.num_train = steps * config.batch_size
    config.dataset.num_test = 256
    config.num_epochs, config.log_every_steps, config.progress_bar = 1, 25, False
    config.cpu_devices = devices
    host.configure(config)
    parallel.MAX_DISPATCHES_AHEAD = ahead
    from wcord_jax import train

    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rates = [e["train/img_per_s"] for e in map(json.loads, f) if "train/img_per_s" in e]
    return statistics.median(rates[1:])


def _run(workload: str, devices: int, ahead: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    start = time.time()
    if workload == "teacher":
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(devices), str(ahead), str(args.teacher_steps)]
    else:
        cmd = [sys.executable, "-m", "wcord_jax.tools.bench", "--config", "configs/distill.py:crd,resnet32x4,resnet8x4",
               "--steps", str(args.steps), "--no-shares", f"--config.cpu_devices={devices}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"rc": out.returncode, "error": out.stderr[-800:], "seconds": round(time.time() - start, 1)}
    rate = json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"]  # both print one JSON line last
    return {"rc": 0, "img_per_s": round(float(rate), 1), "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--load", type=int, default=2, help="competing CPU-bound processes in the loaded condition")
    parser.add_argument("--workloads", default="teacher,crd")
    parser.add_argument("--teacher-steps", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the crd bench")
    parser.add_argument("--devices", type=int, default=2, help="the device count of the multi-device variants")
    parser.add_argument("--aheads", default="1,4,16", help="dispatch windows tried with several devices (teacher)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "busy_cpu.json"))
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)  # internal: one teacher run
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"img_per_s": _teacher_run(*args.one)}))
        return

    sys.path.insert(0, ROOT)
    from wcord_jax import host

    variants = {"teacher": [(1, 4)] + [(args.devices, int(a)) for a in args.aheads.split(",")],
                "crd": [(1, 4), (args.devices, 4)]}
    runs = []
    for rep in range(args.reps):
        for load in (0, args.load):
            burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(load)]
            try:
                for workload in args.workloads.split(","):
                    for devices, ahead in variants[workload]:
                        r = {"workload": workload, "devices": devices, "ahead": ahead, "load": load, "rep": rep,
                             **_run(workload, devices, ahead, args)}
                        runs.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            with open(args.out, "w") as f:
                json.dump({"cpu_model": host.cpu_model(), "cores": host.usable_cores(), "runs": runs}, f, indent=1)

    print(f"machine: {host.cpu_model()}, {host.usable_cores()} cores; {args.reps} repetitions, interleaved")
    for workload in args.workloads.split(","):
        print(f"\n{workload}: img/s, median (min-max)\n\n| variant | idle | {args.load} CPU-bound processes beside |")
        print("|---|---|---|")
        for devices, ahead in variants[workload]:
            name = "1 device" if devices == 1 else f"{devices} devices, ahead {ahead}"
            cells = []
            for load in (0, args.load):
                got = [r for r in runs if (r["workload"], r["devices"], r["ahead"], r["load"]) ==
                       (workload, devices, ahead, load)]
                rates = [r["img_per_s"] for r in got if r["rc"] == 0]
                failed = len(got) - len(rates)
                cell = (f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})" if rates else "-")
                cells.append(cell + (f", {failed} of {len(got)} failed" if failed else ""))
            print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
