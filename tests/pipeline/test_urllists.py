"""URL lists (``input.format: urls``): img2dataset downloads from a local HTTP server, and
every listed URL comes out exactly once, kept with its original bytes or rejected with a reason.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import random
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_job
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import make_uid
from pairsift.pipeline.urllists import check_url_lists, prepare_downloads, read_download_shard, read_url_list
from pairsift.pipeline.ingest import InputShard


def _image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A static HTTP server on 127.0.0.1: images, an HTML page, and 404 for anything else."""
    www = tmp_path_factory.mktemp("www")
    files = {
        "red.jpg": _image("JPEG", (96, 80), 1),
        "green.png": _image("PNG", (72, 64), 2),
        "blue.jpg": _image("JPEG", (128, 100), 3),
        "grey.png": _image("PNG", (64, 90), 4),
        "dir/deep.jpg": _image("JPEG", (80, 80), 5),
    }
    for name, data in files.items():
        (www / name).parent.mkdir(parents=True, exist_ok=True)
        (www / name).write_bytes(data)
    (www / "page.html").write_text("<html><body>not an image</body></html>")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield base, files
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _write_lists(root: Path, base: str) -> list[dict]:
    """A CSV, a Parquet and a TXT list; returns the expected rows (what, url, caption, ...)."""
    rows = []

    def row(src, i, what, url, caption, file=None):
        rows.append(dict(src_file=src, src_row=i, what=what, url=url, caption=caption, file=file))

    root.mkdir(parents=True, exist_ok=True)
    csv_rows = [
        ("good", base + "red.jpg", "a red noise picture", "red.jpg"),
        ("good", base + "green.png", 'green, with a comma and "quotes"\nand a newline', "green.png"),
        ("404", base + "missing.jpg", "a picture that is gone", None),
        ("html", base + "page.html", "a page, not a picture", None),
        ("good", base + "dir/deep.jpg", "a picture in a folder", "dir/deep.jpg"),
    ]
    lines = ["url,caption,extra"]
    for i, (what, url, cap, file) in enumerate(csv_rows):
        lines.append(f'{url},"{cap.replace(chr(34), chr(34) * 2)}",{i}')
        row("a.csv", i, what, url, cap, file)
    (root / "a.csv").write_text("\n".join(lines) + "\n")

    pq_rows = [
        ("good", base + "blue.jpg", "a blue noise picture", "blue.jpg"),
        ("404", base + "nothing/here.png", "gone too", None),
        ("good", base + "red.jpg?copy=1", "the red picture again, by another url", "red.jpg"),
        ("good", base + "grey.png", "a grey noise picture", "grey.png"),
        ("404", base + "last.png", "alone in its download shard", None),
    ]
    (root / "sub").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(pq_rows))),
                             "url": [r[1] for r in pq_rows], "caption": [r[2] for r in pq_rows]}),
                   root / "sub" / "b.parquet")
    for i, (what, url, cap, file) in enumerate(pq_rows):
        row("sub/b.parquet", i, what, url, cap, file)

    txt = [
        f"{base}green.png\ta green picture from a text list",
        "",  # blank lines are skipped but counted: src_row is the line number
        f"{base}blue.jpg?from=txt",  # no caption: downloaded, then dropped as missing_caption
        f"{base}gone.jpg   a missing picture",
    ]
    (root / "c.txt").write_text("\n".join(txt) + "\n")
    row("c.txt", 0, "good", f"{base}green.png", "a green picture from a text list", "green.png")
    row("c.txt", 2, "nocap", f"{base}blue.jpg?from=txt", None, "blue.jpg")
    row("c.txt", 3, "404", f"{base}gone.jpg", "a missing picture", None)
    return rows


def _job(lists: Path, out: Path, shard_size: int = 4):
    # ray.num_cpus 1: img2dataset starts a single download process (each imports torch).
    return make_job(lists, out, stages=[{"quality": {}}], fmt="urls",
                    input={"shard_size": shard_size, "download_timeout": 5, "download_threads": 4},
                    ray={"num_cpus": 1})


def _outputs(out: Path) -> tuple[list[dict], list[dict], dict[str, bytes]]:
    kept = pq.read_table(out / "metadata").to_pylist() if list((out / "metadata").glob("*.parquet")) else []
    rejected = pq.read_table(out / "rejected").to_pylist()
    images = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                uid, _, ext = m.name.partition(".")
                if ext not in ("txt", "json"):
                    images[uid] = tf.extractfile(m).read()
    return kept, rejected, images


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory, ray_session):
    base, files = server
    lists = tmp_path_factory.mktemp("lists")
    expected = _write_lists(lists, base)
    out = tmp_path_factory.mktemp("out") / "job"
    result = run_job(_job(lists, out))
    return lists, expected, out, result, files


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_url_once_good_bytes_kept_failures_rejected(first_run):
    lists, expected, out, result, files = first_run
    kept, rejected, images = _outputs(out)
    rows = kept + rejected
    by_uid = {r["uid"]: r for r in rows}
    assert len(by_uid) == len(rows) == len(expected), "every URL row exactly once"
    assert sorted(r["url"] for r in rows) == sorted(e["url"] for e in expected)
    for e in expected:
        uid = make_uid(e["src_file"], str(e["src_row"]))
        r = by_uid[uid]
        assert r["url"] == e["url"]
        assert r["key"] == str(e["src_row"])
        assert r["source"] == str(lists / e["src_file"])
        if e["what"] == "good":
            assert r["drop_reason"] is None, r
            assert (r["caption_raw"] or r["caption"]) == e["caption"]  # quality keeps the raw one
            assert _sha(images[uid]) == _sha(files[e["file"]]), "bytes must be kept as downloaded"
        elif e["what"] == "404":
            assert (r["drop_reason"], r["drop_stage"]) == ("download_failed", "ingest"), r
            assert r["caption"] == e["caption"]
        elif e["what"] == "html":
            # img2dataset (disable_all_reencoding) stores any 200 body as a success without
            # decoding it; quality is what finds that it is not an image.
            assert (r["drop_reason"], r["drop_stage"]) == ("decode_error", "quality"), r
        elif e["what"] == "nocap":
            assert (r["drop_reason"], r["drop_stage"]) == ("missing_caption", "ingest"), r
    assert set(images) == {r["uid"] for r in kept}
    # The failed downloads' messages are counted per input shard.
    errors = [e for i in result.manifest["inputs"] for e in i["source_errors"]]
    assert any("failed to download" in e and "404" in e for e in errors), errors


def test_uids_stable_across_runs_and_rerun_skips_finished_downloads(first_run, tmp_path):
    lists, expected, out, _, _ = first_run
    kept1, rejected1, images1 = _outputs(out)
    run_job(_job(lists, tmp_path / "again"))
    kept2, rejected2, images2 = _outputs(tmp_path / "again")
    assert {r["uid"]: r["url"] for r in kept1 + rejected1} == {r["uid"]: r["url"] for r in kept2 + rejected2}
    assert {u: _sha(b) for u, b in images1.items()} == {u: _sha(b) for u, b in images2.items()}

    # Same output again: every download shard is finished, so img2dataset is not started.
    dl = out / "_work" / "download"
    before = {p.name: p.stat().st_mtime_ns for p in dl.iterdir()}
    shards = prepare_downloads(_job(lists, out), processes=1)
    assert {p.name: p.stat().st_mtime_ns for p in dl.iterdir()} == before
    # a.csv: 5 rows, c.txt: 3, sub/b.parquet: 5 -> 2 + 1 + 2 shards of 4, in path order
    assert [s.rel for s in shards] == [f"{i:05d}.tar" for i in range(5)]
    assert [s.files[0] for s in shards] == [str(lists / f) for f in ["a.csv"] * 2 + ["c.txt"] + ["sub/b.parquet"] * 2]


def test_list_without_url_column_is_a_config_error_before_writing(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ok.txt").write_text("http://127.0.0.1:9/a.jpg a caption\n")
    (lists / "bad.csv").write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a caption\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"bad\.csv lacks column\(s\) 'url'"):
        run_job(_job(lists, out))
    assert not out.exists()


@pytest.mark.parametrize("name,content,match", [
    ("l.parquet", pa.table({"url": ["http://x/a.jpg"], "text": ["t"]}), r"l\.parquet lacks column\(s\) 'caption'"),
    ("l.tsv", "url\ttext\nhttp://x/a.jpg\tt\n", r"l\.tsv lacks column\(s\) 'caption'"),
    ("l.jsonl", '{"URL": "http://x/a.jpg", "caption": "c"}\n', r"l\.jsonl lacks column\(s\) 'url'"),
    ("l.csv", "", r"l\.csv is empty"),
    ("l.json", "[]", r"no .*files"),
])
def test_check_url_lists_names_file_and_column(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        check_url_lists(_job(tmp_path, tmp_path / "out").input)


def test_keep_columns_is_refused_for_url_lists(tmp_path):
    (tmp_path / "l.csv").write_text("url,caption,extra\nhttp://x/a.jpg,c,1\n")
    job = make_job(tmp_path, tmp_path / "out", stages=[{"quality": {}}], fmt="urls", input={"keep_columns": ["extra"]})
    with pytest.raises(ConfigError, match="keep_columns"):
        check_url_lists(job.input)


def test_read_url_list_formats(tmp_path):
    job = _job(tmp_path, tmp_path / "out")
    (tmp_path / "l.jsonl").write_text('{"url": "http://x/a.jpg", "caption": "a\u2028b"}\r\n\n{"url": "http://x/b.jpg"}\nnot json\n')
    t = read_url_list(str(tmp_path / "l.jsonl"), "l.jsonl", job.input)
    assert t.to_pydict() == {"url": ["http://x/a.jpg", "http://x/b.jpg", None], "caption": ["a\u2028b", None, None],
                             "src_file": ["l.jsonl"] * 3, "src_row": [0, 2, 3], "src_error": [None] * 3}
    (tmp_path / "l.tsv").write_text("caption\turl\n5\thttp://x/a.jpg\n\thttp://x/b.jpg\n")
    t = read_url_list(str(tmp_path / "l.tsv"), "l.tsv", job.input)
    assert t.to_pydict() == {"url": ["http://x/a.jpg", "http://x/b.jpg"], "caption": ["5", ""],
                             "src_file": ["l.tsv"] * 2, "src_row": [0, 1], "src_error": [None] * 2}


def test_read_download_shard_orders_rows_and_flags_damage(tmp_path):
    """A hand-made img2dataset shard: tar samples in download order, one sample missing."""
    jpg = _image("JPEG", (64, 64), 9)
    meta = {"url": ["u2", "u0", "u1", "u3"], "caption": ["c2", "c0", None, "c3"], "src_file": ["l.csv"] * 4,
            "src_row": [2, 0, 1, 3], "key": ["002", "000", "001", "003"],
            "status": ["failed_to_download", "success", "success", "success"],
            "error_message": ["HTTP Error 404: Not Found", None, None, None]}
    pq.write_table(pa.table(meta), tmp_path / "00000.parquet")
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, data in [("001.jpg", jpg), ("001.json", b"{}"), ("000.jpg", jpg), ("000.txt", b"c0")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shard = InputShard(0, "download", str(tmp_path / "00000.tar"), rel="00000.tar", files=("/lists/l.csv",))
    errors: list[str] = []
    job = _job(tmp_path, tmp_path / "out")
    t = pa.concat_tables(list(read_download_shard(shard, job.input, 3, errors)))
    assert t.column("key").to_pylist() == ["0", "1", "2", "3"]
    assert t.column("uid").to_pylist() == [make_uid("l.csv", str(i)) for i in range(4)]
    assert t.column("source").to_pylist() == ["/lists/l.csv"] * 4
    assert t.column("drop_reason").to_pylist() == [None, "missing_caption", "download_failed", "source_truncated"]
    assert t.column("caption").to_pylist() == ["c0", None, "c2", "c3"]
    assert t.column("image").to_pylist() == [jpg, None, None, None]
    assert errors == ["00000.tar: 1 of 4 URL(s) failed to download: HTTP Error 404: Not Found (x1)"]
