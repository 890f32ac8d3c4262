"""URL lists (``input.format: urls``): the lists' rows are the input shards, the ``download``
stage fetches the images inside the workers (img2dataset's downloader) from a local HTTP server
whose request log says what was fetched, and every listed URL comes out exactly once, kept with
its original bytes or rejected with a reason. Stages that need no pixels (MetaCLIP) run on the
URL rows first, so only what they keep is downloaded; a caption-only pool downloads nothing and
writes the kept rows as a URL list.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import make_job
from pairsift.cli import main as cli_main
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.ingest import read_shard
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import make_uid
from pairsift.pipeline.urllists import check_url_lists, list_url_shards, read_url_list
from url_server import requested, serve


def _image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A static HTTP server on 127.0.0.1: images, an HTML page, and 404 for anything else;
    with the log of every request it answered."""
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
    with serve(www) as (base, log):
        yield base, files, log


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
        ("404", base + "last.png", "the last row of the list", None),
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
        f"{base}blue.jpg?from=txt",  # no caption: dropped as missing_caption, never fetched
        f"{base}gone.jpg   a missing picture",
    ]
    (root / "c.txt").write_text("\n".join(txt) + "\n")
    row("c.txt", 0, "good", f"{base}green.png", "a green picture from a text list", "green.png")
    row("c.txt", 2, "nocap", f"{base}blue.jpg?from=txt", None, "blue.jpg")
    row("c.txt", 3, "404", f"{base}gone.jpg", "a missing picture", None)
    return rows


def _job(lists: Path, out: Path, shard_size: int = 4, stages=None, **extra):
    return make_job(lists, out, stages=[{"quality": {}}] if stages is None else stages, fmt="urls",
                    input={"shard_size": shard_size, "download_timeout": 5, "download_threads": 4}, **extra)


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


def _paths(base: str, urls) -> list[str]:
    return sorted(u[len(base) - 1:] for u in urls)


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory, ray_session):
    base, files, log = server
    lists = tmp_path_factory.mktemp("lists")
    expected = _write_lists(lists, base)
    out = tmp_path_factory.mktemp("out") / "job"
    before = len(log)
    result = run_job(_job(lists, out))
    return lists, expected, out, result, files, requested(log[before:])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_url_once_good_bytes_kept_failures_rejected(first_run, server):
    lists, expected, out, result, files, fetched = first_run
    base = server[0]
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
            assert (r["drop_reason"], r["drop_stage"]) == ("download_failed", "download"), r
            assert r["caption"] == e["caption"]
            assert "404" in r["download_error"], r  # img2dataset's message, per row
        elif e["what"] == "html":
            # img2dataset (disable_all_reencoding) keeps any 200 body without decoding it;
            # quality is what finds that it is not an image.
            assert (r["drop_reason"], r["drop_stage"]) == ("decode_error", "quality"), r
        elif e["what"] == "nocap":
            assert (r["drop_reason"], r["drop_stage"]) == ("missing_caption", "ingest"), r
    assert set(images) == {r["uid"] for r in kept}
    # Every row a pair can come from was fetched once, in the workers; a row without caption never.
    assert sorted(fetched) == _paths(base, [e["url"] for e in expected if e["what"] != "nocap"])
    assert [next(iter(s)) for s in result.manifest["spec"]["stages"]] == ["download", "quality"]
    funnel = {s["stage"]: s for s in result.manifest["counts"]["stages"]}
    assert funnel["download"]["reasons"] == {"download_failed": 4}
    for t in result.manifest["timings"]["phases"]:  # Ray says where each task ran
        assert sum(t["nodes"].values()) == t["shards_run"], t


def test_uids_stable_reruns_fetch_nothing_and_a_lost_shard_only_its_urls(first_run, server, tmp_path):
    lists, expected, out, _, _, _ = first_run
    base, _, log = server
    kept1, rejected1, images1 = _outputs(out)
    run_job(_job(lists, tmp_path / "again"))
    kept2, rejected2, images2 = _outputs(tmp_path / "again")
    assert {r["uid"]: r["url"] for r in kept1 + rejected1} == {r["uid"]: r["url"] for r in kept2 + rejected2}
    assert {u: _sha(b) for u, b in images1.items()} == {u: _sha(b) for u, b in images2.items()}

    # The same job on the same output: every shard is committed, nothing is fetched again.
    before = len(log)
    run_job(_job(lists, out))
    assert requested(log[before:]) == []
    # Resume by shard: a shard whose phase is not committed is read and fetched again, alone.
    shards = list_url_shards(_job(lists, out))
    (out / "_work" / "ledger" / "p0" / "000001.json").unlink()
    before = len(log)
    run_job(_job(lists, out))
    assert requested(log[before:]) == []  # the compute cache kept what shard 1 downloaded
    assert _outputs(out)[:2] == (kept1, rejected1)
    import shutil

    for cached in (out / "_cache").glob("download-*"):  # without it: shard 1's URLs are fetched, alone
        shutil.rmtree(cached)
    (out / "_work" / "ledger" / "p0" / "000001.json").unlink()
    before = len(log)
    run_job(_job(lists, out))
    assert requested(log[before:]) == ["/dir/deep.jpg"]  # a.csv's fifth row, alone in shard 1
    assert _outputs(out)[:2] == (kept1, rejected1)
    # a.csv: 5 rows, c.txt: 3 rows, both normalised in row groups of 4; sub/b.parquet: 5 rows in
    # one row group, which is one shard (Parquet lists are cut at their row groups, read in place)
    assert [(Path(s.path).name, s.files[1:]) for s in shards] == [
        ("a.csv", ("0", "1", "0", "normalised")), ("a.csv", ("1", "2", "4", "normalised")),
        ("c.txt", ("0", "1", "0", "normalised")), ("b.parquet", ("0", "1", "0", "list"))]
    assert shards[3].files[0] == str(lists / "sub" / "b.parquet")


def test_a_rerun_that_changes_a_decision_decides_as_a_fresh_run(server, tmp_path, ray_session):
    """The same URL job with another threshold (issue 15's rerun): it decides as a fresh run
    does, and the stages after the download reuse what they computed, text lists included
    (their normalised copy, rewritten, still names the same input)."""
    base, files, log = server
    lists = tmp_path / "lists"
    _write_lists(lists, base)

    def outcome(out: Path) -> dict[str, str | None]:
        kept, rejected, images = _outputs(out)
        assert set(images) == {r["uid"] for r in kept}
        return {r["uid"]: r["drop_reason"] for r in kept + rejected} | {u: _sha(b) for u, b in images.items()}

    run_job(_job(lists, tmp_path / "out", stages=[{"quality": {"min_side": 16}}]))
    loose = outcome(tmp_path / "out")
    result = run_job(_job(lists, tmp_path / "out", stages=[{"quality": {"min_side": 70}}]))
    strict = outcome(tmp_path / "out")
    run_job(_job(lists, tmp_path / "fresh", stages=[{"quality": {"min_side": 70}}], cache=""))
    assert strict == outcome(tmp_path / "fresh") != loose
    assert list(strict.values()).count("too_small") == 3  # green.png twice, grey.png
    reuse = result.manifest["timings"]["phases"][0]["cache"]["1:quality"]
    assert reuse["computed"] == 0 and reuse["reused"] == 8, reuse  # what the download gave: 7 pictures, 1 page


def test_url_shards_follow_row_groups_and_read_as_rows(tmp_path):
    """A Parquet list is cut at its row groups (packed up to shard_size rows); a shard's rows
    have no image, are not dropped for it, and keep the list's uid rule."""
    lists = tmp_path / "lists"
    lists.mkdir()
    caps = [f"caption {i}" if i != 3 else None for i in range(11)]
    t = pa.table({"url": [f"http://x/{i}.jpg" for i in range(11)], "caption": caps})
    w = pq.ParquetWriter(lists / "l.parquet", t.schema)
    for lo, hi in [(0, 2), (2, 4), (4, 6), (6, 11)]:
        w.write_table(t.slice(lo, hi - lo))
    w.close()
    job = _job(lists, tmp_path / "out")
    shards = list_url_shards(job)
    assert [s.files[1:4] for s in shards] == [("0", "2", "0"), ("2", "3", "4"), ("3", "4", "6")]
    rows = []
    for s in shards:
        errors: list[str] = []
        got = pa.concat_tables(list(read_shard(s, job.input, 3, errors))).to_pylist()
        assert errors == []
        assert [r["key"] for r in got] == sorted((r["key"] for r in got), key=int)
        rows += got
    assert [r["key"] for r in rows] == [str(i) for i in range(11)]
    assert [r["uid"] for r in rows] == [make_uid("l.parquet", str(i)) for i in range(11)]
    assert all(r["image"] is None and r["source"] == str(lists / "l.parquet") for r in rows)
    assert [r["drop_reason"] for r in rows] == [None] * 3 + ["missing_caption"] + [None] * 7


# --------------------------------------------------------------------------- text before pixels


def _metaclip_lists(root: Path, base: str) -> tuple[Path, list[str]]:
    """A list whose captions match the metadata (often: 'dog') or not, every row its own URL."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["a dog on grass"] * 16 + ["a cat asleep", "a tree in fog", "an oak tree"] + ["nothing to match"] * 3
    caps = [f"{w} ({i})" for i, w in enumerate(words)]
    urls = [f"{base}red.jpg?row={i}" for i in range(len(caps))]
    pq.write_table(pa.table({"url": urls, "caption": caps}), root / "pool.parquet", row_group_size=5)
    meta = root.parent / "metadata.json"
    meta.write_text(json.dumps(["dog", "cat", "tree"]))
    return meta, urls


def test_metaclip_before_download_fetches_only_what_it_kept(server, tmp_path, ray_session):
    """Issue 13: with input.format urls, the stages that need no pixels run on the URL rows
    first, global passes included (MetaCLIP's balancing over the whole pool), and only the rows
    they keep are downloaded — the server's log shows it."""
    base, files, log = server
    meta, urls = _metaclip_lists(tmp_path / "lists", base)
    out = tmp_path / "out"
    spec = _job(tmp_path / "lists", out, stages=[{"metaclip": {"metadata": str(meta), "t": 4}},
                                                  {"quality": {"min_side": 16}}])
    assert [s.name for s in spec.stages] == ["metaclip", "download", "quality"]
    before = len(log)
    result = run_job(spec)
    fetched = requested(log[before:])
    kept, rejected, images = _outputs(out)
    by_url = {r["url"]: r for r in kept + rejected}
    assert len(by_url) == len(urls) == len(kept) + len(rejected)
    curated = [r for r in rejected if r["drop_stage"] == "metaclip"]
    survivors = [u for u in urls if by_url[u]["drop_stage"] != "metaclip"]
    assert {r["drop_reason"] for r in curated} == {"metaclip"}
    # t = 4: 'dog' (16 matches) is a head entry, kept with p = 4/16 by hash(seed, uid); 'cat' and
    # 'tree' are tail entries, all kept; a caption that matches nothing is dropped.
    dogs = [u for u in survivors if "dog" in by_url[u]["caption"]]
    assert 0 < len(dogs) < 16 and len(survivors) == len(dogs) + 3
    assert all("nothing" in r["caption"] or "dog" in r["caption"] for r in curated)
    assert sorted(fetched) == _paths(base, survivors), "exactly the rows MetaCLIP kept, once each"
    assert {r["url"] for r in kept} == set(survivors)
    assert all(images[r["uid"]] == files["red.jpg"] for r in kept)
    labels = [p["phase"] for p in result.manifest["timings"]["phases"]]
    assert labels == ["ingest+metaclip+scan", "metaclip+download+quality", "emit"]
    facts = result.manifest["stage_facts"]
    assert facts["1:download"]["downloader"] == "img2dataset"


def test_caption_only_pool_writes_a_url_list_and_downloads_nothing(server, tmp_path, ray_session):
    """MetaCLIP's workflow: curate the alt texts (input.format urls, emit.images false), get
    metadata/ + rejected/ + an img2dataset-ready URL list of the kept rows, no tars; then a
    second job downloads exactly those."""
    base, files, log = server
    meta, urls = _metaclip_lists(tmp_path / "lists", base)
    out = tmp_path / "out"
    spec = _job(tmp_path / "lists", out, stages=[{"metaclip": {"metadata": str(meta), "t": 4}}],
                emit={"images": False, "shard_size": 3})
    assert [s.name for s in spec.stages] == ["metaclip"]
    before = len(log)
    result = run_job(spec)
    assert requested(log[before:]) == []
    kept, rejected, images = _outputs(out)
    assert images == {} and not (out / "shards").exists()
    assert len(kept) + len(rejected) == len(urls) and len({r["uid"] for r in kept + rejected}) == len(urls)
    lists = sorted((out / "urls").glob("*.parquet"))
    assert [p.name for p in lists] == [f"{i:06d}.parquet" for i in range((len(kept) + 2) // 3)]
    url_rows = pa.concat_tables([pq.read_table(p) for p in lists])
    assert url_rows.schema.names == ["url", "caption", "uid"]
    assert url_rows.to_pylist() == [{"url": r["url"], "caption": r["caption"], "uid": r["uid"]} for r in kept]
    assert {r["shard"] for r in kept} == {f"urls/{p.name}" for p in lists}
    assert [s["name"] for s in result.manifest["shards"]] == [f"urls/{p.name}" for p in lists]
    assert {r["drop_stage"] for r in rejected} == {"metaclip"}

    # The URL list is a URL list: the next job downloads exactly the rows it holds.
    before = len(log)
    run_job(_job(out / "urls", tmp_path / "second", stages=[{"quality": {"min_side": 16}}]))
    assert sorted(requested(log[before:])) == _paths(base, [r["url"] for r in kept])
    assert len(_outputs(tmp_path / "second")[0]) == len(kept)


def test_caption_only_pool_refuses_image_stages_exit_2(tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a dog\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "x", "input": {"format": "urls", "path": str(lists)},
                                   "output": str(tmp_path / "out"), "emit": {"images": False},
                                   "stages": [{"metaclip": {}}, {"quality": {}}]}))
    assert cli_main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].quality reads image bytes" in err and "caption-only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stages,names", [
    ([{"quality": {}}], ["download", "quality"]),
    ([], ["download"]),
    ([{"metaclip": {}}], ["metaclip", "download"]),
    ([{"metaclip": {}}, {"language": {}}, {"quality": {}}, {"metaclip": {}}], ["metaclip", "language", "download",
                                                                             "quality", "metaclip"]),
    ([{"recaption": {"mode": "rewrite", "backend": "openai", "model": "m", "endpoint": "http://x/v1"}},
      {"quality": {}}], ["recaption", "download", "quality"]),
    ([{"metaclip": {}}, {"download": {"threads": 3}}, {"language": {}}], ["metaclip", "download", "language"]),
])
def test_download_goes_after_the_stages_that_need_no_pixels(tmp_path, stages, names):
    spec = make_job(tmp_path, tmp_path / "out", stages=stages, fmt="urls", input={"download_timeout": 7})
    assert [s.name for s in spec.stages] == names
    dl = spec.stages[names.index("download")].config
    assert dl.timeout == 7 and dl.threads == (3 if any("download" in s for s in stages) else 16)
    again = make_job(tmp_path, tmp_path / "out", stages=spec.dump()["stages"], fmt="urls",
                     input={"download_timeout": 7})
    assert again.fingerprint() == spec.fingerprint()  # the written spec reads back as the same job


@pytest.mark.parametrize("fmt,stages,emit,match", [
    ("urls", [{"quality": {}}, {"download": {}}], {}, r"stages\[0\]\.quality reads image bytes, but comes before "
                                                       r"stages\[1\]\.download"),
    ("urls", [{"download": {}}, {"download": {}}], {}, r"stages\[1\]\.download: listed twice"),
    ("webdataset", [{"download": {}}], {}, r"stages\[0\]\.download: input.format 'webdataset' has its images"),
    ("urls", [{"download": {}}], {"images": False}, r"emit.images is false"),
])
def test_misplaced_download_is_a_config_error(tmp_path, fmt, stages, emit, match):
    with pytest.raises(ConfigError, match=match):
        make_job(tmp_path, tmp_path / "out", stages=stages, fmt=fmt, emit=emit)


# --------------------------------------------------------------------------- reading the lists


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
    (tmp_path / "l.jsonl").write_text('{"url": "http://x/a.jpg", "caption": "a\u2028b"}\r\n\n'
                                      '{"url": "http://x/b.jpg"}\nnot json\n')
    t = read_url_list(str(tmp_path / "l.jsonl"), "l.jsonl", job.input)
    assert t.to_pydict() == {"url": ["http://x/a.jpg", "http://x/b.jpg", None], "caption": ["a\u2028b", None, None],
                             "src_file": ["l.jsonl"] * 3, "src_row": [0, 2, 3], "src_error": [None] * 3}
    (tmp_path / "l.tsv").write_text("caption\turl\n5\thttp://x/a.jpg\n\thttp://x/b.jpg\n")
    t = read_url_list(str(tmp_path / "l.tsv"), "l.tsv", job.input)
    assert t.to_pydict() == {"url": ["http://x/a.jpg", "http://x/b.jpg"], "caption": ["5", ""],
                             "src_file": ["l.tsv"] * 2, "src_row": [0, 1], "src_error": [None] * 2}
