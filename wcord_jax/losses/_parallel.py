"""Collective helpers shared by the losses (private).

Every loss takes `axis_name`. With `None` the helpers are identities and the loss is the plain single-device
function. With a name, the loss is being traced inside `jax.shard_map` over a one-axis mesh, each device holding an
equal-sized shard of the global batch.

Gathers are done with `psum` of a zero buffer in which each device has written its own block at its own offset. The
result is typed *device-invariant* under shard_map's varying-manual-axes checking (`check_vma=True`, the default),
unlike `lax.all_gather`, whose result is typed varying. This matters for two reasons:

* State computed from gathered values (CRD memory banks, the queue pointer) stays invariant, so it can be returned
  with `out_specs=P()`.
* A loss built only from invariant values is itself invariant. Differentiating it inside shard_map gives the global
  gradient with respect to replicated parameters directly: the transpose of the psum hands each device the cotangent
  of its own block, and the implicit broadcast of the parameters is transposed to a psum. No `pmean` of gradients is
  needed. Under `check_vma=False` (pmap-style semantics), the caller must `pmean` the gradients as usual.

`psum` adds zeros to each element, which is exact in floating point, so the gather is bit-exact. Its communication
is an all-reduce of the gathered size rather than an all-gather: negligible for batch-sized embeddings.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax


def axis_size(axis_name: Optional[str]) -> int:
    """Number of devices along `axis_name` (1 when None)."""
    return 1 if axis_name is None else lax.axis_size(axis_name)


def axis_index(axis_name: Optional[str]) -> jax.Array:
    """This device's position along `axis_name` (0 when None)."""
    return jnp.zeros((), jnp.int32) if axis_name is None else lax.axis_index(axis_name)


def gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
    """Tiled all-gather along the leading axis, typed device-invariant and differentiable.

    Device d's block lands at rows [d*b, (d+1)*b), the same order as `lax.all_gather(..., tiled=True)` and the same
    order in which `P(axis_name)` splits a global array, so the result is exactly the global batch.
    """
    if axis_name is None:
        return x
    n = lax.axis_size(axis_name)
    buf = jnp.zeros((n,) + x.shape, x.dtype)
    buf = lax.dynamic_update_index_in_dim(buf, x, lax.axis_index(axis_name), 0)
    buf = lax.psum(buf, axis_name)
    return buf.reshape((n * x.shape[0],) + x.shape[1:])


def psum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def pmean(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
    return x if axis_name is None else lax.pmean(x, axis_name)


def pmax(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
    return x if axis_name is None else lax.pmax(x, axis_name)
