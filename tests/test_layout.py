"""Which modules pull in which: the distillers (the plugin layer) stand below the run loop, so that importing every
method loads neither the checkpointing (orbax), the input pipelines (TensorFlow) nor the optimiser and the loop;
`wcord_jax.core` imports nothing; no module of the library proper imports a tool, and data flows one way (the step
knows no feed, the feeds no loop, the loop no trainer)."""
import ast
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADED = ("import json, sys\n"
          "{stmt}\n"
          "print(json.dumps(sorted(sys.modules)))\n")
RUN_LOOP = ("wcord_jax.train", "wcord_jax.distill", "wcord_jax.loop", "wcord_jax.step", "wcord_jax.feeds",
            "wcord_jax.checkpoint", "wcord_jax.metrics", "wcord_jax.main")
TOOLS = ("wcord_jax.tools",)  # bench, bench_table, pictures, summary, probe, import_teacher, study, beyond
# module -> modules of the library it must not import, at any level of the file: what comes after it in the flow
# main -> trainer / engine -> loop -> feeds -> step
BELOW = {"wcord_jax.step": ("wcord_jax.feeds", "wcord_jax.loop", "wcord_jax.train", "wcord_jax.distill"),
         "wcord_jax.feeds": ("wcord_jax.loop", "wcord_jax.train", "wcord_jax.distill"),
         "wcord_jax.loop": ("wcord_jax.train", "wcord_jax.distill"),
         "wcord_jax.train": ("wcord_jax.distill",)}
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


def _imports(path: str) -> set:
    """The wcord_jax modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("wcord_jax")}


def _module(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _is(module: str, names) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def test_no_module_of_the_library_imports_a_tool_and_the_flow_goes_one_way():
    files = glob.glob(os.path.join(ROOT, "wcord_jax", "**", "*.py"), recursive=True)
    assert len(files) > 50
    wrong = []
    for path in files:
        module = _module(path)
        if _is(module, TOOLS) or module == "wcord_jax.main":  # the command line dispatches to the probe task
            continue
        imported = _imports(path)
        wrong += [f"{module} imports the tool {m}" for m in imported if _is(m, TOOLS)]
        wrong += [f"{module} imports {m}, which comes after it" for m in imported if _is(m, BELOW.get(module, ()))]
    assert not wrong, wrong


def test_the_layout_check_sees_a_tool_import(tmp_path):
    """The check above reads imports inside functions too."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from wcord_jax.tools import pictures\n    import wcord_jax.loop\n")
    imported = _imports(str(path))
    assert {"wcord_jax.tools.pictures", "wcord_jax.loop"} <= imported
    assert [m for m in imported if _is(m, TOOLS)] and not _is("wcord_jax.toolsx", TOOLS)
