"""Stage ``ingest``: raw (image, caption) pairs from WebDataset tars, Parquet, folders and
URL lists, as rows of :data:`pairsift.pipeline.table.BASE_SCHEMA`.

Every input file (or chunk of a folder, or img2dataset download shard) is one input shard.
Nothing read is lost: a sample whose image or caption is missing or unreadable becomes a row
with a drop reason (``missing_image``, ``missing_caption``, ``caption_not_utf8``,
``source_truncated``), and the ``uid`` is a stable hash of the source file's path relative to
the input root and the sample's key there (``#n`` appended to the n-th repeat of a key).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA, make_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "mpo", "apng", "jfif",
              "ppm", "pgm", "pbm", "pnm", "heic", "heif")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # WebDataset's key/extension split


@dataclass(frozen=True)
class InputShard:
    """One unit of ingest work."""

    index: int
    kind: str  # "tar" | "parquet" | "folder" | "download"
    path: str  # the file read (folders: the folder)
    rel: str  # path relative to the input root, used in uids
    files: tuple[str, ...] = field(default=())  # folder chunk members (relative)

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def _split_glob_root(path: str) -> tuple[str, bool]:
    if any(ch in path for ch in "*?["):
        parts = path.split("/")
        root = []
        for p in parts:
            if any(ch in p for ch in "*?["):
                break
            root.append(p)
        return "/".join(root), True
    return path, False


def _list_files(path: str, suffixes: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Files under ``path`` (a file, a folder searched recursively, or a glob) ending in
    one of ``suffixes``, sorted, with the root they are relative to."""
    fs, _ = storage.fs_path(path)  # ConfigError when the URL's filesystem is not installed
    protocol = path.split("://")[0] + "://" if "://" in path else ""
    root, is_glob = _split_glob_root(path)
    root = fs._strip_protocol(root)
    if is_glob:
        files = fs.glob(fs._strip_protocol(path))
    elif fs.isdir(root):
        files = fs.find(root)
    elif fs.exists(root):
        files = [root]
        root = posixpath.dirname(root)
    else:
        raise ConfigError(f"input.path: no such file or folder: {path}")
    files = sorted(f for f in files if f.lower().endswith(suffixes) and not fs.isdir(f))
    if not files:
        raise ConfigError(f"input.path: no {'/'.join(suffixes)} files under {path}")
    if fs.isfile(root):
        root = posixpath.dirname(root)
    return fs, protocol, [(protocol + f, posixpath.relpath(f, root)) for f in files]


def discover(input_spec) -> list[InputShard]:
    """List the input shards of a job; raises ConfigError for missing inputs or columns."""
    fmt = input_spec.format
    if fmt == "webdataset":
        _, _, files = _list_files(input_spec.path, TAR_SUFFIXES)
        return [InputShard(i, "tar", f, rel) for i, (f, rel) in enumerate(files)]
    keep = list(getattr(input_spec, "keep_columns", None) or [])
    if keep and fmt != "parquet":
        raise ConfigError(f"input.keep_columns: only Parquet input carries extra columns (input.format is {fmt!r})")
    taken = [c for c in keep if c in BASE_SCHEMA.names]
    if taken:
        raise ConfigError(f"input.keep_columns: {', '.join(map(repr, taken))} would replace the row column(s) "
                          f"of the same name; rename them in the source")
    if fmt == "parquet":
        _, _, files = _list_files(input_spec.path, (".parquet",))
        for f, _ in files:
            _check_parquet_columns(f, input_spec)
        return [InputShard(i, "parquet", f, rel) for i, (f, rel) in enumerate(files)]
    if fmt == "folder":
        fs, protocol, files = _list_files(input_spec.path, tuple("." + e for e in IMAGE_EXTS))
        names = [rel for _, rel in files]
        size = input_spec.shard_size
        root = input_spec.path.rstrip("/")
        return [
            InputShard(i, "folder", root, f"chunk{i:06d}", tuple(names[s : s + size]))
            for i, s in enumerate(range(0, len(names), size))
        ]
    raise ConfigError(f"input.format {fmt!r} is listed by the download step, not by discover()")


def _check_parquet_columns(path: str, input_spec) -> None:
    with fsspec.open(path, "rb") as f:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except Exception as e:
            raise ConfigError(f"input.path: {path} is not a readable Parquet file: {e}") from None
    caption = input_spec.caption_field
    kept = [c for c in (getattr(input_spec, "keep_columns", None) or []) if c not in names]
    if kept:
        raise ConfigError(f"input.keep_columns: {path} lacks column(s) {', '.join(map(repr, kept))}; it has "
                          f"{', '.join(names)}")
    missing = [c for c in (input_spec.image_column, caption) if c not in names]
    if missing:
        hint = ""
        if input_spec.image_column in missing and input_spec.url_column in names:
            hint = f" (it has a {input_spec.url_column!r} column: use input.format: urls to download the images)"
        raise ConfigError(
            f"input.path: {path} lacks column(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(names)}{hint}. Set input.image_column / input.caption_column."
        )


# --------------------------------------------------------------------------- readers


class _RowBuffer:
    """Collects rows and hands them out as Arrow batches of the base schema."""

    def __init__(self, shard: InputShard, batch_size: int, extra: pa.Schema | None = None):
        self.shard = shard
        self.batch_size = batch_size
        self.rows: dict[str, list] = {f.name: [] for f in BASE_SCHEMA}
        self.seen: dict[str, int] = {}
        #: Source columns carried as they are (``input.keep_columns``): Arrow chunks that the
        #: caller appends with ``extend_extra`` in step with ``add``.
        self.extra = extra
        self.extra_chunks: list[pa.Table] = []

    def add(self, key: str, image: bytes | None, caption: str | None, url: str | None = None,
            reason: str | None = None, source: str | None = None, uid_source: str | None = None) -> None:
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        uid_key = key if n == 0 else f"{key}#{n}"
        if reason is None and image is None:
            reason = "missing_image"
        if reason is None and caption is None:
            reason = "missing_caption"
        r = self.rows
        r["uid"].append(make_uid(uid_source or self.shard.rel, uid_key))
        r["key"].append(key)
        r["source"].append(source or self.shard.path)
        r["url"].append(url)
        r["caption"].append(caption)
        r["image"].append(image if reason is None else None)
        r["drop_reason"].append(reason)
        r["drop_stage"].append("ingest" if reason else None)

    def full(self) -> bool:
        return len(self.rows["uid"]) >= self.batch_size

    def extend_extra(self, columns: pa.Table) -> None:
        self.extra_chunks.append(columns)

    def flush(self) -> pa.Table | None:
        if not self.rows["uid"]:
            return None
        t = pa.table({k: pa.array(v, type=BASE_SCHEMA.field(k).type) for k, v in self.rows.items()}, schema=BASE_SCHEMA)
        self.rows = {f.name: [] for f in BASE_SCHEMA}
        if self.extra is not None and len(self.extra):
            extra = pa.concat_tables(self.extra_chunks).cast(self.extra)
            self.extra_chunks = []
            for f in self.extra:
                t = t.append_column(f, extra.column(f.name))
        return t


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str | None]:
    """(caption, drop reason): bytes must be UTF-8 (a BOM is dropped)."""
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, str):
        return raw, None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, "caption_not_utf8"


def _sample_from_members(members: dict[str, bytes], caption_ext: str):
    image = None
    for ext in IMAGE_EXTS:
        if ext in members:
            image = members[ext]
            break
    if image is None:  # e.g. "seg.png" double extensions: take any image-like member
        for ext, data in members.items():
            if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                image = data
                break
    caption, reason = decode_caption(members.get(caption_ext))
    url = None
    if "json" in members:
        try:
            import json

            meta = json.loads(members["json"])
            url = meta.get("url") if isinstance(meta, dict) else None
        except Exception:
            url = None
    if image is None:
        reason = "missing_image"
    return image, caption, url, reason


def read_tar(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Stream a WebDataset tar (plain or gzip). Members are grouped by key as WebDataset
    does; a key seen again starts a new sample. A truncated tar yields every complete
    sample, the interrupted one as ``source_truncated``, and records the error."""
    buf = _RowBuffer(shard, batch_size)
    caption_ext = input_spec.caption_field
    current_key: str | None = None
    members: dict[str, bytes] = {}

    def emit():
        image, caption, url, reason = _sample_from_members(members, caption_ext)
        buf.add(current_key, image, caption, url, reason)

    with fsspec.open(shard.path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    m = _KEY_EXT.match(info.name)
                    if not m or posixpath.basename(info.name).startswith("._"):
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    if key.startswith("./"):
                        key = key[2:]
                    if current_key is not None and (key != current_key or ext in members):
                        emit()
                        members = {}
                        if buf.full():
                            yield buf.flush()
                    current_key = key
                    data = tf.extractfile(info).read()
                    members[ext] = data
            if current_key is not None:
                emit()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            errors.append(f"{shard.path}: {type(e).__name__}: {e}")
            if current_key is not None:
                buf.add(current_key, None, None, reason="source_truncated")
    t = buf.flush()
    if t is not None:
        yield t


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        return value.get("bytes")
    return value


def _kept_fields(schema: pa.Schema, input_spec) -> pa.Schema:
    keep = getattr(input_spec, "keep_columns", None) or []
    return pa.schema([schema.field(c) for c in keep])


def input_schema(shard: InputShard, input_spec) -> pa.Schema:
    """The schema of the rows ``read_shard`` yields for ``shard``: the base schema, plus the
    ``input.keep_columns`` of a Parquet source with their types there."""
    if shard.kind != "parquet" or not getattr(input_spec, "keep_columns", None):
        return BASE_SCHEMA
    with fsspec.open(shard.path, "rb") as f:
        extra = _kept_fields(pq.ParquetFile(f).schema_arrow, input_spec)
    return pa.schema(list(BASE_SCHEMA) + list(extra))


def read_parquet(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Parquet with an image-bytes column and a caption column; key = row number.
    ``input.keep_columns`` are carried into the rows with their types."""
    caption_col = input_spec.caption_field
    columns = [input_spec.image_column, caption_col]
    with fsspec.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f)
        extra = _kept_fields(pf.schema_arrow, input_spec)
        buf = _RowBuffer(shard, batch_size, extra)
        if input_spec.url_column in pf.schema_arrow.names:
            columns.append(input_spec.url_column)
        row = 0
        for rb in pf.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(columns + extra.names))):
            if len(extra):
                buf.extend_extra(pa.Table.from_batches([rb]).select(extra.names))
                rb = rb.select([c for c in dict.fromkeys(columns)])
            d = rb.to_pydict()
            urls = d.get(input_spec.url_column, [None] * rb.num_rows)
            for img, cap, url in zip(d[input_spec.image_column], d[caption_col], urls):
                caption, reason = decode_caption(cap)
                buf.add(str(row), _image_bytes(img), caption, url, reason)
                row += 1
            if buf.full():
                yield buf.flush()
    t = buf.flush()
    if t is not None:
        yield t


def read_folder(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Image files with same-named caption files (``cat.jpg`` + ``cat.txt``)."""
    buf = _RowBuffer(shard, batch_size)
    fs, _ = fsspec.core.url_to_fs(shard.path)
    root = fs._strip_protocol(shard.path)
    caption_ext = input_spec.caption_field
    for rel in shard.files:
        stem = rel.rsplit(".", 1)[0]
        image = fs.cat_file(posixpath.join(root, rel))
        cap_path = posixpath.join(root, f"{stem}.{caption_ext}")
        raw = fs.cat_file(cap_path) if fs.exists(cap_path) else None
        caption, reason = decode_caption(raw)
        buf.add(stem, image, caption, None, reason, source=posixpath.join(shard.path, rel), uid_source=rel)
        if buf.full():
            yield buf.flush()
    t = buf.flush()
    if t is not None:
        yield t


READERS = {"tar": read_tar, "parquet": read_parquet, "folder": read_folder}


def read_shard(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Batches of base-schema rows from one input shard; source problems go to ``errors``."""
    if shard.kind == "download":
        from pairsift.stages.download import read_download_shard

        return read_download_shard(shard, input_spec, batch_size, errors)
    return READERS[shard.kind](shard, input_spec, batch_size, errors)
