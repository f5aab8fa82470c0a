"""JAX's persistent compilation cache, on by default for every command, and a log of what each dispatch's first
call compiled.

A run's compiled programs (the train step, the evaluators) are written to a cache directory and read back by the
next process that compiles the same program: a resumed job (after a preemption, a crash, a second invocation of the
same command) or another seed of an experiment starts its first step without compiling it again. Where the cache
lives, first match wins:

1. the config key `compilation_cache` (a directory, a `gs://` URI, or `none` to switch the cache off); its default
   `auto` defers to
2. the environment variable `JAX_COMPILATION_CACHE_DIR` (JAX's own; `none` switches the cache off), and else
3. `$XDG_CACHE_HOME/wcord_jax/jax` (`~/.cache/wcord_jax/jax` where XDG_CACHE_HOME is unset).

Every program that takes at least `MIN_COMPILE_SECS` to compile is kept (JAX's default, 1 s, would skip a small
network's evaluator on a GPU, whose compile takes a fraction of a second; programs that compile faster than this cost
more to look up and write than they save); `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, where set, wins. JAX
reads the setting at its first compilation: `configure` must run before anything is compiled, and later calls in
the same process do not move the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import MutableMapping, Optional

ENV = "JAX_COMPILATION_CACHE_DIR"
CONFIG_KEY = "compilation_cache"
AUTO, OFF = "auto", "none"
MIN_COMPILE_SECS = 0.2
MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
NOTE = ""  # what the last `configure` chose (logged in a run's first lines)

log = logging.getLogger("wcord_jax")


def default_dir(env: Optional[MutableMapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wcord_jax", "jax")


def resolve(setting: Optional[str], env: Optional[MutableMapping[str, str]] = None) -> tuple[Optional[str], str]:
    """(cache directory or None for off, where that choice came from) for the config value `setting`."""
    env = os.environ if env is None else env
    setting = AUTO if setting is None else str(setting).strip()
    if not setting:
        raise ValueError(f"{CONFIG_KEY} must be {AUTO}, {OFF} or a directory, got an empty value")
    if setting != AUTO:
        return (None, f"off ({CONFIG_KEY}={OFF})") if setting.lower() == OFF else (setting, CONFIG_KEY)
    value = env.get(ENV, "").strip()
    if value:
        return (None, f"off ({ENV}={value})") if value.lower() == OFF else (value, ENV)
    return default_dir(env), "the default location"


def configure(config=None, env: Optional[MutableMapping[str, str]] = None) -> str:
    """Points JAX's persistent compilation cache where `config.compilation_cache` (or the environment) says, with
    this library's thresholds; returns (and keeps in NOTE) one line saying what was chosen. ValueError for an empty
    setting."""
    import jax

    setting = config.get(CONFIG_KEY, AUTO) if config is not None else AUTO
    directory, why = resolve(setting, env)
    global NOTE
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
        NOTE = f"compilation cache: {why}"
        return NOTE
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    env = os.environ if env is None else env
    if MIN_SECS_ENV not in env:  # the user's own threshold wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    NOTE = f"compilation cache: {directory} ({why}; programs compiling in {min_secs:g} s or more)"
    return NOTE


# --------------------------------------------------------------------------------------------------------------------
# What a first call compiled

# JAX's monitoring events (jax._src.compiler / dispatch): a persistent-cache hit or miss per program that may be
# cached, and the seconds of each backend compilation (a cache read included).
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_counts = {"hits": 0, "misses": 0, "compile_s": 0.0, "programs": 0}
_installed = False


def _on_event(event: str, **kwargs) -> None:
    if event == _HIT:
        _counts["hits"] += 1
    elif event == _MISS:
        _counts["misses"] += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE:
        _counts["compile_s"] += float(duration)
        _counts["programs"] += 1


def _install() -> None:
    global _installed
    if not _installed:
        import jax

        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _installed = True


def counts() -> dict:
    """This process's totals so far: persistent-cache hits and misses, backend compilations and their seconds."""
    _install()
    return dict(_counts)


class CompileLog:
    """Logs, for the first call of each dispatch it watches, how long the call took, how much of it was XLA's
    compilation and how many of its programs came from the persistent cache."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._seen: set[int] = set()
        self.last: Optional[dict] = None  # the last report's figures (the tests read them)
        _install()

    @contextlib.contextmanager
    def first_call(self, fn, what: str):
        if id(fn) in self._seen:
            yield
            return
        self._seen.add(id(fn))
        before, start = counts(), time.perf_counter()
        yield
        after = counts()
        diff = {k: after[k] - before[k] for k in after}
        diff["call_s"] = time.perf_counter() - start
        self.last = diff
        if not self.enabled:
            return
        n, hits = diff["programs"], diff["hits"]
        if n == 0:
            log.info("%s: first call %.1f s (compiled earlier in this process)", what, diff["call_s"])
            return
        programs = f"{n} program{'' if n == 1 else 's'}"
        if n and hits >= n:
            log.info("%s: first call %.1f s, its %s read from the persistent compilation cache in %.1f s", what,
                     diff["call_s"], programs, diff["compile_s"])
            return
        if hits or diff["misses"]:
            cache = f"{hits} of {hits + diff['misses']} from the persistent compilation cache"
        else:  # the cache is off (or was off at this process's first compilation, when JAX reads the setting)
            cache = "no persistent compilation cache"
        log.info("%s: first call %.1f s, of which XLA compilation %.1f s (%s; %s)", what, diff["call_s"],
                 diff["compile_s"], programs, cache)
