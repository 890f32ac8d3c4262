"""URL lists (``input.format: urls``): download with img2dataset, then ingest like any shard.

Rule: every row of every URL list becomes exactly one row of
:data:`~pairsift.pipeline.table.BASE_SCHEMA`, downloaded or not. Its ``uid`` is
``make_uid(src_file, str(src_row))``, where ``src_file`` is the list's path relative to the
input root and ``src_row`` its 0-based row there (data rows for CSV/TSV/Parquet, lines for
TXT/JSONL; blank lines are skipped but counted), so ids do not depend on shard sizes, on
which downloads succeeded or on the run. ``key`` is ``str(src_row)``, ``source`` the list's
path and ``url`` the URL as listed. A URL that img2dataset could not fetch is a row with no
image and ``drop_reason = "download_failed"`` (its error message goes to the shard's
``source_errors``, counted per message: the base schema has no column for it); a downloaded
body is kept byte for byte as received (no resizing, no re-encoding, no decode check here:
a body that is not an image, such as an HTML page served with status 200, is dropped later
by ``quality`` as ``decode_error``).

Hostile lists do not stop the job: a caption that is not UTF-8 (or a JSON string with a lone
surrogate) is ``caption_not_utf8``, one over ``input.max_text_bytes`` ``member_too_large``
(both decided when the list is read, whatever the download gives; ``src_error`` carries the
reason through img2dataset); a URL that is not UTF-8 has its other bytes percent-encoded (as a
browser sends them); a JSONL ``url`` that is not a string is left empty (the row fails to
download); a CSV/TSV row with too few or too many fields is read by Python's csv module (a
missing field is empty); a Parquet list's unreadable row group gives rows without URL
(``source_corrupt``); a Parquet list whose URL or caption column is not text is a
configuration error at preflight; a downloaded body over ``input.max_image_bytes`` is dropped
unread as ``member_too_large``.

Three steps:

1. :func:`check_url_lists` (preflight, nothing written): every list must have the URL column
   (``input.url_column``) and the caption column (``input.caption_column``, default
   ``caption``): the header of CSV/TSV, the schema of Parquet, the keys of a JSONL list's
   first object. Lists are ``.csv``, ``.tsv``, ``.parquet``, ``.jsonl`` or ``.txt`` (one URL
   a line, optionally followed by whitespace and the caption: no caption, no pair, so such
   rows are dropped as ``missing_caption``).
2. :func:`prepare_downloads` (on the driver): normalise each list to
   ``OUT/_work/urls/NNNNNN.parquet`` (url, caption, src_file, src_row), then run
   ``img2dataset.download`` once, in a subprocess, into ``OUT/_work/download/`` (its output
   goes to ``OUT/_work/download.log``). img2dataset cuts each list into shards of
   ``input.shard_size`` URLs and writes ``NNNNN.tar`` (the downloaded samples),
   ``NNNNN.parquet`` (one row per URL, failed ones included) and ``NNNNN_stats.json`` last; a
   rerun of a killed job skips the shards that have their stats file, and does not start
   img2dataset at all when every shard has one.
3. :func:`read_download_shard` (in the ingest workers): one download shard to base-schema
   batches, rows in ``src_row`` order.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pairsift.pipeline import storage
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.ingest import (InputShard, Limits, TooLarge, _list_files, _RowBuffer, as_pylist,
                                    check_column_type, decode_caption, is_text_type, parquet_batches, safe_text)

LIST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
#: ``src_error``: a drop reason decided from the list itself (``caption_not_utf8``,
#: ``member_too_large``, ``source_corrupt``), which wins over whatever the download gives.
URL_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()),
                        ("src_file", pa.string()), ("src_row", pa.int64()), ("src_error", pa.string())])
#: Environment of the img2dataset process: no update checks, no telemetry, no W&B.
_QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


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


# --------------------------------------------------------------------------- 2. download


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


def read_url_list(path: str, rel: str, input_spec, errors: list[str] | None = None) -> pa.Table:
    """One URL list as a table of :data:`URL_SCHEMA` (one row per data row of the list)."""
    ext = _suffix(path)
    url_col, cap_col = input_spec.url_column, input_spec.caption_field
    limits = Limits.of(input_spec)
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
                obj = {}  # a broken line is a row whose download fails (no URL)
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
            for rb in parquet_batches(pf, list(dict.fromkeys([url_col, cap_col])), 65536, path, errors):
                if isinstance(rb, int):  # a row group that could not be read
                    first = len(rows)
                    rows += range(first, first + rb)
                    urls += [None] * rb
                    caps += [None] * rb
                    reasons += [(first + k, "source_corrupt") for k in range(rb)]
                    continue
                rows += range(len(rows), len(rows) + rb.num_rows)
                urls += as_pylist(rb.column(url_col))[0]
                caps += as_pylist(rb.column(cap_col))[0]
    else:
        urls, caps = _read_csv(path, "\t" if ext == ".tsv" else ",", url_col, cap_col)
        rows = list(range(len(urls)))
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


def _finished(dl_dir: str) -> set[str]:
    """Names of the download shards img2dataset finished (it writes their stats file last)."""
    fs, p = storage.fs_path(dl_dir)
    if not fs.exists(p):
        return set()
    return {posixpath.basename(f)[: -len("_stats.json")] for f in fs.glob(p + "/*_stats.json")}


def prepare_downloads(spec, processes: int) -> list[InputShard]:
    """Normalise the URL lists, download them with img2dataset (skipping finished shards)
    and return one input shard per download shard, in shard order. Each shard's ``files``
    holds the path of the URL list it came from (the rows' ``source``) and that path relative
    to the input root (the uids' source); the first shard of a list carries, in ``notes``,
    what reading the list found (unreadable row groups, non-string URLs)."""
    inp = spec.input
    _, _, files = _list_files(inp.path, LIST_SUFFIXES)
    urls_dir = storage.join(spec.output, "_work", "urls")
    dl_dir = storage.join(spec.output, "_work", "download")
    storage.remove_tree(urls_dir)  # img2dataset reads every Parquet file there
    shard_lists: list[tuple[str, str]] = []  # the URL list (path, rel) of each download shard
    notes: list[tuple[str, ...]] = []  # what reading the list found, for its first download shard
    for i, (path, rel) in enumerate(files):
        list_errors: list[str] = []
        try:
            table = read_url_list(path, rel, inp, list_errors)
        except (pa.ArrowException, OSError, ValueError, csv.Error) as e:
            raise JobError(f"URL list {safe_text(path)} could not be read: {type(e).__name__}: {e}") from e
        with storage.atomic_open(storage.join(urls_dir, f"{i:06d}.parquet")) as f:
            pq.write_table(table, f)
        count = math.ceil(table.num_rows / inp.shard_size)
        shard_lists += [(path, rel)] * count
        notes += [tuple(list_errors)] + [()] * (count - 1)
    digits = max(5, len(str(len(shard_lists))))
    names = [f"{i:0{digits}d}" for i in range(len(shard_lists))]  # img2dataset's shard names
    todo = set(names) - _finished(dl_dir)
    if todo:
        _run_img2dataset(spec, urls_dir, dl_dir, digits, max(1, min(processes, len(todo))))
        done = _finished(dl_dir)
        unfinished = [n for n in names if n not in done]
        if unfinished:
            raise JobError(
                f"img2dataset did not finish {len(unfinished)} of {len(names)} download shard(s) "
                f"({', '.join(unfinished[:5])}{', ...' if len(unfinished) > 5 else ''}); see "
                f"{storage.join(spec.output, '_work', 'download.log')}. A rerun resumes."
            )
    return [InputShard(i, "download", storage.join(dl_dir, f"{n}.tar"), rel=f"{n}.tar", files=(src, src_rel),
                       notes=note)
            for i, (n, (src, src_rel), note) in enumerate(zip(names, shard_lists, notes))]


def _run_img2dataset(spec, urls_dir: str, dl_dir: str, digits: int, processes: int) -> None:
    """``img2dataset.download`` in a child process: its prints, progress bars, signal
    handler and spawned workers stay out of the caller's process."""
    inp = spec.input
    kwargs = dict(
        url_list=urls_dir, output_folder=dl_dir, input_format="parquet", url_col="url",
        caption_col="caption", output_format="webdataset", resize_mode="no",
        disable_all_reencoding=True, number_sample_per_shard=inp.shard_size,
        processes_count=processes, thread_count=inp.download_threads, timeout=inp.download_timeout,
        retries=inp.download_retries, save_additional_columns=["src_file", "src_row", "src_error"],
        enable_wandb=False, distributor="multiprocessing", incremental_mode="incremental",
        oom_shard_count=digits, extract_exif=False, compute_hash=None,
    )
    env = {**os.environ, **_QUIET_ENV}
    with tempfile.TemporaryFile() as log:
        rc = subprocess.call([sys.executable, "-m", "pairsift.pipeline.urllists", json.dumps(kwargs)],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.seek(0)
        text = log.read()
    with storage.atomic_open(storage.join(spec.output, "_work", "download.log")) as f:
        f.write(text)
    if rc != 0:
        tail = text.decode("utf-8", "replace").strip().splitlines()[-15:]
        raise JobError(f"img2dataset exited with status {rc}:\n" + "\n".join(tail))


# --------------------------------------------------------------------------- 3. ingest


def _index_tar(f, path: str, errors: list[str]) -> tuple[tarfile.TarFile | None, dict[str, tarfile.TarInfo]]:
    """Open an img2dataset tar for random access: img2dataset key -> its image member (the one
    that is neither ``.txt`` nor ``.json``). Samples are in download order, rows are not."""
    tf, members = None, {}
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
        for info in tf:
            key, _, ext = info.name.partition(".")
            if info.isfile() and ext not in ("txt", "json"):
                members[key] = info
    except (tarfile.TarError, EOFError, OSError) as e:
        errors.append(f"{safe_text(path)}: {type(e).__name__}: {e}")
    return tf, members


def _member_bytes(tf: tarfile.TarFile | None, info: tarfile.TarInfo | None, path: str,
                  errors: list[str], max_bytes: int):
    """The member's bytes; ``TooLarge`` when it is over ``max_bytes`` (not read); None when
    it cannot be read."""
    if tf is None or info is None:
        return None
    if info.size > max_bytes:
        return TooLarge(info.size)
    try:
        return tf.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        errors.append(f"{safe_text(path)}: {safe_text(info.name)}: {type(e).__name__}: {e}")
        return None


def read_download_shard(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Base-schema batches of one img2dataset shard: one row per URL of the shard (from its
    ``.parquet``), in ``src_row`` order, with the bytes from its ``.tar`` where the download
    succeeded. A reason found in the list itself (``src_error``) wins over the download's."""
    buf = _RowBuffer(shard, batch_size)
    limits = Limits.of(input_spec)
    wanted = ["url", "caption", "src_file", "src_row", "src_error", "key", "status", "error_message"]
    with fsspec.open(shard.path[: -len(".tar")] + ".parquet", "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.read(columns=[c for c in wanted if c in pf.schema_arrow.names])  # src_error: newer shards
    meta = meta.sort_by([("src_file", "ascending"), ("src_row", "ascending")])
    list_path = shard.files[0] if shard.files else None  # set by prepare_downloads
    list_rel = shard.files[1] if len(shard.files) > 1 else None  # raw: a name that is not UTF-8 too
    failures: Counter = Counter()
    with fsspec.open(shard.path, "rb") as f:
        tf, members = _index_tar(f, shard.path, errors)
        for r in meta.to_pylist():
            caption, reason = decode_caption(r["caption"], limits.text)
            image = None
            if r.get("src_error"):
                caption, reason = r["caption"], r["src_error"]
            elif r["status"] == "success":
                image = _member_bytes(tf, members.get(r["key"]), shard.path, errors, limits.image)
                if isinstance(image, TooLarge):
                    image, reason = None, "member_too_large"
                elif image is None:  # listed as downloaded, but not readable in the tar
                    reason = "source_truncated"
            else:  # failed_to_download (or failed_to_resize, which resize_mode "no" never gives)
                caption, reason = r["caption"], "download_failed"
                failures[r["error_message"] or r["status"] or "unknown error"] += 1
            uid_source = list_rel if list_rel is not None and safe_text(list_rel) == r["src_file"] else r["src_file"]
            buf.add(str(r["src_row"]), image, caption, r["url"], reason,
                    source=list_path or r["src_file"], uid_source=uid_source)
            if buf.full():
                yield buf.flush()
    if failures:
        top = "; ".join(f"{msg} (x{n})" for msg, n in failures.most_common(5))
        more = f"; {len(failures) - 5} other message(s)" if len(failures) > 5 else ""
        errors.append(f"{shard.rel}: {sum(failures.values())} of {meta.num_rows} URL(s) failed to "
                      f"download: {top}{more}")
    t = buf.flush()
    if t is not None:
        yield t


if __name__ in ("__main__", "__mp_main__"):  # the img2dataset process and the workers it spawns
    # webdataset imports torch only for its optional DataLoader glue, which img2dataset does not
    # use; torch takes seconds to import in every process img2dataset spawns, so skip it.
    sys.modules.setdefault("torch", None)

if __name__ == "__main__":
    import img2dataset

    img2dataset.download(**json.loads(sys.argv[1]))
