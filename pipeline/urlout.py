"""The output of a caption-only job (``emit.images: false``): Parquet rows and a URL list of the
kept pairs, no training shards. MetaCLIP's workflow (Xu et al. 2023): curate the alt texts of
the whole pool first, then download only what the curation kept.

For each emit task (kept rows ``[k*S, (k+1)*S)`` in input order, as for training shards):

```
OUT/metadata/NNNNNN.parquet    the kept rows (every column the stages wrote), ``shard`` = urls/NNNNNN.parquet
OUT/urls/NNNNNN.parquet        url, caption, uid of the same rows, in the same order
```

``urls/`` is what img2dataset reads as it is (``img2dataset --input_format parquet --url_col
url --caption_col caption --save_additional_columns '["uid"]'``), or what a later pairsift job
reads with ``input.format: urls``. ``rejected/`` is written by the final phase as in every job.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.pipeline import layout, storage
from pairsift.pipeline.emit import EmitTask, read_slice

#: The folder under the output that holds the URL lists.
URLS = "urls"
URL_LIST_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("uid", pa.string())])
#: Columns that describe image bytes, which a caption-only job does not have.
_IMAGE_COLUMNS = ("image", "transcoded", "image_offset", "image_size")


url_list_path = layout.url_list_path


def _rows(task: EmitTask) -> pa.Table:
    """The task's rows from the final phase's work shards (columns only: there are no images)."""
    parts = [t for s in task.slices if (t := read_slice(s, drop=_IMAGE_COLUMNS)) is not None]
    return pa.concat_tables(parts, promote_options="permissive")


def write_url_shard(output: str, task: EmitTask) -> dict:
    """Write one URL list and its metadata; return {name, samples, bytes}."""
    table = _rows(task)
    name = f"{URLS}/{task.name}.parquet"
    urls = pa.table([table.column(c).cast(URL_LIST_SCHEMA.field(c).type) for c in URL_LIST_SCHEMA.names],
                    schema=URL_LIST_SCHEMA)
    path = url_list_path(output, task.name)
    with storage.atomic_open(path) as f:
        pq.write_table(urls, f, compression="zstd")
    meta = table.drop_columns([c for c in _IMAGE_COLUMNS if c in table.column_names])
    meta = meta.append_column("shard", pa.array([name] * meta.num_rows, pa.string()))
    with storage.atomic_open(layout.metadata_path(output, task.name)) as f:
        pq.write_table(meta, f, compression="zstd")
    fs, p = storage.fs_path(path)
    return {"name": name, "samples": table.num_rows, "bytes": fs.size(p)}
