"""Compute once, decide many times (ARCHITECTURE.md, "The compute cache").

What a stage computes — the columns its ``compute`` (or its whole ``process``) adds or rewrites,
and the rows it could not compute — is kept per row (by ``uid``) under the cache folder
(``OUT/_cache`` by default, or a folder several outputs share: ``pairsift run --cache DIR``):

    CACHE/<stage>-<fingerprint>/<shard identity>/<part>.parquet   uid, the columns, _drop_reason

The fingerprint covers everything that determines those values: pairsift's version, the stage's
name and ``version``, its ``computes`` config fields, and the fingerprints of every stage before
it (their computations may feed it); the shard identity covers the input shard's files, sizes and
modification times (or ETags). Change a model, an upstream computation or the input, and the
entries are simply not found: a stale entry can never be used. A run whose spec changes only
``decides`` fields finds every row and calls no model; a loosened upstream threshold computes
only the rows that are new.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.stages.base import COMPUTES

DROP = "_drop_reason"


def _version() -> str:
    try:
        return importlib_metadata.version("pairsift")
    except importlib_metadata.PackageNotFoundError:
        return "0"


def cache_root(spec) -> str | None:
    """Where the job's compute cache is: ``spec.cache`` (``--cache DIR``), else ``OUT/_cache``;
    None when caching is off (``cache: false``... expressed as an empty string)."""
    from pairsift.pipeline import layout

    if spec.cache == "":
        return None
    return spec.cache or layout.cache_dir(spec.output)


def compute_fingerprints(spec) -> list[str]:
    """One fingerprint per stage of the job: its computation and every computation before it."""
    from pairsift.stages import get_stage_class

    out, prev = [], _version()
    for entry in spec.stages:
        cls = get_stage_class(entry.name)
        d = {"stage": entry.name, "class": f"{cls.__module__}.{cls.__qualname__}", "version": cls.version,
             "computes": entry.config.part(COMPUTES), "before": prev}
        prev = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
        out.append(prev)
    return out


def shard_identity(shard) -> str:
    """What an input shard is: its files with their sizes and modification times (or ETags)."""
    from pairsift.pipeline.safety import _stamp

    fs, root = storage.fs_path(shard.path)
    files = [posixpath.join(root, f) for f in shard.files] if shard.files else [root]
    facts = [shard.kind, shard.rel]
    for f in files:
        try:
            info = fs.info(f)
            facts.append([posixpath.basename(f), int(info.get("size") or 0), _stamp(info)])
        except (FileNotFoundError, OSError):
            facts.append([posixpath.basename(f), None])
    return hashlib.sha256(json.dumps(facts, default=str).encode("utf-8", "surrogateescape")).hexdigest()[:20]


@dataclass
class StepCache:
    """One stage's cached rows for one input shard, loaded on first use; new rows are
    written as one part file when the shard is done."""

    folder: str
    loaded: dict[str, int] | None = None
    table: pa.Table | None = None
    new: list[pa.Table] = field(default_factory=list)
    reused: int = 0
    computed: int = 0

    def _load(self) -> None:
        if self.loaded is not None:
            return
        self.loaded = {}
        fs, p = storage.fs_path(self.folder)
        parts = sorted(x for x in fs.ls(p, detail=False) if x.endswith(".parquet")) if fs.exists(p) else []
        tables = []
        for part in parts:
            try:
                tables.append(pq.read_table(part, filesystem=fs))
            except Exception:  # noqa: BLE001 - a damaged part is a miss, never a wrong value
                continue
        if tables:
            self.table = pa.concat_tables(tables, promote_options="permissive")
            for i, uid in enumerate(self.table.column("uid").to_pylist()):
                self.loaded.setdefault(uid, i)

    def hits(self, uids: list[str]) -> np.ndarray:
        self._load()
        return np.array([u in self.loaded for u in uids], dtype=bool)

    def rows(self, uids: list[str]) -> pa.Table:
        """The cached rows of these uids (all present), in this order."""
        self._load()
        return self.table.take(pa.array([self.loaded[u] for u in uids], pa.int64()))

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.new.append(table)

    def close(self) -> None:
        if not self.new:
            return
        table = pa.concat_tables(self.new, promote_options="permissive")
        with storage.atomic_open(storage.join(self.folder, f"{uuid.uuid4().hex}.parquet")) as f:
            pq.write_table(table, f, compression="zstd")
        self.new = []


class ShardCaches:
    """The caches of every cacheable step a worker runs on one shard."""

    def __init__(self, root: str | None, fingerprints: list[str], names: list[str], shard: Any):
        self.root, self.fingerprints, self.names, self.shard = root, fingerprints, names, shard
        self._identity: str | None = None
        self.steps: dict[int, StepCache] = {}

    def get(self, index: int) -> StepCache | None:
        if self.root is None:
            return None
        if index not in self.steps:
            if self._identity is None:
                self._identity = shard_identity(self.shard)
            folder = storage.join(self.root, f"{self.names[index]}-{self.fingerprints[index]}", self._identity)
            self.steps[index] = StepCache(folder)
        return self.steps[index]

    def close(self) -> dict[str, dict[str, int]]:
        """Write the new rows; return {stage: {reused, computed}} for the shard's summary."""
        out = {}
        for index, cache in sorted(self.steps.items()):
            cache.close()
            out[f"{index}:{self.names[index]}"] = {"reused": cache.reused, "computed": cache.computed}
        return out
