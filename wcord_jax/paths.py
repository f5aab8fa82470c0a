"""Where a run's files live: a local path or a URI such as `gs://bucket/runs/x` (Cloud TPU), both as `epath.Path`.

Every file of a run (config.json, metrics.jsonl, TensorBoard events, orbax's checkpoint metadata) goes through
`etils.epath`; orbax writes the arrays themselves through tensorstore's own GCS driver.

`gs://` goes through fsspec's `gcsfs`, not `tf.io.gfile`: epath picks TensorFlow's file system whenever TensorFlow is
installed (it is, for tf.data) unless `EPATH_USE_TF` says no, and this module sets that default. One client then
writes every small file a run makes, and it is the client that honours `STORAGE_EMULATOR_HOST`, so the `gs://` path
is tested against a real storage server (TensorFlow's GCS file system has Google's endpoints built in and cannot be
pointed at one). `EPATH_USE_TF=true` in the environment restores TensorFlow's client.

gcsfs keeps no listings cache here: a run directory has several writers (tensorstore writes the arrays past gcsfs,
the other processes of a multi-host run, a resumed run, the run a tool is watching), and a cached listing would
hide their checkpoints from this process (`FSSPEC_GCS_USE_LISTINGS_CACHE=true` turns it back on).
"""
from __future__ import annotations

import os
from typing import Union

import fsspec.config
from etils import epath

os.environ.setdefault("EPATH_USE_TF", "false")
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
    """False for a URI (`gs://...`, `s3://...`), True for a path on this machine's file system."""
    return "://" not in os.fspath(path)


def workdir_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a local path made absolute as `os.path.abspath` does, a URI left as it is."""
    path = os.fspath(path)
    return epath.Path(os.path.abspath(path) if is_local(path) else path)
