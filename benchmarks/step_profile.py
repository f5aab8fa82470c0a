"""Where the real distillation step spends its time on XLA:CPU: XLA's own per-op profile, grouped by what each op does.

    python benchmarks/step_profile.py [--steps 4] [--config configs/distill.py:crd,resnet32x4,resnet8x4] [BENCH FLAGS]

Runs `python -m wcord_jax.tools.bench` (one round, no shares) with the jax profiler on for its timed steps and the
optimised HLO dumped, then adds up the duration of every top-level op of the compiled step, per device and step,
into groups read from each op's `op_name` (the JAX call path XLA keeps in its metadata):

* `teacher forward`: ops under a module path without `jvp(` (the frozen teacher; no gradient is taken);
* `student forward` / `student backward`: ops under `jvp(Module)` / `transpose(jvp(Module))`, the student and the
  embedding heads; their convolutions are split out;
* `weight gradients`: convolutions XLA left without an `op_name` whose output has a kernel's shape
  (a k x k window, k <= 7; the activations' convolutions keep their `op_name`), and the layout copies that feed
  them (unnamed `transpose` fusions);
* `cross-device sums`: all-reduces (synchronised batch-norm statistics, gradients, the heads' sums), with the time
  a device waits there for the other;
* `the loss, the negatives and other ops`: the rest (the contrastive loss and its memories, sampling the
  negatives, the optimiser, augmentation).

The grouping relies on XLA:CPU's names in today's jaxlib (0.10); ops it cannot place are counted under `other`.
Kernels that leave no trace event (XLA's Eigen convolutions, when YNNPACK's are switched off) show only in the
last row: the step's wall time less the traced ops.
Prints the bench's JSON line and then one markdown table; progress goes to stderr.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import io
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("teacher forward: convolutions", "teacher forward: other ops", "student forward: convolutions",
          "student forward: other ops", "student backward: input-gradient convolutions",
          "student backward: weight gradients", "student backward: other ops", "cross-device sums (incl. waiting)",
          "the loss, the negatives and other ops")
COLLECTIVES = ("all-reduce", "psum", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def parse_hlo(text: str) -> dict:
    """{instruction name: (output shape, op_name, calls a computation with a convolution)} of an HLO text dump."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n((?:  [^\n]*\n)*?)\}", text, re.M)}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^  (?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]+)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        conv = bool(calls) and "convolution(" in bodies.get(calls.group(1), "") or " convolution(" in line
        out[m.group(1)] = (m.group(2), op.group(1) if op else "", conv)
    return out


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def group_of(name: str, shape: str, op_name: str, conv: bool) -> str:
    if name.startswith(COLLECTIVES):
        return "cross-device sums (incl. waiting)"
    path = op_name.split("/")
    top = next((p for p in path[1:] if p not in ("shard_map", "map")), "")
    if not op_name:
        dims = _dims(shape)
        if conv and len(dims) == 4 and dims[1] == dims[2] <= 7:
            return "student backward: weight gradients"
        if name.startswith("transpose"):
            return "student backward: weight gradients"
        return "the loss, the negatives and other ops"
    module = re.fullmatch(r"(transpose\()?jvp\(([A-Z]\w*)\)\)?", top)
    if module:
        side = "student backward" if module.group(1) else "student forward"
        if side == "student backward" and conv:
            return "student backward: input-gradient convolutions"
        return f"{side}: {'convolutions' if conv else 'other ops'}"
    if re.fullmatch(r"[A-Z]\w*", top):
        return f"teacher forward: {'convolutions' if conv else 'other ops'}"
    return "the loss, the negatives and other ops"


def top_level(events: list) -> list:
    """The events not nested inside another event of the same thread."""
    out, end = [], collections.defaultdict(float)
    for e in sorted(events, key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"])):
        key = (e["pid"], e["tid"])
        if e["ts"] >= end[key]:
            out.append(e)
            end[key] = e["ts"] + e["dur"]
    return out


def profile_table(trace_path: str, hlo: dict, steps: int, devices: int, wall_ms: float) -> str:
    with gzip.open(trace_path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    ops = [e for e in events if e["name"] in hlo or e["name"].startswith(COLLECTIVES)]
    totals = collections.Counter()
    for e in top_level(ops):
        shape, op_name, conv = hlo.get(e["name"], ("", "", False))
        totals[group_of(e["name"], shape, op_name, conv)] += e["dur"] / 1000 / (steps * devices)
    whole = sum(totals.values())
    lines = [f"ms per step and device (sum of the top-level op times over {devices} device(s), {steps} steps)", "",
             "| group | ms | share |", "|---|---|---|"]
    lines += [f"| {g} | {totals[g]:.1f} | {100 * totals[g] / whole:.0f}% |" for g in GROUPS if totals[g] > 0]
    lines.append(f"| all traced ops | {whole:.1f} | 100% |")
    lines.append(f"| the step's wall time (the bench's ms/step) | {wall_ms:.1f} | |")
    lines.append(f"| per device, not in a traced op (idle, or a kernel without a trace event) | "
                 f"{max(0.0, wall_ms - whole):.1f} | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    steps = 4
    if "--steps" in argv:
        steps = int(argv[argv.index("--steps") + 1])
    rest = [a for i, a in enumerate(argv) if a != "--steps" and (i == 0 or argv[i - 1] != "--steps")]
    if not any(a.startswith("--config") for a in rest):
        rest = ["--config", "configs/distill.py:crd,resnet32x4,resnet8x4"] + rest
    tmp = tempfile.mkdtemp(prefix="step_profile_")
    dump, trace_dir = os.path.join(tmp, "hlo"), os.path.join(tmp, "trace")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*per_device.*").strip()
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import jax
    from wcord_jax.tools import bench

    run, calls = bench._Variant.run, [0]  # noqa: SLF001

    def traced_run(self, pool, n, offset=0):
        calls[0] += 1
        if calls[0] == 2:  # 1: the warm-up, 2: the timed round
            with jax.profiler.trace(trace_dir):
                return run(self, pool, n, offset)
        return run(self, pool, n, offset)

    bench._Variant.run = traced_run  # noqa: SLF001
    sys.argv = ["bench", *rest, "--steps", str(steps), "--warmup", "1", "--rounds", "1", "--noshares"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            bench.run()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    print(out.getvalue(), end="", flush=True)
    record = json.loads(out.getvalue().strip().splitlines()[-1])
    dumps = sorted(glob.glob(os.path.join(dump, "*per_device*after_optimizations.txt")), key=os.path.getsize)
    traces = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not dumps or not traces:
        print(f"error: no optimised HLO or no trace was written under {tmp}", file=sys.stderr)
        return 1
    print(f"the HLO dump and the trace are in {tmp}", file=sys.stderr)
    with open(dumps[-1], encoding="utf-8") as f:
        hlo = parse_hlo(f.read())
    devices = len(jax.devices())
    print(profile_table(traces[0], hlo, steps, devices, record["ms_per_step"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
