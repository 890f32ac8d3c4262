"""The row schema every stage shares, and the helpers that mark drops.

One row per (image, caption) pair, grown column by column as stages run (ARCHITECTURE.md, "One row
per pair, nothing lost"). A filter never deletes a row: it sets ``drop_reason`` (first reason
wins), records the stage in ``drop_stage`` and nulls the row's ``image`` bytes so later stages
skip it cheaply.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Columns every ingested row carries, in this order.
BASE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("drop_reason", pa.string()),
        pa.field("drop_stage", pa.string()),
    ]
)


#: Where a row's image bytes are in its ``source``, recorded by the readers so that no phase
#: after the first, and not the emit, needs the bytes copied (ARCHITECTURE.md, "Image bytes are
#: written once"): a plain tar member's data offset and size, a folder file's number in its
#: chunk (``InputShard.files``) and size, a Parquet row's index and -1. Null: the bytes exist nowhere else (a gzip'd tar, a download, a
#: transcoded image), so the phase that has them puts them in the shard's image store.
LOCATOR_SCHEMA = pa.schema([pa.field("image_offset", pa.int64()), pa.field("image_size", pa.int64())])
LOCATOR_COLUMNS = tuple(LOCATOR_SCHEMA.names)

#: What the readers yield: the base schema and the image locator.
INGEST_SCHEMA = pa.schema(list(BASE_SCHEMA) + list(LOCATOR_SCHEMA))


def make_uid(source_rel: str, key: str, repeat: int = 0) -> str:
    """Stable 128-bit hex id of a sample: hash of its source path (relative to the input
    root, so moving the data keeps the ids) and its key in that source.

    Unique by construction: ``repeat`` is n for the n-th repeat of ``key`` in one source (a
    tar may hold a key twice) and is hashed as a separate field, under its own BLAKE2b
    personalisation, with length-prefixed fields, so that no key, however it is spelt (``a#1``
    included), gives the uid of another key's repeat. The first occurrence keeps the plain
    ``source \\0 key`` hash that earlier outputs used. Strings are hashed as their UTF-8
    bytes; lone surrogates (names that are not UTF-8, decoded with ``surrogateescape``) are
    encoded one code point at a time (``surrogatepass``), which keeps the map one-to-one.
    """
    src, k = _utf8(source_rel), _utf8(key)
    if repeat == 0 and b"\x00" not in src:
        h = hashlib.blake2b(digest_size=16)
        h.update(src)
        h.update(b"\x00")
        h.update(k)
        return h.hexdigest()
    h = hashlib.blake2b(digest_size=16, person=b"pairsift.repeat")
    for part in (src, k, str(repeat).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def live_mask(batch: pa.Table) -> np.ndarray:
    """Boolean numpy mask of the rows no stage has dropped yet."""
    return np.asarray(pc.is_null(batch.column("drop_reason")).to_numpy(zero_copy_only=False), dtype=bool)


def set_column(batch: pa.Table, name: str, values, type: pa.DataType | None = None) -> pa.Table:
    """Add or replace column ``name``."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type)
    if type is not None and arr.type != type:
        arr = arr.cast(type)
    idx = batch.schema.get_field_index(name)
    if idx >= 0:
        return batch.set_column(idx, name, arr)
    return batch.append_column(name, arr)


def mark_dropped(batch: pa.Table, reasons: list[str | None], stage: str) -> pa.Table:
    """Drop rows where ``reasons[i]`` is not None, unless an earlier stage already did.

    The first reason wins; ``drop_stage`` records which stage dropped the row and ``image`` is
    nulled so later stages skip it.
    """
    if len(reasons) != batch.num_rows:
        raise ValueError(f"{stage}: {len(reasons)} reasons for {batch.num_rows} rows")
    old_reason = batch.column("drop_reason").to_pylist()
    old_stage = batch.column("drop_stage").to_pylist()
    new_reason, new_stage, newly = [], [], []
    for prev, prev_stage, r in zip(old_reason, old_stage, reasons):
        if prev is None and r is not None:
            new_reason.append(r)
            new_stage.append(stage)
            newly.append(True)
        else:
            new_reason.append(prev)
            new_stage.append(prev_stage)
            newly.append(False)
    if not any(newly):
        return batch
    batch = set_column(batch, "drop_reason", new_reason, pa.string())
    batch = set_column(batch, "drop_stage", new_stage, pa.string())
    if "image" in batch.column_names:
        image = batch.column("image")
        kept = pc.if_else(pa.array([not n for n in newly]), image, pa.scalar(None, image.type))
        batch = set_column(batch, "image", kept)
    return batch
