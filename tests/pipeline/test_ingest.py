"""Ingest: every format, and bad input becomes per-sample drops, never a crash."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_job, shared_path
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import make_uid
from pairsift.pipeline.ingest import InputShard, discover, read_shard


def _jpeg(color=(200, 30, 30), size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for sub in ("metadata", "rejected"):
        if (out / sub).exists() and any((out / sub).glob("*.parquet")):
            for r in pq.read_table(out / sub).to_pylist():
                assert r["uid"] not in rows, "a uid appears twice"
                rows[r["uid"]] = r
    return rows


def _read_all(shard: InputShard, job) -> tuple[pa.Table, list[str]]:
    errors: list[str] = []
    return pa.concat_tables(list(read_shard(shard, job.input, 4, errors))), errors


def test_tar_bad_captions_missing_members_and_duplicate_keys(tmp_path):
    tar = _tar(tmp_path / "s.tar", [
        ("a.jpg", _jpeg()), ("a.txt", b"a red square"),
        ("b.jpg", _jpeg()), ("b.txt", b"\xff\xfe not utf-8 \xc3\x28"),
        ("c.jpg", _jpeg()), ("c.txt", b""),
        ("d.jpg", _jpeg()),  # no caption
        ("e.txt", b"a caption without an image"),
        ("a.jpg", _jpeg((0, 0, 255))), ("a.txt", b"same key again"),
        ("sub/f.png", _jpeg()), ("sub/f.txt", "caf\u00e9 \u2014 ok".encode()),
    ])
    job = make_job(tmp_path, tmp_path / "out")
    (shard,) = discover(job.input)
    table, errors = _read_all(shard, job)
    rows = table.to_pylist()
    assert not errors
    assert [r["key"] for r in rows] == ["a", "b", "c", "d", "e", "a", "sub/f"]
    assert [r["drop_reason"] for r in rows] == [None, "caption_not_utf8", None, "missing_caption", "missing_image", None, None]
    # The repeat of "a" is hashed with its repeat count as a field of its own (not as "a#1",
    # which a real key can spell: tests/hostile/test_ingest_hostile.py).
    assert rows[0]["uid"] == make_uid("s.tar", "a") and rows[5]["uid"] == make_uid("s.tar", "a", 1)
    assert len({r["uid"] for r in rows}) == 7
    assert rows[6]["caption"] == "caf\u00e9 \u2014 ok"
    assert all(r["image"] is None for r in rows if r["drop_reason"])


def test_truncated_tar_keeps_complete_samples_and_reports(ray_session, tmp_path):
    members = []
    for i in range(6):
        members += [(f"{i:03d}.jpg", _jpeg((i * 40, 80, 80))), (f"{i:03d}.txt", f"sample {i}".encode())]
    full = _tar(tmp_path / "full.tar", members).read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar").write_bytes(full[: int(len(full) * 0.6)])
    out = tmp_path / "out"
    result = run_job(make_job(tmp_path / "in", out, stages=[{"quality": {}}]))
    rows = _rows(out)
    reasons = sorted((r["key"], r["drop_reason"]) for r in rows.values())
    n = len(reasons)
    assert 2 <= n <= 6
    assert [r for _, r in reasons[:-1]] == [None] * (n - 1)
    assert reasons[-1][1] in ("source_truncated", "missing_caption", None)
    (inp,) = result.manifest["inputs"]
    assert inp["source_errors"] and "cut.tar" in inp["source_errors"][0]


def test_parquet_with_bytes_and_hf_image_struct(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image": [_jpeg(), b"not an image", None], "caption": ["one", "two", "three"],
                             "url": ["http://a/1.jpg", None, None]}), tmp_path / "in" / "a.parquet")
    hf = pa.array([{"bytes": _jpeg((1, 2, 3)), "path": "x.jpg"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": hf, "text": ["hf style"]}), tmp_path / "in" / "b.parquet")
    out = tmp_path / "out"
    with pytest.raises(Exception):  # b.parquet lacks the default columns
        run_job(make_job(tmp_path / "in", out, fmt="parquet", stages=[{"quality": {}}]))
    assert not out.exists()
    pq.write_table(pa.table({"img": hf, "text": ["hf style"]}), tmp_path / "in" / "a.parquet")
    run_job(make_job(tmp_path / "in", out, fmt="parquet", stages=[{"quality": {}}],
                     input={"image_column": "img", "caption_column": "text"}))
    rows = _rows(out)
    assert sorted(r["key"] for r in rows.values()) == ["0", "0"]
    assert all(r["drop_reason"] is None for r in rows.values())


def test_folder_of_images_with_captions(ray_session, tmp_path):
    d = tmp_path / "photos" / "set1"
    d.mkdir(parents=True)
    (d / "red.jpg").write_bytes(_jpeg())
    (d / "red.txt").write_text("a red rectangle")
    (d / "blue.png").write_bytes(_jpeg((0, 0, 255)))
    (d / "blue.txt").write_text("a blue rectangle\n")
    (d / "lonely.jpg").write_bytes(_jpeg((0, 255, 0)))
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "photos", out, fmt="folder", stages=[{"quality": {}}]))
    rows = {r["key"]: r for r in _rows(out).values()}
    assert set(rows) == {"set1/red", "set1/blue", "set1/lonely"}
    assert rows["set1/blue"]["caption"] == "a blue rectangle"
    assert rows["set1/lonely"]["drop_reason"] == "missing_caption"
    assert rows["set1/red"]["uid"] == make_uid("set1/red.jpg", "set1/red")


def test_real_webdataset_tgz_shard(ray_session, tmp_path):
    src = shared_path("realdata", "webdataset_mnist_shard", "sample.tgz")
    out = tmp_path / "out"
    run_job(make_job(src, out, stages=[{"quality": {"min_side": 28}}], input={"caption_column": "cls"}))
    kept = pq.read_table(out / "metadata").to_pylist()
    assert len(kept) == 90
    assert {(r["width"], r["height"]) for r in kept} == {(28, 28)}
    assert sorted({r["caption"] for r in kept}) == [str(i) for i in range(10)]


def test_pillow_decode_zoo_processed_or_dropped_never_lost(ray_session, tmp_path):
    zoo = shared_path("realdata", "pillow_decode_zoo")
    manifest = {r["file"]: r for r in csv.DictReader(open(zoo / "manifest.csv"))}
    members, names = [], {}
    for i, name in enumerate(sorted(manifest)):
        ext = name.rsplit(".", 1)[-1].lower()
        key = f"zoo{i:03d}"
        names[key] = name
        members += [(f"{key}.{ext}", (zoo / name).read_bytes()), (f"{key}.txt", f"test image {name}".encode())]
    (tmp_path / "in").mkdir()
    _tar(tmp_path / "in" / "zoo.tar", members)
    out = tmp_path / "out"
    result = run_job(make_job(tmp_path / "in", out, stages=[{"quality": {"min_side": 1, "max_aspect": 1000}}],
                              emit={"shard_size": 25}))
    rows = {names[r["key"]]: r for r in _rows(out).values()}
    assert set(rows) == set(manifest), "every file is a row"
    assert result.manifest["counts"]["input"] == len(manifest)
    reasons = {n: r["drop_reason"] for n, r in rows.items()}
    assert set(reasons.values()) <= {None, "decode_error", "decompression_bomb"}
    assert reasons["decompression_bomb.gif"] == reasons["bmp__b__reallybig.bmp"] == "decompression_bomb"
    failing = {n for n, m in manifest.items() if m["pillow_result"] != "ok"}
    assert all(reasons[n] is not None for n in failing), {n: reasons[n] for n in failing}
    ok = [n for n, m in manifest.items() if m["pillow_result"] == "ok"]
    assert sum(reasons[n] is None for n in ok) >= 0.9 * len(ok)
    # EXIF orientation is respected: 2x1 stored, orientation 8, displayed 1x2.
    assert (rows["orientation_rectangle.jpg"]["width"], rows["orientation_rectangle.jpg"]["height"]) == (1, 2)
    assert (rows["empty_gps_ifd.jpg"]["width"], rows["empty_gps_ifd.jpg"]["height"]) == (10, 10)
    # Every kept image is in a training shard in a format open_clip reads, and decodes to RGB.
    seen = 0
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                ext = m.name.rsplit(".", 1)[-1]
                if ext in ("txt", "json"):
                    continue
                assert ext in ("jpg", "png", "webp"), m.name
                Image.open(tf.extractfile(m)).convert("RGB").load()
                seen += 1
    assert seen == result.manifest["counts"]["kept"]
