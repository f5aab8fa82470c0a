"""The one-axis `data` mesh that every train step runs over, helpers to place arrays on it, and multi-process setup.

A run may span several processes (the hosts of a Cloud TPU pod slice, several GPU machines), each driving its own
devices; the mesh then holds every process's devices. `initialize_distributed` (called by `wcord_jax.main` before
anything touches a device) connects them when the environment asks for it. The placing helpers take host values that
are the same in every process (parameters initialised from the run's key, the resident data set, the epoch's batch
indices) and let each process put only its own devices' parts on the mesh, so one code path serves one process and
many.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wcord_jax.core import AXIS  # noqa: F401 (the mesh's axis: parallel.AXIS)

# Environment variables that make `initialize_distributed` connect the processes of a run.
ENV_DISTRIBUTED = "WCORD_DISTRIBUTED"  # 1/true/auto: jax.distributed.initialize() with JAX's auto-detection
ENV_COORDINATOR = "WCORD_COORDINATOR"  # host:port of process 0's coordinator (explicit settings)
ENV_NUM_PROCESSES = "WCORD_NUM_PROCESSES"
ENV_PROCESS_ID = "WCORD_PROCESS_ID"
_TRUE, _FALSE = ("1", "true", "yes", "on", "auto"), ("", "0", "false", "no", "off")


def distributed_settings(env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """The keyword arguments for `jax.distributed.initialize` that the environment asks for, or None (one process).

    `WCORD_COORDINATOR=host:port` with `WCORD_NUM_PROCESSES` and `WCORD_PROCESS_ID` give explicit settings;
    `WCORD_DISTRIBUTED=1` (or `auto`) alone lets JAX detect them (Cloud TPU, SLURM, Open MPI). Raises ValueError for
    settings that cannot work, naming the variables.
    """
    env = os.environ if env is None else env
    flag = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}: use 1 (or auto) to start a multi-process run, "
                         "0 for one process")
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    if not coordinator:
        if any(env.get(k) for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
            raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} need {ENV_COORDINATOR}=HOST:PORT "
                             "(process 0's address)")
        return {} if flag in _TRUE else None
    if flag and flag in _FALSE:
        raise ValueError(f"{ENV_COORDINATOR} is set but {ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}: unset one")
    if ":" not in coordinator:
        raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be HOST:PORT")
    settings: dict = {"coordinator_address": coordinator}
    for key, name in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        value = env.get(name, "").strip()
        if not value:
            raise ValueError(f"{ENV_COORDINATOR} needs {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} as well")
        try:
            settings[key] = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not an integer") from None
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(f"{ENV_PROCESS_ID}={settings['process_id']} must be in 0..{settings['num_processes'] - 1} "
                         f"({ENV_NUM_PROCESSES}={settings['num_processes']})")
    return settings


def initialize_distributed(env: Optional[Mapping[str, str]] = None) -> bool:
    """Calls `jax.distributed.initialize` when the environment asks for a multi-process run (see
    `distributed_settings`); returns whether it did. Must run before anything touches a device."""
    settings = distributed_settings(env)
    if settings is None:
        return False
    try:
        jax.distributed.initialize(**settings)
    except ValueError as e:
        if settings:
            raise
        raise ValueError(f"{ENV_DISTRIBUTED}=1 but JAX found no cluster to take the settings from (Cloud TPU, SLURM, "
                         f"Open MPI): set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} ({e})") from e
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process (a small all-gather with several processes; `flag` itself with one)."""
    return any_process_each([flag])[0]


def any_process_each(flags) -> list:
    """For each of `flags`, whether it is set in any process: one small all-gather for all of them with several
    processes, the flags themselves with one."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    from jax.experimental import multihost_utils

    bits = np.asarray([bool(f) for f in flags], np.int32)
    return [bool(b) for b in np.asarray(multihost_utils.process_allgather(bits)).reshape(-1, len(bits)).any(axis=0)]


# How many dispatches a loop may have queued ahead of the devices. XLA:CPU admits at most 32 computations in flight per
# device, and with several devices it waits for that admission on the small thread pool (one thread per core) that
# also runs the devices' programs: a host more than 32 dispatches ahead can occupy the thread that one device's
# program needs while the other device waits for it at the step's all-reduce, and after 40 s XLA aborts the process
# ("Termination timeout for all reduce", exit status 134). A host a few dispatches ahead keeps every device busy on any
# backend (docs/multi-device.md).
MAX_DISPATCHES_AHEAD = 4


class DispatchWindow:
    """Keeps a loop at most `limit` (default MAX_DISPATCHES_AHEAD) dispatches ahead of the devices: `add(outputs)`
    after each dispatch waits for the outputs of the dispatch `limit` back. Give it outputs that are not donated to a
    later dispatch (the metrics, not the state)."""

    def __init__(self, limit: Optional[int] = None):
        limit = MAX_DISPATCHES_AHEAD if limit is None else limit
        if limit < 1:
            raise ValueError(f"a dispatch window needs a limit of at least 1, got {limit}")
        self.limit = limit
        self._pending: collections.deque = collections.deque()

    def add(self, outputs: Any) -> None:
        self._pending.append(outputs)
        while len(self._pending) > self.limit:
            jax.block_until_ready(self._pending.popleft())

    def __len__(self) -> int:
        return len(self._pending)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A mesh over the first `num_devices` devices (all when None or 0), with one axis named `data`.

    With several processes the mesh must hold every process's devices, so `num_devices` may only be all of them.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(f"asked for {num_devices} devices, but a run of {jax.process_count()} processes uses "
                             f"all {len(devices)} (num_devices=0)")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` on `sharding`. With one process, `jax.device_put`. With several, `x` is a host value (or a process-local
    array) that is the same in every process, and each process puts only the parts its own devices hold (the mesh's
    other devices cannot be reached from here)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard among the same devices
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))


def _put_tree(tree: Any, sharding: NamedSharding) -> Any:
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every leaf of `tree` on every device of the mesh."""
    return _put_tree(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh, spec: P = P(AXIS)) -> Any:
    """Splits the leading (or `spec`-named) axis of every leaf across the mesh.

    `tree` holds the global values (the same in every process); each process transfers its devices' slices only.
    """
    return _put_tree(tree, NamedSharding(mesh, spec))


def place(tree: Any, mesh: Mesh, spec: Any = P()) -> Any:
    """Puts `tree` on the mesh with `spec` (a PartitionSpec, or a pytree prefix of PartitionSpecs)."""
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda x: isinstance(x, P))
    if isinstance(shardings, NamedSharding):
        return _put_tree(tree, shardings)
    return jax.tree.map(lambda sh, sub: _put_tree(sub, sh), shardings, tree,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
