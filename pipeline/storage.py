"""Files on local disks or object stores (through fsspec), written atomically.

Every output is written under a temporary name and published by a rename, so a reader never
sees a half-written file. On object stores a "rename" is a copy; the ledger marker written
after it is what commits a shard.
"""

from __future__ import annotations

import json
import os
import pickle
import posixpath
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pairsift.pipeline.errors import ConfigError


def is_url(path: str) -> bool:
    """Whether ``path`` names an object store / remote filesystem (``s3://``, ``gs://``, ...)
    rather than a local path (``file://`` counts as local)."""
    return "://" in str(path) and not str(path).startswith("file://")


def require_local(path: str, command: str) -> None:
    """Raise a ConfigError for commands that read only local outputs (stats, status, report)."""
    if is_url(path):
        raise ConfigError(f"pairsift {command} reads a local output folder, and {path} is a URL: copy it "
                          f"first (manifest.json, metadata/, rejected/ and _work/ are enough, e.g. "
                          f"`aws s3 sync {path} LOCAL --exclude 'shards/*'`) and run it on the copy")


def fs_path(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, p = fsspec.core.url_to_fs(path)
    except ImportError as e:  # e.g. s3:// without s3fs: fsspec says which package to install
        raise ConfigError(f"{path}: {e} (for s3:// install pairsift[s3])") from None
    return fs, p


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def exists(path: str) -> bool:
    fs, p = fs_path(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = fs_path(path)
    fs.makedirs(p, exist_ok=True)


@contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``path`` for writing under a temporary name; publish it on success."""
    fs, p = fs_path(path)
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, p)
        else:
            fs.mv(tmp, p)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def write_json(path: str, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def read_json(path: str) -> Any:
    fs, p = fs_path(path)
    with fs.open(p, "r") as f:
        return json.load(f)


def write_pickle(path: str, obj: Any) -> None:
    with atomic_open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def read_pickle(path: str) -> Any:
    fs, p = fs_path(path)
    with fs.open(p, "rb") as f:
        return pickle.load(f)


def remove_tree(path: str) -> None:
    fs, p = fs_path(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def list_dir(path: str) -> list[str]:
    fs, p = fs_path(path)
    if not fs.exists(p):
        return []
    return sorted(posixpath.basename(x) for x in fs.ls(p, detail=False))
