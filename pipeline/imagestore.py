"""Image bytes are written once (ARCHITECTURE.md, "Image bytes are written once").

Work shards carry columns only. The readers record where each image's bytes are in its source
(:data:`~pairsift.pipeline.table.LOCATOR_SCHEMA`); bytes that exist nowhere else — a gzip'd
tar's members, downloads, transcoded images — are put by the phase that holds them in the
shard's image store (``OUT/_work/images/<shard>/p<k>.parquet``: uid, image). A later phase
whose stages need pixels, and the emit, get the bytes back with :func:`fetch_images`: from
the store, or from the source — ranged reads of a plain tar (nearby ranges coalesced into one
read), a folder's file, a Parquet file's row groups.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import layout, storage
from pairsift.pipeline.table import live_mask

#: Ranges of a tar closer than this are read in one request.
COALESCE_GAP = 1 << 20


class ImageStoreWriter:
    """Collects (uid, image) of one shard in one phase; writes the store file at ``close``
    (atomically, before the shard's commit), or nothing when no row needed storing."""

    def __init__(self, output: str, shard: str, phase: int):
        self.path = layout.image_store(output, shard, phase)
        self.uids: list[str] = []
        self.images: list[bytes] = []
        self.bytes = 0

    def add_unlocated(self, batch: pa.Table) -> None:
        """Store the live rows whose bytes are in memory and whose locator is null."""
        if "image" not in batch.column_names or not batch.num_rows:
            return
        offsets = batch.column("image_offset") if "image_offset" in batch.column_names else None
        live = live_mask(batch)
        images = batch.column("image")
        need = live & ~np.asarray(images.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if offsets is not None:
            need &= np.asarray(offsets.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(need)
        if rows.size:
            uids = batch.column("uid").to_pylist()
            data = images.to_pylist()
            for i in rows:
                self.uids.append(uids[i])
                self.images.append(data[i])
                self.bytes += len(data[i])

    def close(self) -> int:
        if not self.uids:
            return 0
        table = pa.table({"uid": pa.array(self.uids, pa.string()), "image": pa.array(self.images, pa.binary())})
        with storage.atomic_open(self.path) as f:
            pq.write_table(table, f, compression="NONE")
        return self.bytes


def _stored(output: str, shard: str, want: set[str]) -> dict[str, bytes]:
    """The stored bytes of ``want`` uids of one shard (every phase's store file)."""
    folder = layout.image_store_dir(output, shard)
    fs, p = storage.fs_path(folder)
    found: dict[str, bytes] = {}
    if not want or not fs.exists(p):
        return found
    for name in sorted(fs.ls(p, detail=False)):
        if not name.endswith(".parquet"):
            continue
        t = pq.read_table(name, filesystem=fs)
        for uid, data in zip(t.column("uid").to_pylist(), t.column("image").to_pylist()):
            if uid in want:
                found[uid] = data
    return found


def _tar_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes at (offset, size) ranges of one file, nearby ranges coalesced into one read."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    out: list[bytes | None] = [None] * len(ranges)
    fs, p = storage.fs_path(path)
    with fs.open(p, "rb") as f:
        i = 0
        while i < len(order):
            start = ranges[order[i]][0]
            end = start + ranges[order[i]][1]
            j = i + 1
            while j < len(order) and ranges[order[j]][0] - end <= COALESCE_GAP:
                end = max(end, ranges[order[j]][0] + ranges[order[j]][1])
                j += 1
            f.seek(start)
            block = f.read(end - start)
            for k in order[i:j]:
                off, size = ranges[k]
                out[k] = block[off - start: off - start + size]
            i = j
    return out  # type: ignore[return-value]


def _parquet_rows(path: str, rows: list[int], column: str) -> list[bytes | None]:
    """The image column's value of the given rows of a Parquet file (only their row groups read)."""
    fs, p = storage.fs_path(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        values: dict[int, Any] = {}
        for g in groups:
            col = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
            for r in rows:
                if starts[g] <= r < starts[g + 1]:
                    values[r] = col[r - starts[g]]
    out = []
    for r in rows:
        v = values.get(r)
        out.append(v.get("bytes") if isinstance(v, dict) else v)
    return out


def fetch_images(batch: pa.Table, shard: Any, input_spec: Any, output: str, rows: np.ndarray | None = None
                 ) -> list[bytes | None]:
    """The image bytes of ``batch``'s ``rows`` (default: its live rows; others get None),
    from the shard's image store or from the source by locator."""
    n = batch.num_rows
    out: list[bytes | None] = [None] * n
    if rows is None:
        rows = np.flatnonzero(live_mask(batch))
    if not len(rows):
        return out
    uids = batch.column("uid").to_pylist()
    cols = batch.column_names
    offsets = batch.column("image_offset").to_pylist() if "image_offset" in cols else [None] * n
    sizes = batch.column("image_size").to_pylist() if "image_size" in cols else [None] * n
    stored_wanted = {uids[i] for i in rows if offsets[i] is None}
    stored = _stored(output, shard.name, stored_wanted)
    by_file: dict[str, list[int]] = {}
    for i in rows:
        if offsets[i] is None:
            out[i] = stored.get(uids[i])
        elif shard.kind == "folder":  # the chunk's file number: the raw name, whatever it holds
            fs, root = storage.fs_path(shard.path)
            out[i] = fs.cat_file(posixpath.join(root, shard.files[offsets[i]]))
        else:
            by_file.setdefault(shard.path, []).append(int(i))
    for path, idx in by_file.items():
        if shard.kind == "parquet":
            got = _parquet_rows(path, [offsets[i] for i in idx], input_spec.image_column)
        else:
            got = _tar_ranges(path, [(offsets[i], sizes[i]) for i in idx])
        for i, data in zip(idx, got):
            out[i] = data
    return out


def remove_stores(output: str) -> None:
    storage.remove_tree(layout.image_store_dir(output))
