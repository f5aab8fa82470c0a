"""Orbax checkpoints of a run: the last few under WORKDIR/checkpoints/last, the best under WORKDIR/checkpoints/best.

Each checkpoint holds the whole train state (parameters, batch statistics, optimizer state, PRNG key, step and any
method state) and a small JSON record (epoch, accuracy, model name). A finished run's directory is what later runs
load by path (`load_variables`).

Workdirs may be local paths or `gs://` URIs (`wcord_jax.paths`). With several processes, every process makes the
same calls (save, restore, close) and orbax writes and reads each process's own shards.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from wcord_jax.paths import PathLike, workdir_path

log = logging.getLogger("wcord_jax")


class CheckpointError(RuntimeError):
    """No finished checkpoint of a run could be read."""


def reason(e: Exception) -> str:
    """One short line for an exception (its type and first line)."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _manager(directory: PathLike, keep: int, async_save: bool, name: str) -> ocp.CheckpointManager:
    # With several processes, orbax synchronises them with barriers named by the step: two managers saving the same
    # step at once (last and best) need their own names.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"wcord_jax_{name}"))
    return ocp.CheckpointManager(workdir_path(directory), options=options)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores a run's state: keeps the `keep` latest checkpoints and the single best one."""

    def __init__(self, workdir: PathLike, keep: int = 3, async_save: bool = True):
        root = workdir_path(workdir) / "checkpoints"
        self.last = _manager(root / "last", keep, async_save, "last")
        self.best = _manager(root / "best", 1, async_save, "best")

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
        """Restores into the structure, shapes and shardings of `state_like` (an initialised state).

        Without `step`, the newest finished checkpoint that can be read: a damaged one (a truncated or deleted file:
        a full disk, a killed copy) is passed over with a warning naming it and the one restored instead.
        CheckpointError when none can be read."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state_like)), meta=ocp.args.JsonRestore())
        if step is not None:
            restored = self.last.restore(step, args=args)
            return restored["state"], dict(restored["meta"])
        failed = []
        for candidate in sorted(self.last.all_steps(), reverse=True):
            self._check_layout(candidate, state_like)
            try:
                restored = self.last.restore(candidate, args=args)
            except Exception as e:  # orbax / tensorstore raise many kinds for a damaged file
                failed.append((candidate, reason(e)))
                log.warning("checkpoint at step %d cannot be read (%s)", candidate, failed[-1][1])
                continue
            if failed:
                log.warning("restored the checkpoint at step %d instead of the damaged one(s) at step %s",
                            candidate, ", ".join(str(f) for f, _ in failed))
            return restored["state"], dict(restored["meta"])
        where = os.fspath(self.last.directory)
        raise CheckpointError(f"no checkpoint in {where} can be read (steps "
                              f"{', '.join(str(f) for f, _ in failed)}; newest: {failed[0][1] if failed else '-'}): "
                              "move the folder away to start the run over")

    def _check_layout(self, step: int, state_like: Any) -> None:
        """CheckpointError if the checkpoint at `step` is readable but holds a state of another layout than
        `state_like` (another version of the library or other settings wrote it): that is no damage, and older
        steps would not do either."""
        try:
            path = workdir_path(self.last.directory) / str(step) / "state"
            saved = ocp.StandardCheckpointHandler().metadata(path).tree
        except Exception:  # unreadable metadata: the damage the caller passes over
            return
        theirs, ours = _leaf_paths(saved), _leaf_paths(state_like)
        if saved is None or not theirs or theirs == ours:
            return
        extra, missing = sorted(theirs - ours), sorted(ours - theirs)
        detail = "; ".join(part for part in (
            f"only in the checkpoint: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "",
            f"only in this run: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "")
            if part)
        raise CheckpointError(
            f"the checkpoint at step {step} in {os.fspath(self.last.directory)} holds a state of another layout than "
            f"this run's ({detail}): another version of wcord_jax or other settings (another number of teachers, "
            "say) wrote it. Resume it with what wrote it, or start this run in a new workdir; its network still loads (rundir.load_network, the probe, the "
            "pictures)")

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()


def _leaf_paths(tree: Any) -> set:
    """The paths of a tree's leaves as 'a/b/0' strings, whatever containers hold them (a dataclass, a dict, the
    dict orbax's metadata gives back)."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path) for path, _ in leaves}


def checkpoint_dir(workdir_or_dir: PathLike, which: str = "last") -> str:
    """Accepts a run's workdir, its `checkpoints` folder or a manager folder, and returns the manager folder."""
    path = workdir_path(workdir_or_dir)
    for candidate in (path / "checkpoints" / which, path / which, path):
        if candidate.is_dir() and any(child.name.isdigit() for child in candidate.iterdir()):
            return os.fspath(candidate)
    raise FileNotFoundError(f"no checkpoint found under {os.fspath(workdir_or_dir)} "
                            f"(expected {os.fspath(path)}/checkpoints/{which}/<step>)")


def _reader(workdir: PathLike, which: str) -> ocp.CheckpointManager:
    """A read-only manager of a finished run's checkpoints, knowing how its items were written."""
    return ocp.CheckpointManager(checkpoint_dir(workdir, which), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def load_meta(workdir: PathLike, which: str = "last") -> dict:
    """The JSON record of the latest checkpoint of a run."""
    mgr = _reader(workdir, which)
    try:
        restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])
    finally:
        mgr.close()


def load_checkpoint(workdir: PathLike, which: str = "last") -> tuple[dict, dict]:
    """(the whole train state, its metadata) of the latest (or best) checkpoint of a run, read from one step by one
    reader (a run still writing checkpoints cannot pair one step's metadata with another's state). The state comes
    as nested dicts and lists of host (numpy) arrays, whatever devices (or processes) wrote it, so that a run on
    other devices can place them."""
    mgr = _reader(workdir, which)
    try:
        step = mgr.latest_step()
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), mgr.item_metadata(step)["state"])
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])
    finally:
        mgr.close()


def load_state(workdir: PathLike, which: str = "last") -> dict:
    """The whole train state of the latest (or best) checkpoint of a run (`load_checkpoint` without the metadata)."""
    return load_checkpoint(workdir, which)[0]


def variables_of(state: dict) -> dict:
    """`{'params', 'batch_stats'}` of a restored train state."""
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def load_variables(workdir: PathLike, which: str = "last") -> dict:
    """`{'params', 'batch_stats'}` of the latest (or best) checkpoint of a finished run, as host (numpy) arrays."""
    return variables_of(load_state(workdir, which))
