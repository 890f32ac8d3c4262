"""Stage ``exact_dedup``: identical image bytes are one sample.

Exact-duplicate removal as in LAION-5B and DataComp's pool construction (Gadre et al. 2023,
which dedups on exact hashes before any model-based filter). Rule: the SHA-256 of each live
row's image bytes is computed (``image_sha256``, its first 16 bytes); of every group of rows
with the same hash the row with the smallest ``uid`` is the representative and is kept, every
other member is dropped with reason ``exact_dedup`` and ``dup_of`` set to the representative's
uid. Because the choice depends only on uids, the result is the same for any sharding and
worker count.

Hash-partitioned, so that no process ever holds the pool (ARCHITECTURE.md, "Global stages at
scale"): the map part hashes; the scan (reading only ``uid`` and the hash) writes each shard's
(hash, uid) pairs into ``partitions`` spill files by hash prefix; the driver only sums counts;
one reduce task per partition resolves it with DuckDB (group by hash, smallest uid) and writes
that partition's decisions (shard, uid, representative) sorted by shard; ``apply`` reads only
the rows of its own shard from them (Parquet row-group statistics prune the rest).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import GlobalStage, StageConfig, runtime

HASH = "image_sha256"
#: Rows a reduce task aims at (several small partitions go to one task).
TASK_ROWS = 4_000_000
_SPILL = pa.schema([("hash", pa.binary(16)), ("uid", pa.string()), ("shard", pa.string())])


class ExactDedupConfig(StageConfig):
    #: Spill partitions by hash prefix (fixed, so the output does not depend on the cluster);
    #: reduce tasks take consecutive partitions up to :data:`TASK_ROWS` rows (at 10^9 samples,
    #: 64 partitions of about 16M rows: a DuckDB group-by each).
    partitions: int = runtime(64, ge=1, le=65536)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def _spill_files(folder: str) -> list[str]:
    """The spill files one partition folder holds (one a shard that wrote to it; a file a killed
    attempt left half-written has a temporary name and is not one of them)."""
    fs, p = storage.fs_path(folder)
    return sorted(f for f in fs.ls(p, detail=False) if f.endswith(".parquet"))


class ExactDedupStage(GlobalStage[ExactDedupConfig]):
    name = "exact_dedup"
    scores = ()

    def process(self, batch: pa.Table) -> pa.Table:
        live = live_mask(batch)
        images = batch.column("image").to_pylist()
        hashes = [_digest(d) if ok and d is not None else None for ok, d in zip(live, images)]
        return set_column(batch, HASH, hashes, pa.binary(16))

    def scan_columns(self, pass_name: str) -> tuple[str, ...]:
        return ("uid", HASH)

    def scan(self, batch: pa.Table, pass_name: str, state: Any) -> pa.Table:
        live = pa.array(live_mask(batch) & ~np.asarray(batch.column(HASH).is_null().to_numpy(zero_copy_only=False)))
        rows = batch.filter(live)
        return pa.table({"hash": rows.column(HASH), "uid": rows.column("uid")})

    def _part_dir(self, p: int) -> str:
        return storage.join(self.work_dir, "partitions", f"{p:05d}")

    def _decisions(self, p: int) -> str:
        return storage.join(self.work_dir, "decisions", f"{p:05d}.parquet")

    def combine(self, partials: list[pa.Table], pass_name: str) -> dict:
        """Spill this shard's (hash, uid) pairs into the partitions by hash prefix."""
        n = self.config.partitions
        parts = [t for t in partials if t.num_rows]
        if not parts:
            return {"rows": 0}
        t = pa.concat_tables(parts)
        hashes = t.column("hash").to_pylist()
        prefix = np.array([int.from_bytes(h[:4], "big") for h in hashes], dtype=np.uint64)
        which = (prefix * np.uint64(n)) >> np.uint64(32)  # the top bits: partitions are hash ranges
        t = t.append_column("shard", pa.array([self.shard.name] * t.num_rows, pa.string()))
        for p in np.unique(which):
            rows = t.filter(pa.array(which == p))
            with storage.atomic_open(storage.join(self._part_dir(int(p)), f"{self.shard.name}.parquet")) as f:
                pq.write_table(rows.cast(_SPILL), f)
        parts, counts = np.unique(which, return_counts=True)
        return {"rows": t.num_rows, "partitions": parts.astype(np.int32), "counts": counts.astype(np.int64),
                "shard": self.shard.name}

    def merge(self, partials, pass_name: str, state: Any) -> dict:
        rows, spilled, sizes = 0, {}, Counter()
        for p in partials:
            rows += p["rows"]
            for q, n in zip(p.get("partitions", ()), p.get("counts", ())):
                spilled[int(q)] = spilled.get(int(q), 0) + 1  # shards that wrote to it (their files are listed)
                sizes[int(q)] += int(n)
        return {"rows": rows, "spilled": spilled, "sizes": dict(sizes)}

    def reduce_tasks(self, pass_name: str, state: dict) -> list[list[int]]:
        """Partitions grouped into tasks of about :data:`TASK_ROWS` rows. A small pool is one
        task; a large one, many in parallel."""
        tasks, current, held = [], [], 0
        for q in sorted(state.get("spilled", {})):
            current.append(q)
            held += state["sizes"].get(q, 0)
            if held >= TASK_ROWS:
                tasks.append(current)
                current, held = [], 0
        return tasks + ([current] if current else [])

    def reduce(self, pass_name: str, task: list[int], state: dict) -> list[dict]:
        return [self._resolve(q) for q in task]

    def _resolve(self, task: int) -> dict:
        """Resolve one partition: every non-representative member of a duplicate group."""
        import duckdb

        fs, _ = storage.fs_path(self._part_dir(task))
        files = _spill_files(self._part_dir(task))
        con = duckdb.connect()
        con.register("spill", pq.ParquetDataset(files, filesystem=fs).read())
        dec = con.sql("""
            WITH g AS (SELECT hash, min(uid) AS rep, count(*) AS n FROM spill GROUP BY hash HAVING count(*) > 1)
            SELECT s.shard, s.uid, g.rep FROM spill s JOIN g USING (hash) WHERE s.uid <> g.rep
            ORDER BY s.shard, s.uid""").fetch_arrow_table()
        with storage.atomic_open(self._decisions(task)) as f:
            pq.write_table(dec, f, row_group_size=1024)  # apply reads its shard's rows: small groups prune well
        groups = con.execute("SELECT count(*) FROM (SELECT hash FROM spill GROUP BY hash HAVING count(*) > 1)").fetchone()
        return {"partition": task, "dropped": dec.num_rows, "groups": int(groups[0])}

    def reduced(self, pass_name: str, state: dict, results: list[list[dict]]) -> dict:
        results = [r for group in results for r in group]
        return {"rows": state["rows"], "dropped": sum(r["dropped"] for r in results),
                "groups": sum(r["groups"] for r in results), "partitions": sorted(r["partition"] for r in results),
                "token": uuid.uuid4().hex}

    def _shard_decisions(self, state: dict) -> dict[str, str]:
        key = (state.get("token"), self.shard.name)
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        import pyarrow.dataset as ds

        paths = [self._decisions(p) for p in state["partitions"]]
        out: dict[str, str] = {}
        if paths:
            fs, _ = storage.fs_path(paths[0])
            dataset = ds.dataset([storage.fs_path(p)[1] for p in paths], format="parquet", filesystem=fs)
            t = dataset.to_table(filter=ds.field("shard") == self.shard.name, columns=["uid", "rep"])
            out = dict(zip(t.column("uid").to_pylist(), t.column("rep").to_pylist()))
        self._cached = (key, out)
        return out

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        reps = self._shard_decisions(state) if batch.num_rows and state.get("partitions") else {}
        dup_of = [reps.get(u) for u in batch.column("uid").to_pylist()]
        batch = set_column(batch, "dup_of", dup_of, pa.string())
        return mark_dropped(batch, ["exact_dedup" if r is not None else None for r in dup_of], self.name)

    def finalize(self, state: dict, output: str) -> dict[str, Any]:
        storage.remove_tree(storage.join(self.work_dir, "partitions"))
        return {"duplicate_groups": state.get("groups", 0), "duplicates": state.get("dropped", 0)}
