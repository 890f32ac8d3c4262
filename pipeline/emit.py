"""Emit: re-pack the kept rows into training shards of ``emit.shard_size``.

``OUT/shards/NNNNNN.tar`` is a WebDataset shard (``{uid}.jpg|png|webp``, ``{uid}.txt``,
``{uid}.json`` with every score) that open_clip's training loader reads as is, and
``OUT/metadata/NNNNNN.parquet`` holds the same rows without pixels. Output shard ``k`` holds
kept rows ``[k*S, (k+1)*S)`` in input order, so the layout does not depend on how many
workers ran. Tar members carry fixed owners and times: the same rows give the same bytes.

Each ``.txt`` holds the original caption unless ``emit.caption_policy`` says otherwise
(:class:`CaptionPolicy`): ``recaption`` puts the ``recaption`` column there, ``mix`` the
original with probability ``p_original`` and the recaption otherwise, decided per sample by
hash(seed, uid) as Recap-DataComp mixes its captions; the ``.json`` carries both.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import layout, storage
from pairsift.pipeline.images import to_trainable
from pairsift.pipeline.imagestore import fetch_images
from pairsift.pipeline.table import LOCATOR_COLUMNS


@dataclass(frozen=True)
class Slice:
    path: str  # a final-phase work shard (kept rows only)
    start: int
    stop: int
    shard: Any = None  # the input shard those rows came from: where their image bytes are


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


def plan_emit(work_shards: list[tuple], shard_size: int) -> list[EmitTask]:
    """Cut the concatenation of ``(path, kept_rows[, input shard])`` into tasks of
    ``shard_size`` rows."""
    tasks: list[EmitTask] = []
    current: list[Slice] = []
    room = shard_size
    for path, n, *rest in work_shards:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Slice(path, start, start + take, rest[0] if rest else None))
            start += take
            room -= take
            if room == 0:
                tasks.append(EmitTask(len(tasks), tuple(current)))
                current, room = [], shard_size
    if current:
        tasks.append(EmitTask(len(tasks), tuple(current)))
    return tasks


@dataclass(frozen=True)
class CaptionPolicy:
    """Which text goes into each sample's ``.txt``: ``original`` (the caption),
    ``recaption`` (column ``column``; a list of rewrites gives one picked by hash(seed, uid)),
    or ``mix`` (the original with probability ``p_original``, by hash(seed, uid)). A sample
    without a recaption (its generation failed) keeps its original caption."""

    policy: str = "original"
    p_original: float = 0.8
    seed: int = 0
    column: str = "recaption"

    def _unit(self, uid: str, salt: str) -> float:
        h = hashlib.blake2b(f"{self.seed}\x1f{uid}\x1f{salt}".encode("utf-8", "surrogateescape"), digest_size=8)
        return int.from_bytes(h.digest(), "big") / 2.0**64

    def choose(self, uid: str, caption: str | None, recaption) -> tuple[str, str]:
        """(text, "original" | "recaption") for one sample."""
        if isinstance(recaption, (list, tuple)):
            options = [r for r in recaption if r]
            recaption = options[int(self._unit(uid, "rewrite") * len(options))] if options else None
        if self.policy == "original" or not recaption:
            return caption or "", "original"
        if self.policy == "mix" and self._unit(uid, "mix") < self.p_original:
            return caption or "", "original"
        return recaption, "recaption"


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


def read_slice(s: Slice, drop: tuple[str, ...] = ()) -> pa.Table | None:
    """Rows [start, stop) of a final-phase work shard, without the ``drop`` columns."""
    parts = []
    fs, p = storage.fs_path(s.path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [n for n in pf.schema_arrow.names if n not in drop]
        seen = 0
        for rb in pf.iter_batches(batch_size=4096, columns=columns):
            lo, hi = max(s.start - seen, 0), min(s.stop - seen, rb.num_rows)
            if lo < hi:
                parts.append(pa.Table.from_batches([rb.slice(lo, hi - lo)]))
            seen += rb.num_rows
            if seen >= s.stop:
                break
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _read_slices(task: EmitTask, output: str, input_spec: Any) -> pa.Table:
    """The task's rows; their image bytes fetched back from where they are (the shard's image
    store or the source) unless the work shard carries them."""
    parts = []
    for s in task.slices:
        rows = read_slice(s)
        if rows is None:
            continue
        if "image" not in rows.column_names and s.shard is not None:
            images = fetch_images(rows, s.shard, input_spec, output, rows=np.arange(rows.num_rows))
            rows = rows.append_column("image", pa.array(images, pa.binary()))
        parts.append(rows)
    return pa.concat_tables(parts, promote_options="permissive")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_emit_shard(output: str, task: EmitTask, captions_from: CaptionPolicy | None = None,
                     input_spec: Any = None) -> dict:
    """Write one training shard and its metadata; return {name, samples, bytes}."""
    table = _read_slices(task, output, input_spec)
    table = table.drop_columns([c for c in LOCATOR_COLUMNS if c in table.column_names])
    # The final phase already made every image trainable (and says which it transcoded).
    was_transcoded = table.column("transcoded").to_pylist() if "transcoded" in table.column_names else None
    if was_transcoded is not None:
        table = table.drop_columns(["transcoded"])
    uids = table.column("uid").to_pylist()
    captions = table.column("caption").to_pylist()
    policy = captions_from or CaptionPolicy()
    if policy.policy != "original":  # the .txt text, and where it came from (json + metadata)
        if policy.column not in table.column_names:
            raise ValueError(f"emit.caption_policy {policy.policy!r} needs column {policy.column!r}, "
                             f"which no stage wrote")
        picked = [policy.choose(u, c, r) for u, c, r in zip(uids, captions, table.column(policy.column).to_pylist())]
        captions = [p[0] for p in picked]
        table = table.append_column("text_source", pa.array([p[1] for p in picked], pa.string()))
    json_cols = _json_columns(table.schema)
    meta_cols = {c: table.column(c).to_pylist() for c in json_cols}
    images = table.column("image").to_pylist()
    exts, transcoded = [], []
    tar_path = layout.shard_path(output, task.name)
    with storage.atomic_open(tar_path) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i, uid in enumerate(uids):
                data, ext = to_trainable(images[i])
                exts.append(ext)
                transcoded.append(bool(was_transcoded[i]) if was_transcoded is not None else data is not images[i])
                _add(tf, f"{uid}.{ext}", data)
                _add(tf, f"{uid}.txt", (captions[i] or "").encode("utf-8"))
                record = {c: _json_safe(meta_cols[c][i]) for c in json_cols}
                _add(tf, f"{uid}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    meta = table.drop_columns(["image"])
    meta = meta.append_column("shard", pa.array([f"{task.name}.tar"] * meta.num_rows, pa.string()))
    meta = meta.append_column("image_ext", pa.array(exts, pa.string()))
    meta = meta.append_column("transcoded", pa.array(transcoded, pa.bool_()))
    with storage.atomic_open(layout.metadata_path(output, task.name)) as f:
        pq.write_table(meta, f, compression="zstd")
    fs, p = storage.fs_path(tar_path)
    return {"name": f"{task.name}.tar", "samples": table.num_rows, "bytes": fs.size(p)}
