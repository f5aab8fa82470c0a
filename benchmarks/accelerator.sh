#!/usr/bin/env bash
# One table of CRD and WCoRD step speeds on this machine's accelerator (GPU or TPU), in under 8 minutes:
#   bash benchmarks/accelerator.sh                # the full grid, most important rows first, within --budget_s
#   bash benchmarks/accelerator.sh --smallest     # one small row per method (runs on a CPU too)
# Needs what `pip install --no-deps -e .` and the wheels listed in docs/benchmark.md provide; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "ott", "ml_collections", "orbax.checkpoint", "absl")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"error: missing Python packages {', '.join(missing)}: see docs/benchmark.md (on an accelerator)")
PY
exec python -m wcord_jax.tools.bench_table "$@"
