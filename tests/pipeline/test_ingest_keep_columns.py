"""Ingest: ``input.keep_columns`` carries extra Parquet source columns into the rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_job
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import INGEST_SCHEMA as BASE_SCHEMA  # the base schema and the image locator
from pairsift.pipeline.ingest import discover, input_schema, read_shard


def _source(path, n=10):
    emb = np.arange(n * 3, dtype=np.float16).reshape(n, 3)
    pq.write_table(pa.table({
        "image": pa.array([b"img%d" % i for i in range(n)], pa.binary()),
        "caption": pa.array([f"caption {i}" for i in range(n)]),
        "image_emb": pa.array([list(r) for r in emb], pa.list_(pa.float16())),
        "score": pa.array(np.linspace(0, 1, n), pa.float64()),
        "other": pa.array(["x"] * n),
    }), path)
    return emb


def test_kept_columns_travel_with_their_types_across_batches(tmp_path):
    emb = _source(tmp_path / "a.parquet")
    job = make_job(tmp_path / "a.parquet", tmp_path / "out", fmt="parquet",
                   input={"keep_columns": ["image_emb", "score"]})
    (shard,) = discover(job.input)
    schema = input_schema(shard, job.input)
    assert schema.names == BASE_SCHEMA.names + ["image_emb", "score"]
    batches = list(read_shard(shard, job.input, 4, []))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    table = pa.concat_tables(batches)
    assert table.schema == schema
    assert table.schema.field("image_emb").type == pa.list_(pa.float16())
    assert np.array_equal(np.array(table.column("image_emb").to_pylist(), np.float16), emb)
    assert table.column("caption").to_pylist()[3] == "caption 3" and "other" not in table.column_names


def test_without_keep_columns_the_rows_are_the_base_schema(tmp_path):
    _source(tmp_path / "a.parquet")
    job = make_job(tmp_path / "a.parquet", tmp_path / "out", fmt="parquet")
    (shard,) = discover(job.input)
    assert input_schema(shard, job.input) == BASE_SCHEMA
    assert pa.concat_tables(read_shard(shard, job.input, 4, [])).schema == BASE_SCHEMA


@pytest.mark.parametrize("fmt, keep, message", [
    ("parquet", ["nope"], "input.keep_columns: .* lacks column"),
    ("parquet", ["caption"], "input.keep_columns: 'caption' would replace"),
    ("folder", ["image_emb"], "input.keep_columns: only Parquet"),
])
def test_bad_keep_columns_are_config_errors_naming_the_key(tmp_path, fmt, keep, message):
    _source(tmp_path / "a.parquet")
    job = make_job(tmp_path / "a.parquet", tmp_path / "out", fmt=fmt, input={"keep_columns": keep})
    with pytest.raises(ConfigError, match=message):
        discover(job.input)
