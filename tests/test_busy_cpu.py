"""Runs on several CPU devices do not abort when the host runs far ahead of the devices or the machine is busy.

XLA:CPU admits at most 32 computations in flight per device and waits for that admission on the thread pool that
also runs the devices' programs: a host more than 32 dispatches ahead could starve one device's program while the
other waited for it at the step's all-reduce, until XLA aborted the process after 40 s. Every loop of the library
stays a few dispatches ahead (`parallel.DispatchWindow`); these tests fail without it.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA aborts a collective that waited this long (default 40 s): a regression fails in seconds, not minutes.
SHORT_RENDEZVOUS = "--xla_cpu_collective_call_terminate_timeout_seconds=15"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def test_a_window_of_dispatches_keeps_a_tight_loop_of_collectives_alive():
    """Hundreds of tiny two-device steps (each with an all-reduce) dispatched as fast as the host can: without the
    window the host gets 33 ahead within the first few hundred and XLA aborts (exit status 134)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from wcord_jax import parallel

        mesh = parallel.make_mesh()
        def f(w, x):
            y = jnp.tanh(x @ w)
            return w - 1e-3 * jax.lax.pmean(y.T @ y, "data"), jax.lax.pmean(jnp.mean(y), "data")
        step = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P())),
                       donate_argnums=0)
        w = jax.device_put(jnp.eye(32), NamedSharding(mesh, P()))
        x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data")))
        ahead = parallel.DispatchWindow()
        for _ in range(600):
            w, m = step(w, x)
            ahead.add(m)
            assert len(ahead) <= parallel.MAX_DISPATCHES_AHEAD
        print(len(jax.devices()), float(jax.block_until_ready(m)))
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {SHORT_RENDEZVOUS}"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "2"


@pytest.mark.slow
def test_a_two_device_run_finishes_beside_two_cpu_bound_processes(tmp_path):
    """512 small steps on 2 CPU devices, no log line to hold the host back, while two busy loops compete for the
    cores: the run finishes and evaluates (before the window it aborted in 3 of 3 tries on a 2-core AMD EPYC)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/teacher.py:resnet8",
               "--workdir", str(tmp_path / "w"), "--config.dataset.name=synthetic",
               "--config.dataset.num_train=8192", "--config.dataset.num_test=32", "--config.dataset.image_size=8",
               "--config.dataset.num_classes=4", "--config.batch_size=16", "--config.eval_batch_size=16",
               "--config.num_epochs=1", "--config.log_every_steps=0", "--config.progress_bar=False",
               "--config.cpu_devices=2"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420,
                             env=_env(XLA_FLAGS=SHORT_RENDEZVOUS))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "XLA:CPU: 2 CPU devices (cpu_devices)" in out.stderr
    assert "step 512/512" in out.stderr and "epoch 1/1: eval top1" in out.stderr
