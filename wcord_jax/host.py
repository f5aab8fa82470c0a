"""XLA:CPU settings chosen at start-up, before JAX creates its devices: `configure(config)`.

Two config keys, read by `python -m wcord_jax.main` and `python -m wcord_jax.tools.bench` (they only matter where the
computation runs on the CPU; on a GPU or TPU they change nothing that runs):

* `cpu_devices` (default 0 = auto): how many XLA devices the host CPU is split into
  (`--xla_force_host_platform_device_count`). A run is data-parallel over its devices (the same losses as on one
  device, as on a GPU or TPU mesh), and XLA:CPU runs each device's share of the step on its own thread, so the
  cores are kept busy where one device leaves part of them idle: on the 2-core AMD EPYC development machine, CRD
  resnet32x4 -> resnet8x4 went from 60 to 79 img/s (BENCHMARKS.md, "CPU: wcord_jax against RepDistiller"). Auto
  takes one device per usable core, reduced to the largest count that divides both `batch_size` and
  `eval_batch_size`; one device per process in a multi-process run (`WCORD_DISTRIBUTED`), whose processes already
  share the host's cores. 1 gives the single CPU device of earlier versions.
* `cpu_onednn` (default auto; on, off): XLA:CPU's oneDNN kernels (`--xla_cpu_use_onednn`). Auto turns them on
  where the CPU is an Intel one (`vendor_id` GenuineIntel in /proc/cpuinfo), where the CRD step was measured
  faster with them on both Xeons tried (2 cores each; with AMX: 29.0 against 25.5-26.5 img/s; without AMX:
  42.5-45.2 against 35.6-39.8), and off elsewhere (on the AMD EPYC: no difference).

A flag already present in `XLA_FLAGS` wins over the config key (it is the user's explicit choice, and the tests set
their own device counts); `configure` then says so.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional, Sequence

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
ONEDNN_FLAG = "--xla_cpu_use_onednn"
ONEDNN_CHOICES = ("auto", "on", "off")
DISTRIBUTED_ENV = ("WCORD_DISTRIBUTED", "WCORD_COORDINATOR")  # wcord_jax.parallel: a multi-process run
NOTE = ""  # what the last `configure` chose; a run on the CPU backend logs it once its config is validated


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


INTEL = "GenuineIntel"


def _cpuinfo(field: str, path: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor(path: str = "/proc/cpuinfo") -> str:
    """The CPU's `vendor_id` (GenuineIntel, AuthenticAMD, ...; empty where /proc/cpuinfo does not say, e.g. on macOS
    or an ARM host)."""
    return _cpuinfo("vendor_id", path)


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's `model name` as `lscpu` shows it (empty where /proc/cpuinfo does not say)."""
    return _cpuinfo("model name", path)


def auto_cpu_devices(cores: int, batch_sizes: Sequence[int]) -> int:
    """The largest device count <= `cores` that divides every batch size (at least 1)."""
    for d in range(max(1, cores), 1, -1):
        if all(int(b) % d == 0 for b in batch_sizes):
            return d
    return 1


def onednn_wanted(setting: str, vendor: str) -> bool:
    if setting not in ONEDNN_CHOICES:
        raise ValueError(f"cpu_onednn must be one of {', '.join(ONEDNN_CHOICES)}, got {setting!r}")
    return setting == "on" or (setting == "auto" and vendor == INTEL)


def _has_flag(xla_flags: str, flag: str) -> bool:
    return any(part == flag or part.startswith(flag + "=") for part in xla_flags.split())


def configure(config, env: Optional[MutableMapping[str, str]] = None, cores: Optional[int] = None,
              vendor: Optional[str] = None) -> str:
    """Adds the XLA:CPU flags the config asks for to `env['XLA_FLAGS']` (default `os.environ`); returns one line
    saying what was chosen and why. Raises ValueError (one line naming the valid values) for a bad setting. Must run
    before JAX creates its devices (JAX may already be imported)."""
    env = os.environ if env is None else env
    cores = usable_cores() if cores is None else cores
    vendor = cpu_vendor() if vendor is None else vendor
    devices, onednn = config.get("cpu_devices", 0), config.get("cpu_onednn", "auto")
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
        raise ValueError(f"cpu_devices must be 0 (auto: one per core) or a positive count, got {devices!r}")
    use_onednn = onednn_wanted(onednn, vendor)
    xla_flags, added, notes = env.get("XLA_FLAGS", ""), [], []

    if _has_flag(xla_flags, CPU_DEVICES_FLAG):
        notes.append("CPU devices as XLA_FLAGS sets them")
    else:
        if devices:
            count, why = devices, "cpu_devices"
        elif any(env.get(k) for k in DISTRIBUTED_ENV):
            count, why = 1, "one per process of a multi-process run"
        else:
            batches = [config.get("batch_size", 1), config.get("eval_batch_size", 1)]
            count = auto_cpu_devices(cores, batches)
            why = f"auto: {cores} usable core{'s' if cores != 1 else ''}, batch sizes {batches[0]}/{batches[1]}"
        if count > 1:
            added.append(f"{CPU_DEVICES_FLAG}={count}")
        notes.append(f"{count} CPU device{'s' if count != 1 else ''} ({why})")

    if _has_flag(xla_flags, ONEDNN_FLAG):
        notes.append("oneDNN as XLA_FLAGS sets it")
    else:
        if use_onednn:
            added.append(f"{ONEDNN_FLAG}=true")
        why = onednn if onednn != "auto" else f"auto: {'an Intel' if vendor == INTEL else 'not an Intel'} CPU"
        notes.append(f"oneDNN {'on' if use_onednn else 'off'} ({why})")

    if added:
        env["XLA_FLAGS"] = " ".join([xla_flags, *added]).strip()
    global NOTE
    NOTE = "XLA:CPU: " + ", ".join(notes)
    return NOTE
