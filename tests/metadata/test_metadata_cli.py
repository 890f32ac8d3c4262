"""`pairsift metaclip match` and `pairsift metadata build` from the command line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.cli import main
from pairsift.metadata.load import load_metadata
from pairsift.metadata.match import brute_force_match


def test_metaclip_match_writes_entries(tmp_path, capsys):
    entries = ["dog", "cat", "hot dog", "New York", "photo", "a"]
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps(entries))
    texts = ["a photo of a dog", "Hot dog, New York!", None, "", "cats", "hot dog\tstand"] * 700
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "in.parquet")
    rc = main(["metaclip", "match", "--metadata", str(meta), "--input", str(tmp_path / "in.parquet"),
               "--text-column", "text", "--output", str(tmp_path / "out.parquet"), "--batch-size", "1000"])
    assert rc == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["id", "text", "metaclip_entries"]
    assert out.schema.field("metaclip_entries").type == pa.list_(pa.int32())
    assert out.column("id").to_pylist() == list(range(len(texts)))
    assert out.column("metaclip_entries").to_pylist() == brute_force_match(texts, entries)
    assert "4,200 rows" in capsys.readouterr().out


def test_metaclip_match_bad_arguments_exit_2(tmp_path, capsys):
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "in.parquet")
    base = ["metaclip", "match", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o.parquet")]
    assert main(base + ["--metadata", str(tmp_path / "none.json"), "--text-column", "text"]) == 2
    assert "--metadata" in capsys.readouterr().err
    assert main(base + ["--metadata", "en", "--text-column", "caption"]) == 2
    assert "--text-column" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_metadata_build_command(tmp_path, capsys):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": ["a teddy bear", "the teddy bear", "teddy bear toy"] * 3}), corpus)
    out = tmp_path / "x.json.gz"
    rc = main(["metadata", "build", "--out", str(out), "--no-wordnet", "--min-zipf", "6", "--corpus", str(corpus),
               "--min-pmi", "0", "--min-bigram-count", "3", "--manifest", str(tmp_path / "x.manifest.json")])
    assert rc == 0
    entries = load_metadata(str(out))
    report = json.loads((tmp_path / "x.manifest.json").read_text())
    assert report["entries"] == len(entries) and "teddy bear" in entries and entries[100] == "the"
    assert main(["metadata", "build", "--out", str(out), "--corpus", str(tmp_path / "none.txt"), "--no-wordnet"]) == 2
