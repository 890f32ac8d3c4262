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
from pairsift.stages.ingest import InputShard, _list_files, _RowBuffer, decode_caption

LIST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
URL_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()),
                        ("src_file", pa.string()), ("src_row", pa.int64())])
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
                return pq.ParquetFile(f).schema_arrow.names
            except Exception as e:
                raise ConfigError(f"input.path: {path} is not a readable Parquet file: {e}") from None
        if ext == ".txt":
            return None
        line = _first_line(f)
    if line is None:
        raise ConfigError(f"input.path: URL list {path} is empty (it needs at least a header)")
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
        wanted = (input_spec.url_column, input_spec.caption_field)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ConfigError(
                f"input.path: URL list {path} lacks column(s) {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, names))}. Set input.url_column / input.caption_column."
            )


# --------------------------------------------------------------------------- 2. download


def _strings(col) -> pa.Array:
    """A column as strings: non-string values are written out, bytes decoded as UTF-8."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in col.to_pylist()]
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def _read_lines(path: str) -> list[tuple[int, str]]:
    with fsspec.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", "replace")
    # "\n" only: str.splitlines() would also split at characters such as U+2028 inside captions
    return [(i, line.strip()) for i, line in enumerate(text.split("\n")) if line.strip()]


def read_url_list(path: str, rel: str, input_spec) -> pa.Table:
    """One URL list as a table of :data:`URL_SCHEMA`."""
    ext = _suffix(path)
    url_col, cap_col = input_spec.url_column, input_spec.caption_field
    if ext == ".txt":
        rows, urls, caps = [], [], []
        for i, line in _read_lines(path):
            parts = line.split(None, 1)
            rows.append(i)
            urls.append(parts[0])
            caps.append(parts[1] if len(parts) == 2 else None)
    elif ext == ".jsonl":
        rows, urls, caps = [], [], []
        for i, line in _read_lines(path):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {}  # a broken line is a row whose download fails (no URL)
            obj = obj if isinstance(obj, dict) else {}
            rows.append(i)
            urls.append(obj.get(url_col))
            caps.append(obj.get(cap_col))
        urls = [None if u is None else str(u) for u in urls]
        caps = [None if c is None else c if isinstance(c, str) else json.dumps(c) for c in caps]
    else:
        with fsspec.open(path, "rb") as f:
            if ext == ".parquet":
                t = pq.read_table(f, columns=[url_col, cap_col])
            else:
                t = pacsv.read_csv(
                    f,
                    parse_options=pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",",
                                                     newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=[url_col, cap_col],
                        column_types={url_col: pa.string(), cap_col: pa.string()}),
                )
        rows = list(range(t.num_rows))
        urls, caps = _strings(t.column(url_col)), _strings(t.column(cap_col))
    n = len(rows)
    return pa.table([pa.array(urls, pa.string()), pa.array(caps, pa.string()),
                     pa.array([rel] * n, pa.string()), pa.array(rows, pa.int64())], schema=URL_SCHEMA)


def _finished(dl_dir: str) -> set[str]:
    """Names of the download shards img2dataset finished (it writes their stats file last)."""
    fs, p = storage.fs_path(dl_dir)
    if not fs.exists(p):
        return set()
    return {posixpath.basename(f)[: -len("_stats.json")] for f in fs.glob(p + "/*_stats.json")}


def prepare_downloads(spec, processes: int) -> list[InputShard]:
    """Normalise the URL lists, download them with img2dataset (skipping finished shards)
    and return one input shard per download shard, in shard order. Each shard's ``files``
    holds the path of the URL list it came from (the rows' ``source``)."""
    inp = spec.input
    _, _, files = _list_files(inp.path, LIST_SUFFIXES)
    urls_dir = storage.join(spec.output, "_work", "urls")
    dl_dir = storage.join(spec.output, "_work", "download")
    storage.remove_tree(urls_dir)  # img2dataset reads every Parquet file there
    shard_lists: list[str] = []  # the URL list of each download shard
    for i, (path, rel) in enumerate(files):
        try:
            table = read_url_list(path, rel, inp)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise JobError(f"URL list {path} could not be read: {type(e).__name__}: {e}") from e
        with storage.atomic_open(storage.join(urls_dir, f"{i:06d}.parquet")) as f:
            pq.write_table(table, f)
        shard_lists += [path] * math.ceil(table.num_rows / inp.shard_size)
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
    return [InputShard(i, "download", storage.join(dl_dir, f"{n}.tar"), rel=f"{n}.tar", files=(src,))
            for i, (n, src) in enumerate(zip(names, shard_lists))]


def _run_img2dataset(spec, urls_dir: str, dl_dir: str, digits: int, processes: int) -> None:
    """``img2dataset.download`` in a child process: its prints, progress bars, signal
    handler and spawned workers stay out of the caller's process."""
    inp = spec.input
    kwargs = dict(
        url_list=urls_dir, output_folder=dl_dir, input_format="parquet", url_col="url",
        caption_col="caption", output_format="webdataset", resize_mode="no",
        disable_all_reencoding=True, number_sample_per_shard=inp.shard_size,
        processes_count=processes, thread_count=inp.download_threads, timeout=inp.download_timeout,
        retries=inp.download_retries, save_additional_columns=["src_file", "src_row"],
        enable_wandb=False, distributor="multiprocessing", incremental_mode="incremental",
        oom_shard_count=digits, extract_exif=False, compute_hash=None,
    )
    env = {**os.environ, **_QUIET_ENV}
    with tempfile.TemporaryFile() as log:
        rc = subprocess.call([sys.executable, "-m", "pairsift.stages.download", json.dumps(kwargs)],
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
        errors.append(f"{path}: {type(e).__name__}: {e}")
    return tf, members


def _member_bytes(tf: tarfile.TarFile | None, info: tarfile.TarInfo | None, path: str,
                  errors: list[str]) -> bytes | None:
    if tf is None or info is None:
        return None
    try:
        return tf.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        errors.append(f"{path}: {info.name}: {type(e).__name__}: {e}")
        return None


def read_download_shard(shard: InputShard, input_spec, batch_size: int, errors: list[str]) -> Iterator[pa.Table]:
    """Base-schema batches of one img2dataset shard: one row per URL of the shard (from its
    ``.parquet``), in ``src_row`` order, with the bytes from its ``.tar`` where the download
    succeeded."""
    buf = _RowBuffer(shard, batch_size)
    with fsspec.open(shard.path[: -len(".tar")] + ".parquet", "rb") as f:
        meta = pq.read_table(f, columns=["url", "caption", "src_file", "src_row", "key", "status", "error_message"])
    meta = meta.sort_by([("src_file", "ascending"), ("src_row", "ascending")])
    list_path = shard.files[0] if shard.files else None  # set by prepare_downloads
    failures: Counter = Counter()
    with fsspec.open(shard.path, "rb") as f:
        tf, members = _index_tar(f, shard.path, errors)
        for r in meta.to_pylist():
            caption, reason = decode_caption(r["caption"])
            image = None
            if r["status"] == "success":
                image = _member_bytes(tf, members.get(r["key"]), shard.path, errors)
                if image is None:  # listed as downloaded, but not readable in the tar
                    reason = "source_truncated"
            else:  # failed_to_download (or failed_to_resize, which resize_mode "no" never gives)
                caption, reason = r["caption"], "download_failed"
                failures[r["error_message"] or r["status"] or "unknown error"] += 1
            buf.add(str(r["src_row"]), image, caption, r["url"], reason,
                    source=list_path or r["src_file"], uid_source=r["src_file"])
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
