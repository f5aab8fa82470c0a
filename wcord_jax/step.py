"""The train step as the devices run it: the finiteness guard, and the compilation of a feed's per-device function
into one dispatch over the `data` mesh (`jax.shard_map`, then `jax.jit` with the state donated): several steps in a
`lax.scan`, or one step with no loop. The evaluators' dispatches are compiled here too. A feed supplies the batch
(`wcord_jax.feeds`); the loop (`wcord_jax.loop`) calls the dispatch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

NONFINITE = "nonfinite"  # the metric that flags a step whose loss, a logged term or the new weights were not finite
NONFINITE_MODES = ("stop", "skip")


def guard_nonfinite(step_fn: Callable, mode: str) -> Callable:
    """`step_fn` with a finiteness check on the device: every floating metric (the loss and each logged term) and the
    updated trainable weights; the result rides with the metrics as `nonfinite` (1.0 for a bad step), so that the
    host sees it when it next reads the metrics, without a transfer of its own. With `mode='skip'` a bad step's
    update is dropped on the device (the state stays as it was, only its step counter moves on)."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {mode!r}")

    def guarded(state, batch, *extra):
        new, metrics = step_fn(state, batch, *extra)
        leaves = [v for v in jax.tree.leaves(metrics) + jax.tree.leaves(new.params)
                  if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
        if mode == "skip":
            kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
            new = kept.replace(step=new.step)
        return new, {**metrics, NONFINITE: 1.0 - finite.astype(jnp.float32)}

    return guarded


def scan_steps(body: Callable, state, idx):
    """`body(state, idx[i]) -> (state, metrics)` for every row of `idx`, metrics stacked on a leading axis."""
    if idx.shape[0] == 1:
        # No loop for a single step: XLA:CPU runs convolution gradients inside a while loop ~20x slower.
        state, metrics = body(state, idx[0])
        return state, jax.tree.map(lambda m: m[None], metrics)
    return lax.scan(body, state, idx)


def compile_dispatch(per_device: Callable, mesh, state_spec, num_extra: int, feed_specs: tuple) -> Callable:
    """`per_device(state, *extra, *feed_args) -> (state, metrics)` as one jitted dispatch over the mesh: the state
    split by `state_spec` and donated, `extra` (what the step reads but does not update: a frozen teacher's
    variables) replicated, the feed's arguments by `feed_specs`; the metrics come back replicated."""
    in_specs = (state_spec,) + (P(),) * num_extra + tuple(feed_specs)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=(state_spec, P()))
    return jax.jit(mapped, donate_argnums=(0,))


def compile_evaluator(per_device: Callable, mesh, in_specs: tuple) -> Callable:
    """`per_device(variables, *args) -> sums` (already summed over the mesh) as one jitted dispatch."""
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=tuple(in_specs), out_specs=P()))
