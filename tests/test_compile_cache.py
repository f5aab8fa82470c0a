"""Where the persistent compilation cache goes (config key, JAX_COMPILATION_CACHE_DIR, the default) and the log line
of a dispatch's first call. That a second process reads the step from the cache is shown by the command-line resume
test (tests/test_cli.py)."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcord_jax import compile_cache, configs


def test_the_config_key_wins_then_the_environment_then_the_user_cache_directory(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert compile_cache.resolve("auto", env) == (str(tmp_path / "xdg" / "wcord_jax" / "jax"), "the default location")
    env["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"
    assert compile_cache.resolve("auto", env) == ("/elsewhere", "JAX_COMPILATION_CACHE_DIR")
    assert compile_cache.resolve("gs://bucket/cache", env) == ("gs://bucket/cache", "compilation_cache")
    assert compile_cache.resolve("none", env) == (None, "off (compilation_cache=none)")
    env["JAX_COMPILATION_CACHE_DIR"] = "none"
    assert compile_cache.resolve("auto", env) == (None, "off (JAX_COMPILATION_CACHE_DIR=none)")
    assert compile_cache.resolve("/mine", env) == ("/mine", "compilation_cache")
    with pytest.raises(ValueError, match="compilation_cache must be auto, none or a directory"):
        compile_cache.resolve(" ", env)


def test_every_config_has_the_key_and_defaults_to_auto():
    assert configs.teacher_config("resnet8").compilation_cache == "auto"
    assert configs.distill_config("crd", "resnet32", "resnet8").compilation_cache == "auto"


def test_the_first_call_of_a_dispatch_is_logged_once_with_what_it_compiled(caplog):
    """A program this session has not compiled: one backend compilation, logged with the state of the cache; the
    second call logs nothing."""
    salt = float(np.random.default_rng().integers(1 << 30))  # a program no earlier test compiled

    @jax.jit
    def f(x):
        return jnp.sin(x) * salt

    x = jax.block_until_ready(jnp.ones(3))
    watch = compile_cache.CompileLog()
    with caplog.at_level(logging.INFO, logger="wcord_jax"):
        for _ in range(2):
            with watch.first_call(f, "the probe"):
                jax.block_until_ready(f(x))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the probe")]
    assert len(lines) == 1, lines
    assert watch.last["programs"] == 1 and watch.last["hits"] == 0, watch.last
    # JAX reads the cache setting at a process's first compilation: this session's may or may not use one.
    cache = "(0 of 1 from the persistent compilation cache|no persistent compilation cache)"
    assert re.fullmatch(rf"the probe: first call [\d.]+ s, of which XLA compilation [\d.]+ s \(1 program; {cache}\)",
                        lines[0]), lines[0]


def test_a_dispatch_compiled_earlier_in_the_process_says_so(caplog):
    @jax.jit
    def g(x):
        return x + 1

    x = jax.block_until_ready(jnp.ones(2))
    jax.block_until_ready(g(x))
    with caplog.at_level(logging.INFO, logger="wcord_jax"):
        with compile_cache.CompileLog().first_call(g, "again"):
            jax.block_until_ready(g(x))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("again")][0].endswith(
        "(compiled earlier in this process)")
