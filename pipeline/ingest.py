"""Input readers (the engine's I/O, not a stage): raw (image, caption) pairs from WebDataset tars, Parquet, folders and
URL lists, as rows of :data:`pairsift.pipeline.table.BASE_SCHEMA`.

Every input file (or chunk of a folder, or img2dataset download shard) is one input shard.
Nothing read is lost, and no input crashes the reader (the hostile-input rules, each tested in
``tests/hostile/``):

- **One row per sample.** A sample whose image or caption is missing, unreadable or too large
  becomes a row with a drop reason (:data:`INGEST_REASONS`).
- **Unique uids by construction.** ``uid`` = :func:`~pairsift.pipeline.table.make_uid` of the
  source file's path relative to the input root and the sample's key there; the n-th repeat of
  a key (a tar holding ``a`` twice) is hashed with n as a separate field, so it can never meet
  another key's uid (``a#1`` included).
- **Valid UTF-8 text.** ``key``, ``source`` and ``url`` are written as valid UTF-8: a name
  that is not UTF-8 (a tar member, a tar file, an image file) keeps its undecodable bytes as
  ``\\xNN`` and a lone surrogate (from JSON) as ``\\uNNNN`` (:func:`safe_text`); the uid hashes
  the raw name. A ``.json`` whose ``url`` is not a string (a number, an object) leaves ``url``
  empty, counted in the shard's ``source_errors``.
- **Size caps before reading.** An image larger than ``input.max_image_bytes`` or a caption or
  ``.json`` larger than ``input.max_text_bytes`` is dropped with ``member_too_large`` without
  being read: a tar member's size is the one its header declares (a GNU sparse member's
  apparent size, a gzip bomb's decompressed size), a folder file's the one the filesystem
  reports. A Parquet cell is read by Arrow before it can be measured.
- **Damaged sources.** A truncated tar yields every complete sample, the interrupted one as
  ``source_truncated``, and records the error. A tar is plain or gzip'd (sniffed; other
  compressions are not read). A gzip'd tar is first decompressed once to check every gzip
  member's CRC-32 and length: when the check fails (or the deflate data is invalid), nothing
  read from that stream can be trusted, so every sample in it is rejected as
  ``source_corrupt`` (one that merely ends early is a truncated tar). A Parquet row group
  that cannot be read (a corrupt page; page CRCs are checked where the writer stored them)
  gives ``source_corrupt`` rows for the rows the footer says it holds, and the other row groups
  go through.
- **Wrong Parquet column types** (a caption that is a number, an image that is a list) are a
  configuration error at preflight, naming the file and the column.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import INGEST_SCHEMA, make_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "mpo", "apng", "jfif",
              "ppm", "pgm", "pbm", "pnm", "heic", "heif")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # WebDataset's key/extension split
#: Drop reasons ingest itself gives (``download_failed`` only for URL lists).
INGEST_REASONS = ("missing_image", "missing_caption", "caption_not_utf8", "member_too_large",
                  "source_truncated", "source_corrupt", "download_failed")
MAX_IMAGE_BYTES = 64 * 2**20
MAX_TEXT_BYTES = 2**20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputShard:
    """One unit of ingest work."""

    index: int
    kind: str  # "tar" | "parquet" | "folder" | "urls" (a URL list's rows)
    path: str  # the file read (folders: the folder)
    rel: str  # path relative to the input root, used in uids
    files: tuple[str, ...] = field(default=())  # folder chunk members (relative)
    #: Problems found when the shard was listed (a URL list's), added to its source_errors.
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


@dataclass(frozen=True)
class Limits:
    """Largest image and text (caption, ``.json``) ingest reads, in bytes."""

    image: int = MAX_IMAGE_BYTES
    text: int = MAX_TEXT_BYTES

    @classmethod
    def of(cls, input_spec) -> "Limits":
        return cls(getattr(input_spec, "max_image_bytes", MAX_IMAGE_BYTES),
                   getattr(input_spec, "max_text_bytes", MAX_TEXT_BYTES))


class TooLarge:
    """A member that was not read because it is over its size cap."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def safe_text(text: str | None) -> str | None:
    """``text`` as valid UTF-8: unchanged when it is; otherwise the bytes of a name decoded
    with ``surrogateescape`` become ``\\xNN`` and other lone surrogates ``\\uNNNN``. A display
    form: two different raw names may read the same, which is why uids hash the raw name."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif 0xD800 <= cp <= 0xDFFF:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _text_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------- discovery


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


def _list_files(path: str, suffixes: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, str, list[tuple[str, str]]]:
    """Regular files under ``path`` (a file, a folder searched recursively, or a glob) ending
    in one of ``suffixes``, sorted: ``(fs, root, [(file, file relative to root)])``, paths
    with the URL's protocol. A path that exists is taken literally, glob characters and all
    (a folder named ``br[1]``); only one that does not is a glob. Pipes, devices and links to
    them are not files (reading ``/dev/zero`` never ends)."""
    fs, _ = storage.fs_path(path)  # ConfigError when the URL's filesystem is not installed
    protocol = path.split("://")[0] + "://" if "://" in path else ""
    literal = fs._strip_protocol(path)
    if fs.exists(literal):
        if fs.isdir(literal):
            root = literal
            found = fs.find(root, detail=True)
        else:
            root = posixpath.dirname(literal)
            found = {literal: fs.info(literal)}
    else:
        root, is_glob = _split_glob_root(path)
        if not is_glob:
            raise ConfigError(f"input.path: no such file or folder: {safe_text(path)}")
        root = fs._strip_protocol(root)
        found = fs.glob(literal, detail=True)
        if fs.isfile(root):
            root = posixpath.dirname(root)
    files = sorted(f for f, info in found.items()
                   if info.get("type") == "file" and f.lower().endswith(suffixes))
    if not files:
        raise ConfigError(f"input.path: no {'/'.join(suffixes)} files under {safe_text(path)}")
    return fs, protocol + root, [(protocol + f, posixpath.relpath(f, root)) for f in files]


def discover(input_spec) -> list[InputShard]:
    """List the input shards of a job; raises ConfigError for missing inputs or columns."""
    fmt = input_spec.format
    if fmt == "webdataset":
        _, _, files = _list_files(input_spec.path, TAR_SUFFIXES)
        return [InputShard(i, "tar", f, rel) for i, (f, rel) in enumerate(files)]
    keep = list(getattr(input_spec, "keep_columns", None) or [])
    if keep and fmt != "parquet":
        raise ConfigError(f"input.keep_columns: only Parquet input carries extra columns (input.format is {fmt!r})")
    taken = [c for c in keep if c in INGEST_SCHEMA.names]
    if taken:
        raise ConfigError(f"input.keep_columns: {', '.join(map(repr, taken))} would replace the row column(s) "
                          f"of the same name; rename them in the source")
    if fmt == "parquet":
        _, _, files = _list_files(input_spec.path, (".parquet",))
        kept_types: dict[str, tuple[str, pa.DataType]] = {}
        for f, _ in files:
            schema = _check_parquet_columns(f, input_spec)
            for c in keep:  # every row of a column must have one type, whichever file it is from
                first = kept_types.setdefault(c, (f, schema.field(c).type))
                if schema.field(c).type != first[1]:
                    raise ConfigError(f"input.keep_columns: column {c!r} is {first[1]} in {safe_text(first[0])} "
                                      f"but {schema.field(c).type} in {safe_text(f)}")
        return [InputShard(i, "parquet", f, rel) for i, (f, rel) in enumerate(files)]
    if fmt == "folder":
        _, root, files = _list_files(input_spec.path, tuple("." + e for e in IMAGE_EXTS))
        names = [rel for _, rel in files]
        size = input_spec.shard_size
        return [
            InputShard(i, "folder", root, f"chunk{i:06d}", tuple(names[s : s + size]))
            for i, s in enumerate(range(0, len(names), size))
        ]
    raise ConfigError(f"input.format {fmt!r} is listed by the download step, not by discover()")


def _base_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_text_type(t: pa.DataType) -> bool:
    """Types a caption or URL column may have: text, or bytes that should be UTF-8."""
    t = _base_type(t)
    return (pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)
            or getattr(pa.types, "is_binary_view", lambda _: False)(t))


def _is_bytes_type(t: pa.DataType) -> bool:
    t = _base_type(t)
    return (pa.types.is_null(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t) or getattr(pa.types, "is_binary_view", lambda _: False)(t))


def _is_image_type(t: pa.DataType) -> bool:
    """Encoded image bytes, or a Hugging Face ``Image`` struct whose ``bytes`` field is."""
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_bytes_type(t.field(i).type)
    return _is_bytes_type(t)


def check_column_type(path: str, schema: pa.Schema, column: str, key: str, ok, what: str) -> None:
    """ConfigError naming ``key``, the file and the column when ``column`` has a type ``ok``
    refuses; ``what`` says what it must hold."""
    if column not in schema.names:
        return
    t = schema.field(column).type
    if not ok(t):
        raise ConfigError(f"{key}: column {column!r} of {safe_text(path)} is {t}; it must hold {what}")


def _check_parquet_columns(path: str, input_spec) -> pa.Schema:
    with fsspec.open(path, "rb") as f:
        try:
            schema = pq.ParquetFile(f).schema_arrow
        except Exception as e:
            raise ConfigError(f"input.path: {safe_text(path)} is not a readable Parquet file: {e}") from None
    names = schema.names
    caption = input_spec.caption_field
    kept = [c for c in (getattr(input_spec, "keep_columns", None) or []) if c not in names]
    if kept:
        raise ConfigError(f"input.keep_columns: {safe_text(path)} lacks column(s) {', '.join(map(repr, kept))}; "
                          f"it has {', '.join(names)}")
    missing = [c for c in (input_spec.image_column, caption) if c not in names]
    if missing:
        hint = ""
        if input_spec.image_column in missing and input_spec.url_column in names:
            hint = f" (it has a {input_spec.url_column!r} column: use input.format: urls to download the images)"
        raise ConfigError(
            f"input.path: {safe_text(path)} lacks column(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(names)}{hint}. Set input.image_column / input.caption_column."
        )
    used = [input_spec.image_column, caption, input_spec.url_column] + list(getattr(input_spec, "keep_columns", None) or [])
    twice = sorted({c for c in used if names.count(c) > 1})
    if twice:
        raise ConfigError(f"input.path: {safe_text(path)} has more than one column named "
                          f"{', '.join(map(repr, twice))}; which one to read is ambiguous")
    check_column_type(path, schema, input_spec.image_column, "input.image_column", _is_image_type,
                      "encoded image bytes (binary, or a struct with a binary 'bytes' field)")
    check_column_type(path, schema, caption, "input.caption_column", is_text_type, "text (string or binary)")
    check_column_type(path, schema, input_spec.url_column, "input.url_column", is_text_type,
                      "text (string or binary); set input.url_column to another column")
    return schema


# --------------------------------------------------------------------------- rows


class _RowBuffer:
    """Collects rows and hands them out as Arrow batches of the base schema."""

    def __init__(self, shard: InputShard, batch_size: int, extra: pa.Schema | None = None):
        self.shard = shard
        self.batch_size = batch_size
        self.rows: dict[str, list] = {f.name: [] for f in INGEST_SCHEMA}
        self.seen: dict[tuple[str, str], int] = {}
        #: Source columns carried as they are (``input.keep_columns``): Arrow chunks that the
        #: caller appends with ``extend_extra`` in step with ``add``.
        self.extra = extra
        self.extra_chunks: list[pa.Table] = []
        #: Things worth a line in the shard's source_errors, counted (e.g. non-string urls).
        self.notes: Counter = Counter()

    def add(self, key: str, image: bytes | None, caption: str | None, url: str | None = None,
            reason: str | None = None, source: str | None = None, uid_source: str | None = None,
            loc: tuple[int, int] | None = None) -> None:
        """One row. ``key``, ``source`` and the uid source are raw (surrogates allowed); what
        is stored is valid UTF-8 (:func:`safe_text`). ``loc``: where the image bytes are in the
        source (:data:`~pairsift.pipeline.table.LOCATOR_SCHEMA`), if they can be read back."""
        uid_source = uid_source or self.shard.rel
        n = self.seen.get((uid_source, key), 0)
        self.seen[(uid_source, key)] = n + 1
        if reason is None and image is None:
            reason = "missing_image"
        if reason is None and caption is None:
            reason = "missing_caption"
        if caption is not None and not _is_utf8(caption):  # readers decode; this is the last guard
            caption, reason = None, reason or "caption_not_utf8"
        if url is not None and not isinstance(url, str):
            url = None
        r = self.rows
        r["uid"].append(make_uid(uid_source, key, n))
        r["key"].append(safe_text(key))
        r["source"].append(safe_text(source or self.shard.path))
        r["url"].append(safe_text(url))
        r["caption"].append(caption)
        r["image"].append(image if reason is None else None)
        r["drop_reason"].append(reason)
        r["drop_stage"].append("ingest" if reason else None)
        keep_loc = loc is not None and reason is None
        r["image_offset"].append(loc[0] if keep_loc else None)
        r["image_size"].append(loc[1] if keep_loc else None)

    def __len__(self) -> int:
        return len(self.rows["uid"])

    def full(self) -> bool:
        return len(self) >= self.batch_size

    def extend_extra(self, columns: pa.Table) -> None:
        self.extra_chunks.append(columns)

    def extend_extra_nulls(self, n: int) -> None:
        """``n`` rows of nulls in the kept columns (rows whose source could not be read)."""
        if self.extra is not None and len(self.extra) and n:
            self.extra_chunks.append(pa.table([pa.nulls(n, f.type) for f in self.extra], names=self.extra.names))

    def flush(self) -> pa.Table | None:
        if not self.rows["uid"]:
            return None
        t = pa.table({k: pa.array(v, type=INGEST_SCHEMA.field(k).type) for k, v in self.rows.items()},
                     schema=INGEST_SCHEMA)
        self.rows = {f.name: [] for f in INGEST_SCHEMA}
        if self.extra is not None and len(self.extra):
            extra = pa.concat_tables(self.extra_chunks).cast(pa.schema([f.with_nullable(True) for f in self.extra]))
            self.extra_chunks = []
            for f in self.extra:
                t = t.append_column(f.with_nullable(True), extra.column(f.name))
        return t

    def report(self, errors: list[str], where: str) -> None:
        for note, n in sorted(self.notes.items()):
            errors.append(f"{where}: {n} sample(s): {note}")


def decode_caption(raw, max_bytes: int | None = None, bom: bool = True) -> tuple[str | None, str | None]:
    """(caption, drop reason): bytes must be UTF-8 (a BOM is dropped unless ``bom`` is
    False), text must be valid Unicode (no lone surrogates), and neither may be larger than
    ``max_bytes``."""
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, TooLarge):
        return None, "member_too_large"
    if isinstance(raw, str):
        if max_bytes is not None and len(raw) * 4 > max_bytes and _text_size(raw) > max_bytes:
            return None, "member_too_large"
        return (raw, None) if _is_utf8(raw) else (None, "caption_not_utf8")
    if max_bytes is not None and len(raw) > max_bytes:
        return None, "member_too_large"
    try:
        return bytes(raw).decode("utf-8-sig" if bom else "utf-8"), None
    except UnicodeDecodeError:
        return None, "caption_not_utf8"


def _json_url(data) -> tuple[str | None, str | None]:
    """(url, note) from a ``.json`` member: img2dataset's ``url``. Anything but a string (or
    JSON that does not parse) gives no url; a non-string url gives a note for source_errors."""
    if data is None or isinstance(data, TooLarge):
        return None, None
    try:
        meta = json.loads(data)
    except Exception:  # invalid JSON, bad encoding, nesting too deep, huge numbers
        return None, None
    url = meta.get("url") if isinstance(meta, dict) else None
    if url is None or isinstance(url, str):
        return url, None
    return None, f".json url is a {type(url).__name__}, not a string: url left empty"


def _image_ext(members: dict) -> str | None:
    """Which member is the sample's image."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    for ext in members:  # e.g. "seg.png" double extensions: take any image-like member
        if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            return ext
    return None


def _image_member(members: dict):
    ext = _image_ext(members)
    return None if ext is None else members[ext]


def _member_role(ext: str, caption_ext: str) -> str | None:
    if ext == caption_ext or ext == "json":
        return "text"
    if ext in IMAGE_EXTS or ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
        return "image"
    return None  # not used: never read


def _sample_from_members(members: dict, caption_ext: str):
    """(image, caption, url, reason, note) of one WebDataset sample."""
    image = _image_member(members)
    caption, reason = decode_caption(members.get(caption_ext))
    url, note = _json_url(members.get("json"))
    if image is None:
        reason = "missing_image"
    elif isinstance(image, TooLarge) or isinstance(members.get("json"), TooLarge):
        reason = "member_too_large"
    if reason is not None:
        image = None
    return image, caption, url, reason, note


# --------------------------------------------------------------------------- tars


def _check_gzip(path: str) -> str | None:
    """Decompress a gzip file once with zlib, which checks each member's CRC-32 and length
    (RFC 1952), throwing the output away as it comes (memory: one chunk, whatever the stream
    holds). The error when a check fails, the deflate data is invalid or something that is
    not gzip follows a member; None when every check passes or the file just ends early,
    which the tar reader reports as truncation."""
    def fresh():
        return zlib.decompressobj(16 + zlib.MAX_WBITS)

    d, started, pending = fresh(), False, b""
    with fsspec.open(path, "rb") as f:
        try:
            while True:
                if not pending:
                    pending = f.read(_CHUNK)
                    if not pending:
                        break
                if not started:  # zero padding between or after members is allowed
                    pending = pending.lstrip(b"\0")
                    if not pending:
                        continue
                    started = True
                d.decompress(pending, _CHUNK)
                pending = d.unconsumed_tail
                if d.eof:  # the next member, if any, starts in unused_data
                    pending, d, started = d.unused_data, fresh(), False
            if started:
                d.flush()  # what zlib still holds; raises on a bad check
        except zlib.error as e:
            return f"zlib.error: {e}"
    return None


class _CappedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (GNU long names, pax records) are refused past
    ``max_header`` bytes: tarfile reads them into memory whole, so a long-name "member" of
    gigabytes (a gzip bomb) would otherwise be one allocation. Refusing it ends the read
    there, as a damaged tar."""

    max_header = MAX_TEXT_BYTES
    _EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tf):
        if self.type in self._EXTENDED and self.size > self.max_header:
            raise tarfile.SubsequentHeaderError(f"{self.name!r}: an extended header of {self.size} bytes "
                                                f"(at most {self.max_header} read)")
        return super()._proc_member(tf)


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a tar opened for streaming, without keeping them: TarFile lists every
    member it has read, which for a tar of millions of empty members is gigabytes."""
    while True:
        info = tf.next()
        if info is None:
            return
        tf.members.clear()
        yield info


class _Read1:
    """``read`` as ``read1``: what can be decompressed now. GzipFile's buffered ``read(n)``
    loses the data it has when the stream ends early; tarfile copes with short reads."""

    def __init__(self, f):
        self.f = f

    def read(self, size: int = -1) -> bytes:
        return self.f.read1(size)


def read_tar(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Stream a WebDataset tar (plain or gzip). Members are grouped by key as WebDataset
    does; a key seen again starts a new sample. Only the members a sample uses (images, the
    caption, ``.json``) are read, each within its size cap. A truncated tar yields every
    complete sample, the interrupted one as ``source_truncated``, and records the error; a
    gzip stream that fails its CRC check rejects every sample as ``source_corrupt``."""
    buf = _RowBuffer(shard, batch_size)
    caption_ext = input_spec.caption_field
    limits = Limits.of(input_spec)
    where = safe_text(shard.path)
    with fsspec.open(shard.path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    damage = _check_gzip(shard.path) if gzipped else None
    if damage:
        errors.append(f"{where}: the gzip stream fails its integrity check ({damage}); every sample in it "
                      f"is rejected as source_corrupt")
    current_key: str | None = None
    members: dict[str, object] = {}

    locs: dict[str, tuple[int, int]] = {}  # member data offsets: a plain tar can be read back by range

    def emit():
        image, caption, url, reason, note = _sample_from_members(members, caption_ext)
        if note:
            buf.notes[note] += 1
        if damage:
            image, reason = None, "source_corrupt"
        buf.add(current_key, image, caption, url, reason, loc=locs.get(_image_ext(members) or ""))

    with fsspec.open(shard.path, "rb") as raw:
        # GzipFile, not tarfile's own gzip stream: that one reads only the first gzip member
        # and inflates each 10 KB read whole (10 MB from a bomb's zeros); read1 hands over what
        # is inflated so far, so a damaged stream still lists its samples up to the damage.
        # Anything else is read as a plain tar (tarfile's bz2/xz streams inflate unbounded).
        stream = _Read1(gzip.GzipFile(fileobj=raw, mode="rb")) if gzipped else raw
        try:
            header_cls = type("_TarInfo", (_CappedTarInfo,), {"max_header": max(limits.text, 64 * 1024)})
            # tarfile's default 10 KB buffer: its stream copies what is left of the buffer on
            # every read, so a large one costs more than it saves.
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=header_cls) as tf:
                for info in _tar_members(tf):
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
                        members, locs = {}, {}
                        if buf.full():
                            yield buf.flush()
                    current_key = key
                    role = _member_role(ext, caption_ext)
                    if role is None or damage:
                        data = None  # not read: tarfile skips it
                    elif info.size > (limits.image if role == "image" else limits.text):
                        data = TooLarge(info.size)
                    else:
                        data = tf.extractfile(info).read()
                        if role == "image" and not gzipped:
                            locs[ext] = (info.offset_data, info.size)
                    members[ext] = data
            if current_key is not None:
                emit()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if not damage:
                errors.append(f"{where}: {type(e).__name__}: {e}")
            if current_key is not None:
                buf.add(current_key, None, None, reason="source_corrupt" if damage else "source_truncated")
    buf.report(errors, where)
    t = buf.flush()
    if t is not None:
        yield t


# --------------------------------------------------------------------------- parquet


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
        return INGEST_SCHEMA
    with fsspec.open(shard.path, "rb") as f:
        extra = _kept_fields(pq.ParquetFile(f).schema_arrow, input_spec)
    return pa.schema(list(INGEST_SCHEMA) + [f.with_nullable(True) for f in extra])


def parquet_batches(pf: pq.ParquetFile, columns: list[str], batch_size: int, path: str,
                    errors: list[str]) -> Iterator[pa.RecordBatch | int]:
    """The file's rows, row group by row group: record batches, and for a row group that
    cannot be read (a corrupt page behind an intact footer), the number of its rows not read
    (an ``int``, from the footer's row counts) after the error is recorded."""
    meta = pf.metadata
    first = 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        done = 0
        try:
            for rb in pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=columns):
                done += rb.num_rows
                yield rb
        except (pa.ArrowException, OSError, EOFError, ValueError) as e:
            errors.append(f"{safe_text(path)}: row group {rg} (rows {first + done}-{first + n - 1}) could not "
                          f"be read: {type(e).__name__}: {str(e)[:300]}")
            if n > done:
                yield n - done
        first += n


def as_pylist(col: pa.Array) -> tuple[list, bool]:
    """(values, was_text): text columns come out as UTF-8 bytes, so that a string column
    holding invalid UTF-8 (Arrow does not check what it reads) cannot raise."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_string(t):
        return col.cast(pa.binary()).to_pylist(), True
    if pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return col.cast(pa.large_binary()).to_pylist(), True
    return col.to_pylist(), False


def _url_value(raw, max_bytes: int) -> str | None:
    """A url cell as text: bytes decoded (undecodable bytes kept as ``\\xNN``)."""
    if raw is None or len(raw) > max_bytes:
        return None
    return safe_text(bytes(raw).decode("utf-8", "surrogateescape"))


def read_parquet(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Parquet with an image-bytes column and a caption column; key = row number.
    ``input.keep_columns`` are carried into the rows with their types."""
    caption_col, image_col, url_col = input_spec.caption_field, input_spec.image_column, input_spec.url_column
    limits = Limits.of(input_spec)
    with fsspec.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        extra = _kept_fields(pf.schema_arrow, input_spec)
        buf = _RowBuffer(shard, batch_size, extra)
        has_url = url_col in pf.schema_arrow.names
        columns = list(dict.fromkeys([image_col, caption_col] + ([url_col] if has_url else []) + extra.names))
        row = 0
        for rb in parquet_batches(pf, columns, batch_size, shard.path, errors):
            if isinstance(rb, int):  # rows of a row group that could not be read
                left = rb
                while left:
                    take = min(left, max(1, batch_size - len(buf)))
                    for _ in range(take):
                        buf.add(str(row), None, None, reason="source_corrupt")
                        row += 1
                    buf.extend_extra_nulls(take)
                    left -= take
                    if buf.full():
                        yield buf.flush()
                continue
            images, _ = as_pylist(rb.column(image_col))
            captions, was_text = as_pylist(rb.column(caption_col))
            urls = as_pylist(rb.column(url_col))[0] if has_url else [None] * rb.num_rows
            if len(extra):
                buf.extend_extra(pa.Table.from_batches([rb]).select(extra.names))
            for img, cap, url in zip(images, captions, urls):
                caption, reason = decode_caption(cap, limits.text, bom=not was_text)
                image = _image_bytes(img)
                if image is not None and len(image) > limits.image:
                    image, reason = None, "member_too_large"
                if url is not None and len(url) > limits.text:
                    reason = reason or "member_too_large"
                buf.add(str(row), image, caption, _url_value(url, limits.text), reason, loc=(row, -1))
                row += 1
            if buf.full():
                yield buf.flush()
    buf.report(errors, safe_text(shard.path))
    t = buf.flush()
    if t is not None:
        yield t


# --------------------------------------------------------------------------- folders


def _read_capped(fs, path: str, cap: int, errors: list[str]):
    """A file's bytes, ``TooLarge`` when it is over ``cap`` (not read), or None when it is
    absent or not a regular file (an error is recorded when it exists but cannot be read)."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        errors.append(f"{safe_text(path)}: {type(e).__name__}: {e}")
        return None
    if info.get("type") != "file":
        if info.get("type") != "directory":
            errors.append(f"{safe_text(path)}: not a regular file ({info.get('type')})")
        return None
    if (info.get("size") or 0) > cap:
        return TooLarge(info["size"])
    try:
        data = fs.cat_file(path)
    except OSError as e:
        errors.append(f"{safe_text(path)}: {type(e).__name__}: {e}")
        return None
    return TooLarge(len(data)) if len(data) > cap else data


def read_folder(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Image files with same-named caption files (``cat.jpg`` + ``cat.txt``)."""
    buf = _RowBuffer(shard, batch_size)
    fs, _ = fsspec.core.url_to_fs(shard.path)
    root = fs._strip_protocol(shard.path)
    caption_ext = input_spec.caption_field
    limits = Limits.of(input_spec)
    for index, rel in enumerate(shard.files):
        stem = rel.rsplit(".", 1)[0]
        image = _read_capped(fs, posixpath.join(root, rel), limits.image, errors)
        raw = _read_capped(fs, posixpath.join(root, f"{stem}.{caption_ext}"), limits.text, errors)
        caption, reason = decode_caption(raw)
        if isinstance(image, TooLarge):
            image, reason = None, "member_too_large"
        elif image is None:
            reason = "missing_image"
        buf.add(stem, image, caption, None, reason, source=posixpath.join(shard.path, rel), uid_source=rel,
                loc=(index, len(image)) if isinstance(image, bytes) else None)  # the chunk's file number
        if buf.full():
            yield buf.flush()
    t = buf.flush()
    if t is not None:
        yield t


READERS = {"tar": read_tar, "parquet": read_parquet, "folder": read_folder}


def read_shard(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Batches of base-schema rows from one input shard; source problems go to ``errors``."""
    errors.extend(shard.notes)
    if shard.kind == "urls":
        from pairsift.pipeline.urllists import read_download_shard

        return read_download_shard(shard, input_spec, batch_size, errors)
    return READERS[shard.kind](shard, input_spec, batch_size, errors)
