"""Synthetic rows for global-stage tests, and ``drive``: a global stage run in-process over
shards given as lists of batches, by the engine's own pass loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pairsift.pipeline.runner import run_global_stage
from pairsift.pipeline.table import BASE_SCHEMA


def base_rows(uids: list[str], extra: dict[str, pa.Array] | None = None, dropped: set[str] = frozenset()) -> pa.Table:
    """Rows of the base schema (tiny fake image bytes) plus ``extra`` columns."""
    n = len(uids)
    cols = {
        "uid": pa.array(uids, pa.string()),
        "key": pa.array(uids, pa.string()),
        "source": pa.array(["synthetic"] * n, pa.string()),
        "url": pa.nulls(n, pa.string()),
        "caption": pa.array([f"caption {u}" for u in uids], pa.string()),
        "image": pa.array([None if u in dropped else b"img" for u in uids], pa.binary()),
        "drop_reason": pa.array(["earlier" if u in dropped else None for u in uids], pa.string()),
        "drop_stage": pa.array(["earlier" if u in dropped else None for u in uids], pa.string()),
    }
    table = pa.table(cols, schema=BASE_SCHEMA)
    for name, arr in (extra or {}).items():
        table = table.append_column(name, arr)
    return table


def embedding_array(x: np.ndarray, fixed: bool = False) -> pa.Array:
    """float16/32 rows as list<float> (or fixed_size_list) Arrow array."""
    flat = pa.array(np.ascontiguousarray(x).reshape(-1))
    if fixed:
        return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def split(table: pa.Table, shard_sizes: list[int], batch_size: int) -> list[list[pa.Table]]:
    """Cut ``table`` into shards of the given sizes, each into batches of ``batch_size``."""
    assert sum(shard_sizes) == table.num_rows
    shards, start = [], 0
    for size in shard_sizes:
        shard = table.slice(start, size)
        shards.append([shard.slice(b, batch_size) for b in range(0, size, batch_size)] or [shard.slice(0, 0)])
        start += size
    return shards


def drive(stage, shards: list[list[pa.Table]], output: str | None = None) -> tuple[object, pa.Table, dict]:
    """(final state, the applied rows of every shard concatenated, finalize's facts): the
    engine's own in-memory driver (:func:`pairsift.pipeline.runner.run_global_stage`)."""
    return run_global_stage(stage, shards, output)
