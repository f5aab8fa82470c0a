"""Command line: `python -m wcord_jax.main --config configs/FILE.py:ARG --workdir DIR [--config.KEY=VALUE ...]`.

Trains what the config describes in DIR; re-running the same command resumes from DIR's latest checkpoint. Mistakes
in the command (an unknown model, data set or config key) end with one line naming the valid choices and exit code 2.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and argument, e.g. configs/teacher.py:resnet8",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard files.")

USAGE_ERROR = 2
DIVERGED = 3  # a non-finite loss, term or weight stopped the run (nothing saved from that state)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _config_key_hint(argv: list[str], error: Exception) -> str:
    """Explains a bad --config.X override by listing the keys that exist at that level."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None and "--config" in argv:
        i = argv.index("--config")
        config_arg = argv[i + 1] if i + 1 < len(argv) else None
    bad = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    if lines and "Error whilst parsing config file" in lines[0]:
        return lines[-1]  # what the config file's get_config raised, e.g. an unknown method
    if config_arg is None or not bad:
        return lines[0] if lines else type(error).__name__
    try:
        config = config_flags.config_flags._LoadConfigModule("config", config_arg.split(":", 1)[0])  # noqa: SLF001
        arg = config_arg.split(":", 1)[1] if ":" in config_arg else None
        config = config.get_config(arg) if arg is not None else config.get_config()
    except Exception:  # the config file itself is broken: report absl's message
        return str(error).splitlines()[0]
    for key in bad:
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if hasattr(node, "keys") and part in node.keys():
                node = node[part]
                continue
            where = ".".join(parts[:depth]) or "config"
            valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none: it is not a group)"
            return f"unknown config key {key!r}: {where} has {valid}"
    return str(error).splitlines()[0]


def _setup_logging() -> None:
    """Plain `HH:MM:SS message` lines for the library's log; absl's and jax's own logging only for warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    lib = logging.getLogger("wcord_jax")
    lib.handlers[:] = [handler]
    lib.setLevel(logging.INFO)
    lib.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    # jax's own INFO lines (e.g. "Unable to initialize backend 'tpu'" on every machine without one) are not the
    # library's: warnings and errors only.
    logging.getLogger("jax").setLevel(logging.WARNING)


def _configure_host(config) -> None:
    """XLA:CPU's device count and oneDNN (`wcord_jax.host`), before anything creates a device, and the persistent
    compilation cache (`wcord_jax.compile_cache`), before anything is compiled."""
    from wcord_jax import compile_cache, host

    try:
        host.configure(config)  # its note is logged by the run once the config is validated (CPU backend only)
        compile_cache.configure(config)  # so is this one's
    except ValueError as e:
        _fail(str(e))
    except OSError as e:  # config_flags defers a missing or broken config file until first use
        _fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an unknown --config.KEY as an AttributeError from inside absl's parser.
        _fail(_config_key_hint(argv, e))
    return []  # unreachable


def main(argv: list[str]) -> None:
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None:
        _fail("--config is required, e.g. --config configs/teacher.py:resnet8")
    if not workdir:
        _fail("--workdir is required: the directory for checkpoints and metrics")
    _setup_logging()
    _configure_host(config)

    from wcord_jax import parallel  # after flag parsing: importing JAX is slow

    try:  # a multi-process run (WCORD_DISTRIBUTED, WCORD_COORDINATOR): connect before anything touches a device
        if parallel.initialize_distributed() and not parallel.is_main_process():
            logging.getLogger("wcord_jax").setLevel(logging.WARNING)  # process 0 logs for the run
    except ValueError as e:
        _fail(f"multi-process setup: {e}")

    from wcord_jax import core, distill, loop, train
    from wcord_jax.tools import probe
    from wcord_jax.checkpoint import CheckpointError
    from wcord_jax.data import DataNotFoundError

    try:
        task = config.get("task", "teacher")
    except OSError as e:  # config_flags defers a missing or broken config file until first use
        _fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")
    runners = {"teacher": train.train_and_evaluate, "distill": distill.distill_and_evaluate,
               "probe": probe.probe_and_evaluate}
    if task not in runners:
        _fail(f"unknown task {task!r}; valid: {', '.join(runners)}")
    try:
        result = runners[task](config, workdir)
    except (core.ConfigError, DataNotFoundError) as e:
        _fail(str(e))
    except loop.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except loop.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(DIVERGED)
    except CheckpointError as e:
        _fail(str(e))
    text = " ".join(f"{k}={v:.4f}" for k, v in result.items())
    print(f"done: {text} (workdir {workdir})")


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
