"""Job spec validation: every mistake is one clear error naming the key, before any work."""

from __future__ import annotations

import pytest
import yaml

from pairsift.cli import main
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.spec import load_job, parse_job


def _raw(tmp_path, **over):
    raw = {
        "name": "t",
        "input": {"format": "webdataset", "path": str(tmp_path)},
        "output": str(tmp_path / "out"),
        "stages": [{"quality": {"min_side": 32}}, {"exact_dedup": {}}],
    }
    raw.update(over)
    return raw


def test_valid_spec_parses_typed_stage_configs(tmp_path):
    spec = parse_job(_raw(tmp_path))
    assert [s.name for s in spec.stages] == ["quality", "exact_dedup"]
    assert spec.stages[0].config.min_side == 32
    assert spec.stages[0].config.max_aspect == 3.0  # default
    assert spec.emit.shard_size == 10000


@pytest.mark.parametrize(
    "over, expected",
    [
        ({"stages": [{"qualty": {}}]}, "unknown stage 'qualty'"),
        ({"stages": [{"quality": {"min_side": "big"}}]}, "quality: min_side"),
        ({"stages": [{"quality": {"min_sides": 3}}]}, "min_sides: unknown key"),
        ({"emit": {"shard_size": 0}}, "emit.shard_size"),
        ({"input": {"format": "zip", "path": "x"}}, "input.format"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"stages": [{"quality": {}, "exact_dedup": {}}]}, "must be one"),
    ],
)
def test_bad_spec_names_the_key(tmp_path, over, expected):
    with pytest.raises(ConfigError) as e:
        parse_job(_raw(tmp_path, **over))
    assert expected in str(e.value)


def test_fingerprint_ignores_where_and_how_many_cpus(tmp_path):
    a = parse_job(_raw(tmp_path))
    b = parse_job(_raw(tmp_path, output=str(tmp_path / "elsewhere"), ray={"num_cpus": 1}))
    c = parse_job(_raw(tmp_path, seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_paths_relative_to_the_spec_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    p = tmp_path / "jobs" / "j.yaml"
    p.write_text(yaml.safe_dump({"name": "j", "input": {"format": "webdataset", "path": "../data"}, "output": "../out"}))
    spec = load_job(p)
    assert spec.input.path == str(tmp_path / "data")
    assert spec.output == str(tmp_path / "out")
    assert load_job(p, output="/abs/o", num_cpus=3).output == "/abs/o"


@pytest.mark.parametrize(
    "over, expected",
    [
        ({"stages": [{"nope": {}}]}, "unknown stage"),
        ({"input": {"format": "webdataset", "path": "/does/not/exist"}}, "no such file or folder"),
    ],
)
def test_cli_config_errors_exit_2_and_write_nothing(tmp_path, capsys, over, expected):
    raw = _raw(tmp_path, **over)
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and expected in err
    assert not (tmp_path / "out").exists()


def test_cli_parquet_missing_columns_exit_2(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"URL": ["http://x/a.jpg"], "TEXT": ["a"]}), tmp_path / "in" / "a.parquet")
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(_raw(tmp_path, input={"format": "parquet", "path": str(tmp_path / "in")})))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s) 'image', 'caption'" in err and "a.parquet" in err
    assert not (tmp_path / "out").exists()
