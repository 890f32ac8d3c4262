"""URL lists (``input.format: urls``): the lists' rows as input shards; the images are fetched
later, by the stage the reader names (:data:`PIXELS_FROM`), inside the workers.

Rule: every row of every URL list becomes exactly one row of the ingest schema, with no image
and not dropped for lacking one. Its ``uid`` is ``make_uid(src_file, str(src_row))``, where
``src_file`` is the list's path relative to the input root and ``src_row`` its 0-based row there
(data rows for CSV/TSV/Parquet, lines for TXT/JSONL; blank lines are skipped but counted), so
ids do not depend on shard sizes, on which downloads succeed or on the run. ``key`` is
``str(src_row)``, ``source`` the list's path and ``url`` the URL as listed.

The job's stages then run on these rows. The engine puts the ``download`` stage
(``pairsift.stages.download``: img2dataset's per-shard downloader in the worker task, so every
node downloads) after the longest run of leading stages that need no pixels (MetaCLIP,
language ID, caption rewrites, ...), so only the rows those keep are fetched
(:meth:`pairsift.pipeline.spec.JobSpec`'s validation); with ``emit.images: false`` nothing is
fetched and the kept rows are written as a URL list (:mod:`pairsift.pipeline.urlout`).

Hostile lists do not stop the job: a caption that is not UTF-8 (or a JSON string with a lone
surrogate) is ``caption_not_utf8``, one over ``input.max_text_bytes`` ``member_too_large``, a
row without caption ``missing_caption`` (decided when the list is read: such rows are never
fetched); a URL that is not UTF-8 has its other bytes percent-encoded (as a browser sends
them); a JSONL ``url`` that is not a string is left empty (the download stage drops the row as
``download_failed``); a CSV/TSV row with too few or too many fields is read by Python's csv
module (a missing field is empty); a Parquet list's unreadable row group gives rows without URL
(``source_corrupt``); a Parquet list whose URL or caption column is not text is a
configuration error at preflight.

Three steps:

1. :func:`check_url_lists` (preflight, nothing written): every list must have the URL column
   (``input.url_column``) and the caption column (``input.caption_column``, default
   ``caption``): the header of CSV/TSV, the schema of Parquet, the keys of a JSONL list's
   first object. Lists are ``.csv``, ``.tsv``, ``.parquet``, ``.jsonl`` or ``.txt`` (one URL
   a line, optionally followed by whitespace and the caption: no caption, no pair, so such
   rows are dropped as ``missing_caption``).
2. :func:`list_url_shards` (on the driver): a Parquet list is cut at its row-group boundaries
   (consecutive row groups packed up to ``input.shard_size`` rows; a bigger row group is a shard
   of its own), reading nothing but its footer; a text list (CSV, TSV, JSONL, TXT), which can
   only be parsed from its start, is parsed once and normalised to
   ``OUT/_work/urls/NNNNNN.parquet`` (url, caption, src_file, src_row, src_error) in row groups
   of ``input.shard_size`` rows, one shard each. Nothing is downloaded here.
3. :func:`read_download_shard` (in the workers, the first phase): one shard's row groups as
   ingest-schema batches, in ``src_row`` order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import Counter
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pairsift.pipeline import layout, storage
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.ingest import (InputShard, Limits, _list_files, as_pylist, check_column_type, decode_caption,
                                      input_schema, is_text_type, safe_text)
from pairsift.pipeline.table import make_uid

LIST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
#: ``src_error``: a drop reason decided from the list itself (``caption_not_utf8``,
#: ``member_too_large``, ``source_corrupt``), which wins over whatever the download gives.
URL_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()),
                        ("src_file", pa.string()), ("src_row", pa.int64()), ("src_error", pa.string())])
#: The stage that supplies the pixels of URL rows (an import path, so that the engine names no
#: stage): :class:`pairsift.stages.download.DownloadStage`.
PIXELS_FROM = "pairsift.stages.download:DownloadStage"


# --------------------------------------------------------------------------- 1. preflight


def _suffix(path: str) -> str:
    return posixpath.splitext(path.lower())[1]


def _first_line(f) -> str | None:
    for raw in io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline=""):
        if raw.strip():
            return raw
    return None


def _list_columns(path: str) -> list[str] | None:
    """Column names of a URL list (None for ``.txt``, which has none)."""
    ext = _suffix(path)
    with fsspec.open(path, "rb") as f:
        if ext == ".parquet":
            try:
                schema = pq.ParquetFile(f).schema_arrow
            except Exception as e:
                raise ConfigError(f"input.path: {safe_text(path)} is not a readable Parquet file: {e}") from None
            return schema
        if ext == ".txt":
            return None
        line = _first_line(f)
    if line is None:
        raise ConfigError(f"input.path: URL list {safe_text(path)} is empty (it needs at least a header)")
    if ext == ".jsonl":
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"input.path: {path}: first line is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"input.path: {path}: each line must be a JSON object")
        return list(obj)
    return next(csv.reader([line], delimiter="\t" if ext == ".tsv" else ","))


def check_url_lists(input_spec) -> None:
    """Raise :class:`ConfigError` when there is no URL list under ``input.path`` or a list
    lacks the URL or caption column. Reads headers only."""
    if getattr(input_spec, "keep_columns", None):  # as discover() rules for non-Parquet input
        raise ConfigError("input.keep_columns: only Parquet input carries extra columns (input.format is 'urls')")
    _, _, files = _list_files(input_spec.path, LIST_SUFFIXES)
    for path, _ in files:
        names = _list_columns(path)
        if names is None:
            continue
        if isinstance(names, pa.Schema):  # a Parquet list: the columns must hold text
            for col, key in ((input_spec.url_column, "input.url_column"), (input_spec.caption_field,
                                                                            "input.caption_column")):
                check_column_type(path, names, col, key, is_text_type, "text (string or binary)")
            names = names.names
        wanted = (input_spec.url_column, input_spec.caption_field)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ConfigError(
                f"input.path: URL list {safe_text(path)} lacks column(s) {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, names))}. Set input.url_column / input.caption_column."
            )


# --------------------------------------------------------------------------- 2. the lists' rows


def _as_text(raw) -> str | None:
    """A cell as ``str``: bytes decoded as UTF-8, undecodable bytes kept as surrogates."""
    if raw is None or isinstance(raw, str):
        return raw
    return bytes(raw).decode("utf-8", "surrogateescape")


def _url(raw, limits: Limits) -> tuple[str | None, str | None]:
    """(url, reason): text with any byte that is not UTF-8 percent-encoded (``%FF``), as a
    browser sends it; a lone surrogate from JSON is percent-encoded as its UTF-8 bytes."""
    text = _as_text(raw)
    if text is None:
        return None, None
    if len(text) * 4 > limits.text and len(text.encode("utf-8", "surrogatepass")) > limits.text:
        return None, "member_too_large"
    if safe_text(text) is text:
        return text, None
    out = []
    for ch in text:
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(f"%{cp - 0xDC00:02X}")
        elif 0xD800 <= cp <= 0xDFFF:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out), None


def _caption(raw, limits: Limits) -> tuple[str | None, str | None]:
    """(caption, reason): None without a reason when there is no caption (ingest then drops
    the row as ``missing_caption``)."""
    if raw is None:
        return None, None
    caption, reason = decode_caption(_as_text(raw), limits.text)
    return caption, reason


def _read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines, undecodable bytes as surrogates."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # "\n" only: str.splitlines() would also split at characters such as U+2028 inside captions
    lines = (line.decode("utf-8", "surrogateescape").strip() for line in data.split(b"\n"))
    return [(i, line) for i, line in enumerate(lines) if line]


def _read_csv(path: str, delimiter: str, url_col: str, cap_col: str) -> tuple[list, list]:
    """URL and caption cells of a CSV/TSV as bytes: pyarrow's reader, or Python's csv module
    when pyarrow refuses the file (rows with too few or too many fields, huge cells)."""
    try:
        with fsspec.open(path, "rb") as f:
            t = pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(include_columns=[url_col, cap_col],
                                                     column_types={url_col: pa.binary(), cap_col: pa.binary()}),
            )
        return t.column(url_col).to_pylist(), t.column(cap_col).to_pylist()
    except pa.ArrowInvalid:
        pass
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        with fsspec.open(path, "rb") as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
            records = csv.reader(text, delimiter=delimiter)
            header = next(records, [])
            iu, ic = header.index(url_col), header.index(cap_col)
            urls, caps = [], []
            for rec in records:
                if not rec:  # a blank line is not a row (as in pyarrow)
                    continue
                urls.append(rec[iu] if iu < len(rec) else None)
                caps.append(rec[ic] if ic < len(rec) else None)
        return urls, caps
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(pf: pq.ParquetFile, path: str, columns: tuple[str, str], row_groups: range, first_row: int,
                  errors: list[str]) -> tuple[list, list, list, list]:
    """(rows, urls, captions, [(index, reason)]) of some row groups of a Parquet list, rows
    numbered from ``first_row``; an unreadable row group's rows come without URL or caption,
    as ``source_corrupt`` (the error is recorded; the footer says how many rows it holds)."""
    url_col, cap_col = columns
    rows, urls, caps, reasons = [], [], [], []
    row = first_row
    for rg in row_groups:
        n = pf.metadata.row_group(rg).num_rows
        done = 0
        try:
            for rb in pf.iter_batches(batch_size=65536, row_groups=[rg], columns=list(dict.fromkeys(columns))):
                rows += range(row, row + rb.num_rows)
                urls += as_pylist(rb.column(url_col))[0]
                caps += as_pylist(rb.column(cap_col))[0]
                row += rb.num_rows
                done += rb.num_rows
        except (pa.ArrowException, OSError, EOFError, ValueError) as e:
            left = n - done
            errors.append(f"{safe_text(path)}: row group {rg} (rows {row}-{row + left - 1}) could not be read: "
                          f"{type(e).__name__}: {str(e)[:300]}")
            reasons += [(len(rows) + k, "source_corrupt") for k in range(left)]
            rows += range(row, row + left)
            urls += [None] * left
            caps += [None] * left
            row += left
    return rows, urls, caps, reasons


def _decoded(rows: list, urls: list, caps: list, reasons: list, rel: str, limits: Limits) -> pa.Table:
    """Raw list cells as a :data:`URL_SCHEMA` table: text decoded, size caps applied, and the
    reason a row cannot be a pair (``src_error``) decided."""
    src_error: list[str | None] = [None] * len(rows)
    for k, reason in reasons:
        src_error[k] = reason
    url_out, cap_out = [], []
    for k, (u, c) in enumerate(zip(urls, caps)):
        url, url_reason = _url(u, limits)
        caption, cap_reason = _caption(c, limits)
        url_out.append(url)
        cap_out.append(caption)
        src_error[k] = src_error[k] or url_reason or cap_reason
    n = len(rows)
    return pa.table([pa.array(url_out, pa.string()), pa.array(cap_out, pa.string()),
                     pa.array([safe_text(rel)] * n, pa.string()), pa.array(rows, pa.int64()),
                     pa.array(src_error, pa.string())], schema=URL_SCHEMA)


def read_url_list(path: str, rel: str, input_spec, errors: list[str] | None = None) -> pa.Table:
    """One URL list as a table of :data:`URL_SCHEMA` (one row per data row of the list)."""
    ext = _suffix(path)
    url_col, cap_col = input_spec.url_column, input_spec.caption_field
    errors = errors if errors is not None else []
    rows, urls, caps, reasons = [], [], [], []
    if ext == ".txt":
        for i, line in _read_lines(path):
            parts = line.split(None, 1)
            rows.append(i)
            urls.append(parts[0])
            caps.append(parts[1] if len(parts) == 2 else None)
    elif ext == ".jsonl":
        not_str: Counter = Counter()
        for i, line in _read_lines(path):
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                obj = {}  # a broken line is a row without URL (dropped as download_failed)
            obj = obj if isinstance(obj, dict) else {}
            url, cap = obj.get(url_col), obj.get(cap_col)
            if url is not None and not isinstance(url, str):
                not_str[type(url).__name__] += 1
                url = None
            rows.append(i)
            urls.append(url)
            caps.append(None if cap is None else cap if isinstance(cap, str) else json.dumps(cap))
        if not_str:
            errors.append(f"{safe_text(path)}: {sum(not_str.values())} row(s) with a {url_col!r} that is not "
                          f"a string ({', '.join(sorted(not_str))}): url left empty")
    elif ext == ".parquet":
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            rows, urls, caps, reasons = _parquet_rows(pf, path, (url_col, cap_col), range(pf.metadata.num_row_groups),
                                                      0, errors)
    else:
        urls, caps = _read_csv(path, "\t" if ext == ".tsv" else ",", url_col, cap_col)
        rows = list(range(len(urls)))
    return _decoded(rows, urls, caps, reasons, rel, Limits.of(input_spec))


def _packed(sizes: list[int], shard_size: int) -> list[tuple[int, int, int]]:
    """Consecutive row groups packed into shards of at most ``shard_size`` rows (a bigger row
    group is a shard by itself): (first row group, end row group, first row) of each."""
    out, lo, rows, first = [], 0, 0, 0
    for k, n in enumerate(sizes):
        if k > lo and rows + n > shard_size:
            out.append((lo, k, first))
            lo, first, rows = k, first + rows, 0
        rows += n
    if lo < len(sizes):
        out.append((lo, len(sizes), first))
    return out


def _same_time(copy: str, source: str) -> None:
    """Give a local normalised list its source list's modification time: rewritten on every run
    (a restart removes ``_work``), it still names the same input as long as the list is the
    same (the compute cache knows input shards by their files' sizes and times)."""
    if storage.is_url(copy):
        return  # an object store's ETag is the content's hash already
    try:
        fs, p = storage.fs_path(source)
        mtime = fs.info(p).get("mtime")
        if mtime is not None:
            os.utime(copy, (float(mtime), float(mtime)))
    except (OSError, TypeError, ValueError):
        pass


def list_url_shards(spec) -> list[InputShard]:
    """The job's input shards, on the driver; nothing is downloaded here. Each shard's
    ``path`` is its URL list (the rows' ``source``) and ``rel`` that path relative to the input
    root (the uids' source); ``files`` says what its worker reads: (Parquet file, first row
    group, end row group, first row, ``list`` | ``normalised``). A text list's first shard
    carries, in ``notes``, what parsing it found (e.g. non-string URLs)."""
    inp = spec.input
    _, _, files = _list_files(inp.path, LIST_SUFFIXES)
    shards: list[InputShard] = []
    for i, (path, rel) in enumerate(files):
        notes: tuple[str, ...] = ()
        try:
            if _suffix(path) == ".parquet":  # read where it is, cut at its row groups
                with fsspec.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                sizes = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
                read, mode = path, "list"
            else:  # parsed once, from its start
                list_errors: list[str] = []
                table = read_url_list(path, rel, inp, list_errors)
                read, mode, notes = layout.normalised_url_list(spec.output, i), "normalised", \
                    tuple(list_errors)
                with storage.atomic_open(read) as f:
                    pq.write_table(table, f, row_group_size=inp.shard_size, compression="zstd")
                _same_time(read, path)
                n = table.num_rows
                sizes = [min(inp.shard_size, n - s) for s in range(0, n, inp.shard_size)]
        except (pa.ArrowException, OSError, ValueError, csv.Error) as e:
            raise JobError(f"URL list {safe_text(path)} could not be read: {type(e).__name__}: {e}") from e
        for k, (lo, hi, first) in enumerate(_packed(sizes, inp.shard_size)):
            shards.append(InputShard(len(shards), "urls", path, rel, notes=notes if k == 0 else (),
                                     files=(read, str(lo), str(hi), str(first), mode)))
    return shards


# --------------------------------------------------------------------------- 3. ingest


def _shard_rows(shard: InputShard, input_spec, errors: list[str]) -> pa.Table:
    """The :data:`URL_SCHEMA` rows of one shard."""
    read, lo, hi, first, mode = shard.files
    groups = range(int(lo), int(hi))
    with fsspec.open(read, "rb") as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        if mode == "normalised":
            return pf.read_row_groups(list(groups)).cast(URL_SCHEMA) if len(groups) else URL_SCHEMA.empty_table()
        rows, urls, caps, reasons = _parquet_rows(pf, shard.path, (input_spec.url_column, input_spec.caption_field),
                                                  groups, int(first), errors)
    return _decoded(rows, urls, caps, reasons, shard.rel, Limits.of(input_spec))


def read_download_shard(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Ingest-schema batches of one URL-list shard: one row per list row, in ``src_row``
    order, with no image (the download stage fetches it) and dropped only for what the list
    itself says (``src_error``: ``caption_not_utf8``, ``member_too_large``,
    ``source_corrupt``; no caption: ``missing_caption``)."""
    table = _shard_rows(shard, input_spec, errors)
    schema = input_schema(shard, input_spec)
    source = safe_text(shard.path)
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        n = part.num_rows
        rows = part.column("src_row").to_pylist()
        captions = part.column("caption").to_pylist()
        reasons = [e or (None if c is not None else "missing_caption")
                   for e, c in zip(part.column("src_error").to_pylist(), captions)]
        cols = {
            "uid": [make_uid(shard.rel, str(r)) for r in rows],
            "key": [str(r) for r in rows],
            "source": [source] * n,
            "url": part.column("url").to_pylist(),
            "caption": captions,
            "drop_reason": reasons,
            "drop_stage": ["ingest" if r else None for r in reasons],
        }
        yield pa.table([pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema],
                       schema=schema)
