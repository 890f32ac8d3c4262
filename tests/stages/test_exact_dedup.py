"""Stage exact_dedup: identical bytes -> one representative, the same for any sharding."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from conftest import make_job
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import make_uid


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    groups = {}
    for i in range(12):
        data = _jpeg(i % 5)  # 5 distinct images, 12 files: groups of 3, 3, 2, 2, 2
        (d / f"f{i:02d}.jpg").write_bytes(data)
        (d / f"f{i:02d}.txt").write_text(f"noise picture {i}")
        groups.setdefault(i % 5, []).append(f"f{i:02d}")
    return d, groups


def _result(out):
    kept = pq.read_table(out / "metadata").to_pylist()
    rej = pq.read_table(out / "rejected").to_pylist()
    return ({r["uid"] for r in kept}, {(r["uid"], r["dup_of"]) for r in rej if r["drop_reason"] == "exact_dedup"})


def test_one_representative_per_group_invariant_to_sharding(ray_session, tmp_path):
    d, groups = _folder(tmp_path)
    results = []
    for shard_size in (2, 5, 12):
        out = tmp_path / f"out{shard_size}"
        run_job(make_job(d, out, fmt="folder", input={"shard_size": shard_size}))
        results.append(_result(out))
    assert results[0] == results[1] == results[2]
    kept, dropped = results[0]
    uid = {stem: make_uid(f"{stem}.jpg", stem) for g in groups.values() for stem in g}
    expected_kept = {min(uid[s] for s in g) for g in groups.values()}
    assert kept == expected_kept
    assert len(dropped) == 12 - 5
    for g in groups.values():
        rep = min(uid[s] for s in g)
        assert {(uid[s], rep) for s in g if uid[s] != rep} <= dropped
