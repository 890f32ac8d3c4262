"""Emit: re-pack the kept rows into training shards of ``emit.shard_size``.

``OUT/shards/NNNNNN.tar`` is a WebDataset shard (``{uid}.jpg|png|webp``, ``{uid}.txt``,
``{uid}.json`` with every score) that open_clip's training loader reads as is, and
``OUT/metadata/NNNNNN.parquet`` holds the same rows without pixels. Output shard ``k`` holds
kept rows ``[k*S, (k+1)*S)`` in input order, so the layout does not depend on how many
workers ran. Tar members carry fixed owners and times: the same rows give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.pipeline.images import to_trainable


@dataclass(frozen=True)
class Slice:
    path: str  # a final-phase work shard (kept rows only)
    start: int
    stop: int


@dataclass(frozen=True)
class EmitTask:
    index: int
    slices: tuple[Slice, ...]

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    @property
    def samples(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


def plan_emit(work_shards: list[tuple[str, int]], shard_size: int) -> list[EmitTask]:
    """Cut the concatenation of ``(path, kept_rows)`` into tasks of ``shard_size`` rows."""
    tasks: list[EmitTask] = []
    current: list[Slice] = []
    room = shard_size
    for path, n in work_shards:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Slice(path, start, start + take))
            start += take
            room -= take
            if room == 0:
                tasks.append(EmitTask(len(tasks), tuple(current)))
                current, room = [], shard_size
    if current:
        tasks.append(EmitTask(len(tasks), tuple(current)))
    return tasks


def _json_safe(value):
    if isinstance(value, bytes):
        return None
    if isinstance(value, float) and value != value:
        return None
    return value


def _json_columns(schema: pa.Schema) -> list[str]:
    """Columns that go into each sample's .json: all but pixels and embedding vectors."""
    out = []
    for f in schema:
        t = f.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        if (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(t.value_type):
            continue
        out.append(f.name)
    return out


def _read_slices(task: EmitTask) -> pa.Table:
    parts = []
    for s in task.slices:
        fs, p = storage.fs_path(s.path)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            seen = 0
            for rb in pf.iter_batches(batch_size=1024):
                lo, hi = max(s.start - seen, 0), min(s.stop - seen, rb.num_rows)
                if lo < hi:
                    parts.append(pa.Table.from_batches([rb.slice(lo, hi - lo)]))
                seen += rb.num_rows
                if seen >= s.stop:
                    break
    return pa.concat_tables(parts, promote_options="permissive")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_emit_shard(output: str, task: EmitTask) -> dict:
    """Write one training shard and its metadata; return {name, samples, bytes}."""
    table = _read_slices(task)
    json_cols = _json_columns(table.schema)
    meta_cols = {c: table.column(c).to_pylist() for c in json_cols}
    images = table.column("image").to_pylist()
    captions = table.column("caption").to_pylist()
    uids = table.column("uid").to_pylist()
    exts, transcoded = [], []
    tar_path = storage.join(output, "shards", f"{task.name}.tar")
    with storage.atomic_open(tar_path) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i, uid in enumerate(uids):
                data, ext = to_trainable(images[i])
                exts.append(ext)
                transcoded.append(data is not images[i])
                _add(tf, f"{uid}.{ext}", data)
                _add(tf, f"{uid}.txt", (captions[i] or "").encode("utf-8"))
                record = {c: _json_safe(meta_cols[c][i]) for c in json_cols}
                _add(tf, f"{uid}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    meta = table.drop_columns(["image"])
    meta = meta.append_column("shard", pa.array([f"{task.name}.tar"] * meta.num_rows, pa.string()))
    meta = meta.append_column("image_ext", pa.array(exts, pa.string()))
    meta = meta.append_column("transcoded", pa.array(transcoded, pa.bool_()))
    with storage.atomic_open(storage.join(output, "metadata", f"{task.name}.parquet")) as f:
        pq.write_table(meta, f, compression="zstd")
    fs, p = storage.fs_path(tar_path)
    return {"name": f"{task.name}.tar", "samples": table.num_rows, "bytes": fs.size(p)}
