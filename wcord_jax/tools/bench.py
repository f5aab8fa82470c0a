"""Throughput of the real distillation train step: `python -m wcord_jax.tools.bench --config configs/distill.py:M,T,S`.

Runs `distill.distill_step` exactly as a training run compiles it (`feed.make_runner`: jit of a shard_map over the
`data` mesh, donated state, batches gathered and augmented on the device) on the synthetic data set, on whatever
devices JAX sees, and prints ONE JSON line on stdout (progress goes to stderr):

  python -m wcord_jax.tools.bench --config configs/distill.py:crd,resnet32x4,resnet8x4 [--steps 20] [--warmup 3]
      [--rounds 1] [--no-shares] [--config.batch_size=128 --config.dtype=bfloat16 ...]

The data set is forced to `synthetic`, by default with CIFAR-100's shapes (50000 training images of 32x32x3, 100
classes), because CRD's cost depends on the training-set size (its memory banks and negative pools). Any
`--config.dataset.*` given on the command line wins over these defaults, except the name. The teacher has random
weights unless `--config.teacher.checkpoint=DIR` names a teacher run; the speed does not depend on the weights.
For AB, FSP and FT the main-stage step is timed (not their init stage).

Timing: compile time (trace, lower and compile, measured alone), then `--warmup` untimed steps, then `--steps` timed
steps ended by `jax.block_until_ready`. `steps_per_dispatch` is honoured: steps are rounded up to whole dispatches.
The shares are measured by compiling the same step again with one part replaced by a cheap stand-in:

* `sinkhorn_share` (WCoRD): `losses.wcord_local_loss` returns a zero that depends on the embeddings;
* `negatives_share` (CRD, WCoRD): `losses.crd_loss`, `losses.wcord_global_loss` and
  `losses.wcord_global_loss_memory` score only the positive pair and return the state unchanged, and
  `losses.sample_contrast_idx` draws nothing, so no negative is sampled, gathered, scored or written;
* `terms_share` (WCoRD): both stand-ins at once, i.e. what the step costs beyond the two networks and the heads
  (the global term's negatives and the local Sinkhorn term together).

share = max(0, 1 - t_off / t_full). All variants are compiled and warmed up first; then each round times `--steps`
steps of every variant, in blocks that interleave the variants (so that a change in the machine's load hits them
alike). With `--rounds R` the median of each variant's R times is used.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import statistics
import time
from typing import Optional

from absl import app, flags

from wcord_jax import main as cli  # the --config flag, its error reporting and the log format are main.py's

_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed train steps after compilation.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Timed repetitions of every variant (interleaved; medians are used).")
_SHARES = flags.DEFINE_boolean("shares", True, "Also time the step without the Sinkhorn term / the negatives "
                                               "(--no-shares skips it).")

log = logging.getLogger("wcord_jax")

# CIFAR-100's shapes: the synthetic set the bench runs on unless --config.dataset.* says otherwise.
DATASET_DEFAULTS = {"image_size": 32, "num_channels": 3, "num_classes": 100, "num_train": 50000}
_overridden: set = set()  # config keys given on the command line (e.g. "dataset.num_classes")
_BLOCKS = 4  # the timed steps of a round are run in this many blocks, the variants interleaved


# --------------------------------------------------------------------------------------------------------------------
# Stand-ins for the parts whose share of the step is measured


def _positive_only(emb_s, emb_t, tau, axis_name):
    """-mean_i <s_i, t_i> / tau over the global batch: the positive pair only, device-invariant like the real loss."""
    import jax.numpy as jnp
    from wcord_jax.losses import _parallel

    total = jnp.sum(emb_s.astype(jnp.float32) * emb_t.astype(jnp.float32))
    return -_parallel.psum(total, axis_name) / (tau * emb_s.shape[0] * _parallel.axis_size(axis_name))


def _crd_loss_off(state, emb_s, emb_t, idx, contrast_idx, temperature=0.07, momentum=0.5, axis_name=None):
    return _positive_only(emb_s, emb_t, temperature, axis_name), state


def _wcord_global_loss_off(state, emb_s, emb_t, tau=0.07, axis_name=None, **keys):
    return _positive_only(emb_s, emb_t, tau, axis_name), state


def _wcord_global_loss_batch_off(emb_s, emb_t, tau=0.07, axis_name=None, **kwargs):
    return _positive_only(emb_s, emb_t, tau, axis_name)


def _wcord_global_loss_memory_off(crd_state, emb_s, emb_t, idx, contrast_idx, tau=0.07, momentum=0.5,
                                  axis_name=None, **keys):
    return _positive_only(emb_s, emb_t, tau, axis_name), crd_state


def _sample_contrast_idx_off(key, idx, labels, class_index, num_negatives, replace=False):
    import jax.numpy as jnp

    return jnp.broadcast_to(idx.astype(jnp.int32)[:, None], (idx.shape[0], int(num_negatives) + 1))


def _wcord_local_loss_off(emb_s, emb_t, *args, axis_name=None, **kwargs):
    import jax.numpy as jnp
    from wcord_jax.losses import _parallel

    zero = 0.0 * (jnp.sum(emb_s.astype(jnp.float32)) + jnp.sum(emb_t.astype(jnp.float32)))
    return _parallel.pmean(zero, axis_name), {"converged": jnp.asarray(True), "n_iters": jnp.zeros((), jnp.int32)}


NEGATIVES_OFF = {"crd_loss": _crd_loss_off, "wcord_global_loss": _wcord_global_loss_off,
                 "wcord_global_loss_memory": _wcord_global_loss_memory_off,
                 "wcord_global_loss_batch": _wcord_global_loss_batch_off,
                 "sample_contrast_idx": _sample_contrast_idx_off}
LOCAL_OFF = {"wcord_local_loss": _wcord_local_loss_off}
# The parts of a method's step the bench times apart, by the distiller's config section.
SHARES = {"crd": ("negatives",), "wcord": ("local", "negatives")}


@contextlib.contextmanager
def patched_losses(replacements: dict):
    """Temporarily replaces `wcord_jax.losses.<name>` (the distillers call every loss as `losses.<name>`)."""
    from wcord_jax import losses

    saved = {name: getattr(losses, name) for name in replacements}
    try:
        for name, fn in replacements.items():
            setattr(losses, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(losses, name, fn)


# --------------------------------------------------------------------------------------------------------------------
# Setup


def apply_bench_defaults(config, overridden=frozenset()) -> None:
    """Forces the synthetic data set; CIFAR-100 shapes for the dataset keys not in `overridden`."""
    if config.dataset.name != "synthetic":
        if "dataset.name" in overridden:
            log.info("bench: dataset.name=%s ignored, the bench runs on the synthetic set", config.dataset.name)
        config.dataset.name = "synthetic"
    for key, value in DATASET_DEFAULTS.items():
        if f"dataset.{key}" not in overridden:
            config.dataset[key] = value
    if "dataset.num_test" not in overridden:
        config.dataset.num_test = config.eval_batch_size  # built by the feed, never evaluated


def _validate(config, num_devices: int) -> None:
    """`distill.validate`, except that a teacher checkpoint is optional (random weights otherwise)."""
    from wcord_jax import distill

    if config.teacher.checkpoint:
        return distill.validate(config, num_devices)
    probe = config.copy_and_resolve_references()
    probe.teacher.checkpoint = "(random teacher)"
    distill.validate(probe, num_devices)


def _random_teacher_vars(config, dataset, dtype) -> dict:
    """Random teacher variables (the step's speed does not depend on the weights).

    The tree is the one `teacher.init` builds (`jax.eval_shape`, nothing compiled); the values are drawn on the host:
    He-normal kernels, zero biases and means, unit scales and variances. Compiling `jax.jit(teacher.init)` would
    cost several seconds on a CPU (XLA:CPU is slow to compile the initialisers' threefry draws).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from wcord_jax import models

    teacher = models.get_model(config.teacher.model, dataset.num_classes, dtype=dtype)
    shapes = jax.eval_shape(functools.partial(teacher.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, *dataset.image_shape)))
    rng = np.random.default_rng(config.seed + 1)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            value = np.ones(leaf.shape)
        elif name in ("bias", "mean"):
            value = np.zeros(leaf.shape)
        else:  # kernels (and anything else): He-normal over the fan-in
            fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / max(fan_in, 1))
        return np.asarray(value, leaf.dtype)

    return {k: jax.tree_util.tree_map_with_path(fill, shapes[k]) for k in ("params", "batch_stats") if k in shapes}


def _dispatch_pool(feed, rng, count: int) -> list:
    """`count` full dispatches (runner arguments) from the feed's epoch orders; partial ones are skipped."""
    spd = feed.steps_per_dispatch
    if feed.steps_per_epoch < spd:
        from wcord_jax.core import ConfigError

        raise ConfigError(f"steps_per_dispatch={spd} exceeds the {feed.steps_per_epoch} steps of an epoch: "
                          "raise dataset.num_train")
    pool, epoch = [], 0
    while len(pool) < count:
        for n, args in feed.dispatches(rng, epoch, 0):
            if n == spd:
                pool.append(args)
            if len(pool) == count:
                break
        epoch += 1
    return pool


class _Variant:
    """One compiled version of the step (the real one, or one with a part switched off) and its own state."""

    def __init__(self, name, replacements, build, state, args0):
        import jax
        import jax.numpy as jnp
        from wcord_jax import compile_cache, parallel

        self.name, self.times = name, []
        mesh, spec = build["mesh"], build["spec"]
        # Copy first: leaves that share one buffer (equal constants) cannot both be donated to the step.
        self.state = jax.block_until_ready(parallel.place(jax.tree.map(jnp.copy, state), mesh, spec))
        before, start = compile_cache.counts(), time.perf_counter()
        with patched_losses(replacements):  # active while the step is traced
            runner = build["feed"].make_runner(build["step_fn"], build["dtype"], num_extra=2, state_spec=spec,
                                               nonfinite=build["nonfinite"])
            self.compiled = runner.lower(self.state, *build["extra"], *args0).compile()
        self.compile_s = time.perf_counter() - start
        self.flops = _flops(self.compiled)
        self.from_cache = compile_cache.counts()["hits"] > before["hits"]  # then compile_s is a cache read
        self.extra = build["extra"]
        self.metrics = None
        self.cpu_times = []  # process CPU seconds (all threads) of each timed round
        self.last_cpu_s = 0.0

    def run(self, pool, n: int, offset: int = 0) -> float:
        """Runs n dispatches (cycling through the pool); returns the wall time to the last result."""
        import jax
        from wcord_jax import parallel

        jax.block_until_ready(self.state)
        start, cpu_start = time.perf_counter(), time.process_time()
        ahead = parallel.DispatchWindow()  # as a training run: a few dispatches ahead of the devices
        for i in range(n):
            self.state, self.metrics = self.compiled(self.state, *self.extra, *pool[(offset + i) % len(pool)])
            ahead.add(self.metrics)
        jax.block_until_ready((self.state, self.metrics))
        wall = time.perf_counter() - start
        self.last_cpu_s = time.process_time() - cpu_start
        return wall


def _flops(compiled) -> Optional[float]:
    """One step's floating-point operations, from XLA's cost analysis of the compiled dispatch (None where the backend
    gives none). XLA counts a loop's body once, so with several steps per dispatch (a `lax.scan`) its figure is
    still one step's (tests/test_bench.py checks that both dispatches give the same figure)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not implemented on this backend
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return float(flops) if flops and flops > 0 else None


# Dense peak TFLOP/s per chip of the accelerators the library targets (vendor data sheets), by a substring of
# `device_kind` and the activation dtype. float32 is the rate XLA's default precision runs f32 products at: TF32 on
# NVIDIA tensor cores, one bfloat16 pass on a TPU.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """The chip's dense peak for `dtype` (None for a CPU or a chip not in PEAK_TFLOPS)."""
    for name, peaks in PEAK_TFLOPS:
        if name in device_kind:
            return peaks.get(dtype)
    return None


def _peak_memory():
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # not implemented on this backend
        stats = None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _split(n: int, parts: int) -> list[int]:
    """n split into min(n, parts) near-equal positive block sizes."""
    parts = max(1, min(n, parts))
    return [n // parts + (i < n % parts) for i in range(parts)]


# --------------------------------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(config, steps: int = 20, warmup: int = 3, shares: bool = True, rounds: int = 1,
                  overridden=frozenset(), variants=()) -> dict:
    """Times the distillation step of `config` (a configs/distill.py config); returns the JSON record.

    `config` is modified in place (synthetic data set, see `apply_bench_defaults`). `variants` are extra
    `(name, {losses attribute: replacement})` versions of the step to time alongside (to try an engine change
    without making it); their ms/step are in the record's `variants`. Raises `ConfigError` for a config that
    cannot run.
    """
    import jax
    import numpy as np
    from wcord_jax import backend, compile_cache, distill, host, loop, parallel
    from wcord_jax.core import ConfigError

    if config.get("task") != "distill":
        raise ConfigError("the bench times distillation steps: use --config configs/distill.py:METHOD,TEACHER,STUDENT")
    if steps <= 0 or warmup < 0 or rounds <= 0:
        raise ConfigError(f"--steps ({steps}) and --rounds ({rounds}) must be positive, --warmup ({warmup}) >= 0")
    apply_bench_defaults(config, overridden)
    mesh, dtype, dataset, feed = loop.setup_run(config, _validate)
    dtype_name = backend.dtype(config.dtype, backend.current())[0]  # auto resolved for this backend
    method = config.method
    teacher_vars, teacher_source = None, "checkpoint"  # build_engine restores config.teacher.checkpoint
    if not config.teacher.checkpoint:
        teacher_vars, teacher_source = _random_teacher_vars(config, dataset, dtype), "random"
    eng = distill.build_engine(config, dataset, feed.steps_per_epoch, dtype, teacher_vars=teacher_vars)
    state = eng.state
    build = {"mesh": mesh, "spec": eng.spec, "feed": feed, "step_fn": eng.main_step, "dtype": dtype,
             "nonfinite": config.get("nonfinite", "stop"),  # the finiteness check, as a training run has it
             "extra": (parallel.replicate(eng.teacher_vars, mesh), parallel.replicate(eng.class_index, mesh))}

    spd = feed.steps_per_dispatch
    n_warm, n_timed = math.ceil(warmup / spd), math.ceil(steps / spd)
    pool = _dispatch_pool(feed, state.rng, max(1, n_warm + n_timed))
    log.info("bench %s: %s -> %s, batch %d, %s, %d device(s) (%s), %d train images %s, steps_per_dispatch %d",
             method, config.teacher.model, config.model, config.batch_size, dtype_name, mesh.devices.size,
             jax.devices()[0].device_kind, dataset.num_train, "x".join(map(str, dataset.image_shape)), spd)
    if host.NOTE and jax.default_backend() == "cpu":
        log.info("%s", host.NOTE)
    if compile_cache.NOTE:
        log.info("%s", compile_cache.NOTE)

    extra_variants, variants = list(variants), [("full", {})]
    parts = SHARES.get(distill.distiller_of(config).config_section, ()) if shares else ()
    if "local" in parts:
        variants.append(("no_local", LOCAL_OFF))
    if "negatives" in parts:
        variants.append(("no_negatives", NEGATIVES_OFF))
    if "local" in parts and "negatives" in parts:
        variants.append(("no_terms", {**LOCAL_OFF, **NEGATIVES_OFF}))
    variants += extra_variants
    built, peak = {}, None
    for name, replacements in variants:
        v = built[name] = _Variant(name, replacements, build, state, pool[0])
        log.info("bench [%s]: compiled in %.1f s%s", name, v.compile_s,
                 " (read from the persistent compilation cache)" if v.from_cache else "")
        if n_warm:
            log.info("bench [%s]: %d warm-up step(s) in %.2f s", name, n_warm * spd, v.run(pool, n_warm))
        if name == "full":
            peak = _peak_memory()  # the real step's peak, before the other variants allocate anything

    # Timed: each round runs every variant for n_timed dispatches, in interleaved blocks, so that a change in the
    # machine's load during the run hits all variants alike.
    blocks = _split(n_timed, _BLOCKS if len(variants) > 1 else 1)
    for r in range(rounds):
        totals, cpu = dict.fromkeys(built, 0.0), dict.fromkeys(built, 0.0)
        for b, size in enumerate(blocks):
            for name, _ in variants[b % len(variants):] + variants[:b % len(variants)]:
                totals[name] += built[name].run(pool, size, n_warm + sum(blocks[:b]))
                cpu[name] += built[name].last_cpu_s
        for name, v in built.items():
            v.times.append(totals[name])
            v.cpu_times.append(cpu[name])
            log.info("bench [%s] round %d/%d: %d steps in %.2f s (%.1f ms/step)", name, r + 1, rounds,
                     n_timed * spd, totals[name], 1e3 * totals[name] / (n_timed * spd))

    timed_steps = n_timed * spd
    t = {name: statistics.median(v.times) for name, v in built.items()}
    full = built["full"]
    last = jax.device_get(full.metrics)
    loss = float(np.asarray(last["loss"]).reshape(-1)[-1])

    c = {name: statistics.median(v.cpu_times) for name, v in built.items()}
    on_cpu = jax.default_backend() == "cpu"

    def share(name, times=t):
        return None if name not in times else round(max(0.0, 1.0 - times[name] / times["full"]), 4)

    def ms(name):
        return None if name not in t else round(1e3 * t[name] / timed_steps, 2)

    return {
        "method": method, "teacher": config.teacher.model, "student": config.model,
        "img_per_s": round(config.batch_size * timed_steps / t["full"], 2),
        "ms_per_step": ms("full"),
        "compile_s": round(full.compile_s, 2),
        "compile_from_cache": full.from_cache,  # compile_s was a read of the persistent compilation cache
        "device_kind": jax.devices()[0].device_kind, "device_count": int(mesh.devices.size),
        "cpu_model": host.cpu_model(),  # the host's, as lscpu names it: CPU figures differ by CPU kind
        "backend": jax.default_backend(), "dtype": dtype_name, "batch_size": config.batch_size,
        "steps": timed_steps, "warmup": n_warm * spd, "rounds": rounds, "steps_per_dispatch": spd,
        "peak_memory_bytes": peak,
        # Achieved compute: XLA's count of one device's flops in one step (its share of the batch) times the
        # devices, at the measured speed, against the chips' dense peak for this dtype (null where the chip is not
        # in PEAK_TFLOPS, e.g. a CPU).
        "flops_per_step": full.flops,
        "tflop_per_s": (None if full.flops is None
                        else round(full.flops * int(mesh.devices.size) * timed_steps / t["full"] / 1e12, 4)),
        "peak_tflop_per_s": (None if peak_tflops(jax.devices()[0].device_kind, dtype_name) is None
                             else peak_tflops(jax.devices()[0].device_kind, dtype_name) * int(mesh.devices.size)),
        # CPU seconds of this process (all threads) per wall second while the real step ran: about the number of
        # cores it had on a CPU backend (less than the machine's when other processes compete for them).
        "process_cpu_util": round(sum(full.cpu_times) / max(sum(full.times), 1e-9), 2),
        "cpu_ms_per_step": round(1e3 * statistics.median(full.cpu_times) / timed_steps, 2),
        "sinkhorn_share": share("no_local"), "negatives_share": share("no_negatives"),
        "terms_share": share("no_terms"),
        "ms_per_step_no_local": ms("no_local"), "ms_per_step_no_negatives": ms("no_negatives"),
        "ms_per_step_no_terms": ms("no_terms"),
        # The same shares from the process's CPU time instead of wall time: steadier on a CPU that other processes
        # share (the work a step does changes little when it gets fewer cores; its wall time does).
        # Null off the CPU backend, where the host's CPU time says nothing about the device's work.
        "cpu_sinkhorn_share": share("no_local", c) if on_cpu else None,
        "cpu_negatives_share": share("no_negatives", c) if on_cpu else None,
        "cpu_terms_share": share("no_terms", c) if on_cpu else None,
        "num_train": dataset.num_train, "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes, "teacher_weights": teacher_source,
        "final_loss": loss if math.isfinite(loss) else None, "jax_version": jax.__version__,
        **({"variants": {name: ms(name) for name, _ in extra_variants}} if extra_variants else {}),
    }


# --------------------------------------------------------------------------------------------------------------------
# Command line


def parse_flags(argv: list[str]) -> list[str]:
    """main.py's parser (one-line errors, exit 2), plus `--no-shares` and a record of the --config.* overrides."""
    argv = ["--noshares" if a == "--no-shares" else a for a in argv]
    _overridden.clear()
    _overridden.update(a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config."))
    return cli.parse_flags(argv)


def main(argv: list[str]) -> None:
    del argv
    config = cli._CONFIG.value  # noqa: SLF001
    if config is None:
        cli._fail("--config is required, e.g. --config configs/distill.py:crd,resnet32x4,resnet8x4")  # noqa: SLF001
    cli._setup_logging()  # noqa: SLF001
    cli._configure_host(config)  # noqa: SLF001

    from wcord_jax.data import DataNotFoundError
    from wcord_jax.core import ConfigError

    try:
        config.get("task")
    except OSError as e:  # config_flags defers a missing or broken config file until first use
        cli._fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")  # noqa: SLF001
    try:
        record = run_benchmark(config, _STEPS.value, _WARMUP.value, _SHARES.value, _ROUNDS.value,
                               frozenset(_overridden))
    except (ConfigError, DataNotFoundError) as e:
        cli._fail(str(e))  # noqa: SLF001
    print(json.dumps(record), flush=True)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
