"""Orbax checkpoints of a run: the last few under WORKDIR/checkpoints/last, the best under WORKDIR/checkpoints/best.

Each checkpoint holds the whole train state (parameters, batch statistics, optimizer state, PRNG key, step and any
method state) and a small JSON record (epoch, accuracy, model name). A finished run's directory is what later runs
load by path (`load_variables`).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores a run's state: keeps the `keep` latest checkpoints and the single best one."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        root = os.path.join(workdir, "checkpoints")
        self.last = _manager(os.path.join(root, "last"), keep, async_save)
        self.best = _manager(os.path.join(root, "best"), 1, async_save)

    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        for manager in (self.last, self.best) if best else (self.last,):
            if step in manager.all_steps():  # left by an earlier attempt at this step (a crash, a rewound run)
                manager.wait_until_finished()
                manager.delete(step)
            manager.save(step, args=args, force=True)

    def restore(self, state_like: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores into the structure, shapes and shardings of `state_like` (an initialised state)."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state_like)), meta=ocp.args.JsonRestore())
        restored = self.last.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()


def checkpoint_dir(workdir_or_dir: str, which: str = "last") -> str:
    """Accepts a run's workdir, its `checkpoints` folder or a manager folder, and returns the manager folder."""
    path = os.path.abspath(workdir_or_dir)
    for candidate in (os.path.join(path, "checkpoints", which), os.path.join(path, which), path):
        if os.path.isdir(candidate) and any(name.isdigit() for name in os.listdir(candidate)):
            return candidate
    raise FileNotFoundError(f"no checkpoint found under {workdir_or_dir} (expected {path}/checkpoints/{which}/<step>)")


def load_meta(workdir: str, which: str = "last") -> dict:
    """The JSON record of the latest checkpoint of a run."""
    mgr = ocp.CheckpointManager(checkpoint_dir(workdir, which))
    try:
        restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])
    finally:
        mgr.close()


def load_variables(workdir: str, which: str = "last") -> dict:
    """`{'params', 'batch_stats'}` of the latest (or best) checkpoint of a finished run, as host arrays."""
    mgr = ocp.CheckpointManager(checkpoint_dir(workdir, which))
    try:
        step = mgr.latest_step()
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        state = restored["state"]
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    finally:
        mgr.close()
