"""One table of finished (or running) runs: `python -m wcord_jax.tools.summary WORKDIR [WORKDIR ...]`.

For each workdir: what was trained (teacher run, or method / teacher -> student), the epochs done, the final and best
test top-1, and for distillation runs the teacher's own test top-1 as logged before training.
"""
from __future__ import annotations

import sys

from wcord_jax import rundir


def summarise(workdir: str) -> dict:
    """The row of one workdir, local or on object storage (raises FileNotFoundError when it holds no run)."""
    try:
        config = rundir.read_config(workdir)
    except rundir.RunDirError as e:
        raise FileNotFoundError(str(e)) from e
    events = rundir.read_events(workdir)
    evals = {}
    teacher_top1 = None
    for e in events:
        if "eval/top1" in e:
            evals[int(e["epoch"])] = float(e["eval/top1"])
        if "teacher/top1" in e:
            teacher_top1 = float(e["teacher/top1"])
    curve = [evals[k] for k in sorted(evals)]
    distill = config.get("task") == "distill"
    return {
        "workdir": workdir,
        "run": (f"{config['method']}: {config['teacher']['model']} -> {config['model']}" if distill
                else f"teacher: {config['model']}"),
        "dataset": config["dataset"]["name"],
        "epochs": len(curve),
        "final_top1": curve[-1] if curve else None,
        "best_top1": max(curve) if curve else None,
        "teacher_top1": teacher_top1,
    }


def format_table(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    header = ("run", "data", "epochs", "final top-1 %", "best top-1 %", "teacher top-1 %", "workdir")
    body = [(r["run"], r["dataset"], str(r["epochs"]), pct(r["final_top1"]), pct(r["best_top1"]),
             pct(r["teacher_top1"]), r["workdir"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m wcord_jax.tools.summary WORKDIR [WORKDIR ...]", file=sys.stderr)
        return 2 if not argv else 0
    rows = []
    for workdir in argv:
        try:
            rows.append(summarise(workdir))
        except FileNotFoundError:
            print(f"error: {workdir} holds no run (no config.json / metrics.jsonl)", file=sys.stderr)
            return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
