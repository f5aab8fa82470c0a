"""The one-axis `data` mesh that every train step runs over, and helpers to place arrays on it."""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A mesh over the first `num_devices` devices (all when None or 0), with one axis named `data`."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every leaf of `tree` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh, spec: P = P(AXIS)) -> Any:
    """Splits the leading (or `spec`-named) axis of every leaf across the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, spec))


def place(tree: Any, mesh: Mesh, spec: Any = P()) -> Any:
    """Puts `tree` on the mesh with `spec` (a PartitionSpec, or a pytree prefix of PartitionSpecs)."""
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda x: isinstance(x, P))
    if isinstance(shardings, NamedSharding):
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda sh, sub: jax.device_put(sub, sh), shardings, tree,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
