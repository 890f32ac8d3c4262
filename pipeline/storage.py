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


def fs_path(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, p = fsspec.core.url_to_fs(path)
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
