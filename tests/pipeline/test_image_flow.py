"""Image bytes are written once (issue 13): work shards carry columns only; a later phase that
needs pixels, and the emit, read them back from the source (plain tars by offset, folders,
Parquet rows) or from the shard's image store (gzip'd tars); the training shards hold exactly
the source bytes."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_job
from pairsift.pipeline.runner import run_job


def _jpeg(seed: int, size: int = 72) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _gif(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (70, 70, 3), dtype=np.uint8)).convert("P").save(buf, "GIF")
    return buf.getvalue()


SAMPLES = [(f"k{i:02d}", _jpeg(i % 9), f"picture number {i}") for i in range(24)]  # 9 distinct: dups
SAMPLES += [("gif0", _gif(1), "a gif"), ("tiny", _jpeg(50, size=20), "too small")]


def _tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, img, cap in samples:
            ext = "gif" if img.startswith(b"GIF") else "jpg"
            for name, data in ((f"{key}.{ext}", img), (f"{key}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_input(folder: Path, kind: str) -> dict:
    folder.mkdir(parents=True)
    halves = [SAMPLES[:13], SAMPLES[13:]]
    if kind == "tar":
        for i, h in enumerate(halves):
            (folder / f"{i:05d}.tar").write_bytes(_tar_bytes(h))
        return {}
    if kind == "tgz":
        for i, h in enumerate(halves):
            (folder / f"{i:05d}.tgz").write_bytes(gzip.compress(_tar_bytes(h)))
        return {}
    if kind == "parquet":
        for i, h in enumerate(halves):
            pq.write_table(pa.table({"image": [s[1] for s in h], "caption": [s[2] for s in h]}),
                           folder / f"{i:05d}.parquet", row_group_size=4)
        return {"fmt": "parquet"}
    for key, img, cap in SAMPLES:
        (folder / f"{key}.{'gif' if img.startswith(b'GIF') else 'jpg'}").write_bytes(img)
        (folder / f"{key}.txt").write_text(cap)
    return {"fmt": "folder", "input": {"shard_size": 10}}


def _emitted(out: Path) -> dict[str, tuple[bytes, str]]:
    res = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            stem, ext = name.rsplit(".", 1)
            if ext in ("jpg", "png", "webp"):
                res[members[f"{stem}.txt"].decode()] = (data, ext)
    return res


@pytest.mark.parametrize("kind", ["tar", "tgz", "parquet", "folder"])
def test_images_cross_phases_without_copies(ray_session, tmp_path, kind):
    extra = _write_input(tmp_path / "in", kind)
    # exact_dedup ends phase 0; quality (needs pixels) runs in phase 1 on bytes fetched back
    stages = [{"exact_dedup": {}}, {"quality": {"min_side": 32}}]
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "in", out, stages=stages, emit={"keep_work": True}, **extra))
    for p in (out / "_work").glob("p*/*.parquet"):
        assert "image" not in pq.read_schema(p).names, p
    stored = list((out / "_work" / "images").rglob("*.parquet")) if (out / "_work" / "images").exists() else []
    stored_uids = {u for p in stored for u in pq.read_table(p).column("uid").to_pylist()}
    meta = pq.read_table(out / "metadata").to_pylist()
    rej = pq.read_table(out / "rejected").to_pylist()
    assert len(meta) + len(rej) == len(SAMPLES)
    assert {r["caption"] for r in rej if r["drop_reason"] == "too_small"} == {"too small"}
    assert sum(r["drop_reason"] == "exact_dedup" for r in rej) == 24 - 9
    for col in ("image_offset", "image_size", "image"):
        assert col not in pq.read_schema(next((out / "rejected").glob("*.parquet"))).names
        assert col not in pq.read_schema(next((out / "metadata").glob("*.parquet"))).names
    emitted = _emitted(out)
    by_caption = {cap: img for _, img, cap in SAMPLES}
    for cap, (data, ext) in emitted.items():
        if cap == "a gif":
            assert ext == "png" and Image.open(io.BytesIO(data)).size == (70, 70)
        else:
            assert data == by_caption[cap], cap  # the source bytes, untouched
    gif = [m for m in meta if m["caption"] == "a gif"][0]
    assert gif["transcoded"]
    # only bytes that exist nowhere else are stored: the transcoded GIF, and a gzip'd tar's images
    if kind == "tgz":
        assert len(stored_uids) == 24 + 2
    else:
        assert stored_uids == {gif["uid"]}


def test_output_with_a_later_pixel_stage_equals_the_one_phase_order(ray_session, tmp_path):
    _write_input(tmp_path / "in", "tar")
    a, b = tmp_path / "a", tmp_path / "b"
    run_job(make_job(tmp_path / "in", a, stages=[{"quality": {"min_side": 32}}, {"exact_dedup": {}}]))
    run_job(make_job(tmp_path / "in", b, stages=[{"exact_dedup": {}}, {"quality": {"min_side": 32}}]))
    assert _emitted(a) == _emitted(b)
