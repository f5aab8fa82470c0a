"""Which modules pull in which: the distillers (the plugin layer) stand below the run loop, so that importing every
method loads neither the checkpointing (orbax), the input pipelines (TensorFlow) nor the optimiser and the loop;
`wcord_jax.core` imports nothing."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADED = ("import json, sys\n"
          "{stmt}\n"
          "print(json.dumps(sorted(sys.modules)))\n")
RUN_LOOP = ("wcord_jax.train", "wcord_jax.distill", "wcord_jax.feeds", "wcord_jax.checkpoint", "wcord_jax.metrics",
            "wcord_jax.main")
HEAVY = ("orbax", "tensorflow", "tensorflow_datasets", "optax", "tensorstore")


def _loaded_after(stmt):
    out = subprocess.run([sys.executable, "-c", LOADED.format(stmt=stmt)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_every_distiller_imports_without_the_run_loop_orbax_or_tensorflow():
    loaded = _loaded_after("from wcord_jax import distillers\nassert len(distillers.names()) >= 19")
    assert "wcord_jax.distillers.wcord" in loaded and "wcord_jax.distillers.fitnet" in loaded  # they were imported
    assert not [m for m in loaded if m in RUN_LOOP], sorted(m for m in loaded if m in RUN_LOOP)
    assert not [m for m in loaded if m.split(".")[0] in HEAVY], sorted({m.split(".")[0] for m in loaded} & set(HEAVY))


def test_the_core_imports_nothing():
    before = _loaded_after("pass")
    after = _loaded_after("import wcord_jax.core")
    assert after - before == {"wcord_jax", "wcord_jax.core"}
