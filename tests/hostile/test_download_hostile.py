"""Issue 12, readers: hostile URL lists (``input.format: urls``). Each list used to stop the
job (exit 1) or crash it; now every data row of every list ends exactly once in kept ∪
rejected, with the reason found in the list itself winning over the download's: such a row is
dropped when the list is read and never fetched (issue 13: the ``download`` stage fetches in
the workers, and the server's log shows what it fetched).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_job
from hostile_inputs import corrupt_row_group, jpeg
from pairsift.cli import main as cli_main
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import make_uid
from pairsift.pipeline.urllists import check_url_lists, read_url_list
from url_server import requested, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, request log) of a local server holding a.jpg, b.jpg and big.jpg."""
    www = tmp_path_factory.mktemp("www")
    (www / "a.jpg").write_bytes(jpeg(1))
    (www / "b.jpg").write_bytes(jpeg(2))
    (www / "big.jpg").write_bytes(jpeg(3, size=(600, 600)))
    with serve(www) as (base, log):
        yield base, log


def _input(path: Path, **opts):
    return make_job(path, path.parent / "out", stages=[{"quality": {"min_side": 16}}], fmt="urls",
                    input={"shard_size": 4, "download_timeout": 5, "download_threads": 2, **opts},
                    ray={"num_cpus": 1}).input


def _hostile_lists(root: Path, base: str) -> dict[tuple[str, int], str | None]:
    """Lists with every kind of damage; returns the expected drop reason of each (list, row)
    (None: kept)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[tuple[str, int], str | None] = {}
    # CSV: a caption that is not UTF-8, a URL that is not UTF-8, a ragged row, a huge caption.
    (root / "a.csv").write_bytes(b"url,caption,extra\n"
                                 + base.encode() + b"a.jpg,fine caption,1\n"
                                 + base.encode() + b"b.jpg,caf\xe9 in latin-1,2\n"
                                 + base.encode() + b"\xff.jpg,a url that is not utf-8,3\n"
                                 + base.encode() + b"a.jpg,too,many,fields,here\n"
                                 + base.encode() + b"b.jpg\n"
                                 + base.encode() + b"a.jpg," + b"w" * 5000 + b",6\n")
    expected.update({("a.csv", 0): None, ("a.csv", 1): "caption_not_utf8", ("a.csv", 2): "download_failed",
                     ("a.csv", 3): None, ("a.csv", 4): "missing_caption", ("a.csv", 5): "member_too_large"})
    # JSONL: urls of the wrong type, lone surrogates in url and caption.
    (root / "b.jsonl").write_text("\n".join([
        '{"url": 5, "caption": "a number"}',
        '{"url": {"x": 1}, "caption": "an object"}',
        '{"url": "' + base + 'a.jpg", "caption": "lone \\ud800 surrogate"}',
        '{"url": "' + base + '\\udcff.jpg", "caption": "surrogate url"}',
        '{"url": "' + base + 'b.jpg", "caption": "fine"}',
    ]) + "\n")
    expected.update({("b.jsonl", 0): "download_failed", ("b.jsonl", 1): "download_failed",
                     ("b.jsonl", 2): "caption_not_utf8", ("b.jsonl", 3): "download_failed", ("b.jsonl", 4): None})
    # TXT with bytes that are not UTF-8 in a caption.
    (root / "c.txt").write_bytes(base.encode() + b"a.jpg ok caption\n" + base.encode() + b"b.jpg bad \xc3\x28 caption\n")
    expected.update({("c.txt", 0): None, ("c.txt", 1): "caption_not_utf8"})
    # Parquet: row group 1 of 3 corrupt; one image over the image cap.
    urls = [base + "a.jpg", base + "b.jpg", base + "a.jpg", base + "b.jpg", base + "big.jpg", base + "a.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [f"pq caption {i}" for i in range(6)]}),
                   root / "d.parquet", row_group_size=2)
    corrupt_row_group(root / "d.parquet", 1)
    expected.update({("d.parquet", i): r for i, r in
                     enumerate([None, None, "source_corrupt", "source_corrupt", "member_too_large", None])})
    return expected


def test_hostile_url_lists_every_row_once(ray_session, server, tmp_path):
    base, log = server
    lists = tmp_path / "lists"
    expected = _hostile_lists(lists, base)
    before = len(log)
    out = tmp_path / "out"
    big = len(jpeg(3, size=(600, 600)))
    spec = make_job(lists, out, stages=[{"quality": {"min_side": 16}}], fmt="urls",
                    input={"shard_size": 4, "download_timeout": 5, "download_threads": 2,
                           "max_text_bytes": 4096, "max_image_bytes": big - 1}, ray={"num_cpus": 1})
    result = run_job(spec)
    rows = []
    for sub in ("metadata", "rejected"):
        rows += [r for f in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == len({r["uid"] for r in rows}) == len(expected)
    got = {(Path(r["source"]).name, int(r["key"])): r for r in rows}
    assert {k: r["drop_reason"] for k, r in got.items()} == expected
    assert all(r["uid"] == make_uid(f, str(i)) for (f, i), r in got.items())
    assert got[("a.csv", 2)]["url"] == base + "%FF.jpg"  # percent-encoded as a browser sends it
    assert got[("b.jsonl", 3)]["url"] == base + "%FF.jpg"
    assert got[("a.csv", 3)]["caption"] == "too"  # a ragged row: its fields as far as they go
    # What the list decides is decided at ingest, and those rows are never fetched; what the
    # download decides is the download stage's.
    stages = {k: r["drop_stage"] for k, r in got.items() if r["drop_reason"]}
    assert {k: st for k, st in stages.items() if st == "download"} == {
        ("a.csv", 2): "download", ("b.jsonl", 0): "download", ("b.jsonl", 1): "download",
        ("b.jsonl", 3): "download", ("d.parquet", 4): "download"}
    assert all(st == "ingest" for k, st in stages.items() if k not in {("a.csv", 2), ("b.jsonl", 0), ("b.jsonl", 1),
                                                                      ("b.jsonl", 3), ("d.parquet", 4)})
    assert got[("b.jsonl", 0)]["download_error"] == "no url"
    # a.jpg: a.csv rows 0 and 3, c.txt row 0, d.parquet rows 0 and 5; %FF.jpg: a.csv row 2 and
    # b.jsonl row 3; b.jpg: b.jsonl row 4 and d.parquet row 1; big.jpg: d.parquet row 4
    assert Counter(requested(log[before:])) == {"/a.jpg": 5, "/%FF.jpg": 2, "/b.jpg": 2, "/big.jpg": 1}
    errors = [e for i in result.manifest["inputs"] for e in i["source_errors"]]
    assert any("row group 1 (rows 2-3) could not be read" in e for e in errors), errors
    assert any("2 row(s) with a 'url' that is not a string (dict, int)" in e for e in errors), errors


def test_read_url_list_decodes_row_by_row(tmp_path):
    (tmp_path / "l.tsv").write_bytes(b"url\tcaption\nhttp://x/a\tgood\nhttp://x/\xe9\t\xe9t\xe9\n\nhttp://x/c\n")
    t = read_url_list(str(tmp_path / "l.tsv"), "l.tsv", _input(tmp_path))
    assert t.to_pydict() == {"url": ["http://x/a", "http://x/%E9", "http://x/c"], "caption": ["good", None, None],
                             "src_file": ["l.tsv"] * 3, "src_row": [0, 1, 2], "src_error": [None, "caption_not_utf8", None]}


@pytest.mark.parametrize("url,caption,bad", [
    (pa.array([1]), pa.array(["c"]), "url"),
    (pa.array(["http://x/a"]), pa.array([[1, 2]]), "caption"),
])
def test_parquet_list_column_of_wrong_type_is_exit_2(tmp_path, capsys, url, caption, bad):
    lists = tmp_path / "lists"
    lists.mkdir()
    pq.write_table(pa.table({"url": url, "caption": caption}), lists / "l.parquet")
    with pytest.raises(ConfigError, match=f"column {bad!r} of .*l.parquet is"):
        check_url_lists(_input(lists))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\ninput: {{format: urls, path: {lists}}}\noutput: {tmp_path / 'out'}\nstages: []\n")
    assert cli_main(["run", str(spec)]) == 2
    assert "configuration error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
