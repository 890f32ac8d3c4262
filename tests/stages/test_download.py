"""Stage download: img2dataset's per-shard downloader on one batch, against a local HTTP server
whose request log says what was fetched (and with which user agent)."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from conftest import make_job
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.base import StageContext
from pairsift.stages.download import DownloadConfig, DownloadStage
from url_server import requested, serve


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + seed, 30), (seed * 40 % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    files = {"a.png": _png(1), "b.png": _png(2), "big.png": _png(3) + b"\0" * 5000,
             "page.html": b"<html>not an image</html>", "flaky.png": _png(4), "noai.png": _png(5)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


def _batch(urls, dropped=()):
    n = len(urls)
    reasons = ["too_small" if i in dropped else None for i in range(n)]
    return pa.table({"uid": [f"{i:032x}" for i in range(n)], "key": [str(i) for i in range(n)],
                     "source": ["l.csv"] * n, "url": pa.array(urls, pa.string()), "caption": ["c"] * n,
                     "image": pa.nulls(n, pa.binary()), "drop_reason": pa.array(reasons, pa.string()),
                     "drop_stage": pa.array(["quality" if r else None for r in reasons], pa.string())},
                    schema=BASE_SCHEMA)


def _stage(**options) -> DownloadStage:
    stage = DownloadStage(DownloadConfig(timeout=5, threads=4, **options), StageContext())
    stage.setup()
    return stage


def test_bodies_byte_for_byte_failures_dropped_with_the_error(www):
    root, files = www
    with serve(root) as (base, log):
        urls = [base + "a.png", base + "missing.png", None, base + "page.html", base + "b.png", base + "big.png",
                base + "b.png?dropped-before"]
        out = _stage(max_bytes=len(files["big.png"]) - 1).process(_batch(urls, dropped=(6,)))
    rows = out.to_pylist()
    assert rows[0]["image"] == files["a.png"] and rows[0]["drop_reason"] is None
    assert rows[4]["image"] == files["b.png"] and rows[4]["drop_reason"] is None
    # Kept as received, whatever it is: quality's decode check is what drops a page.
    assert rows[3]["image"] == files["page.html"] and rows[3]["drop_reason"] is None
    assert (rows[1]["drop_reason"], rows[1]["drop_stage"]) == ("download_failed", "download")
    assert "404" in rows[1]["download_error"] and rows[1]["image"] is None
    assert (rows[2]["drop_reason"], rows[2]["download_error"]) == ("download_failed", "no url")
    assert rows[5]["drop_reason"] == "member_too_large" and rows[5]["image"] is None
    assert (rows[6]["drop_reason"], rows[6]["drop_stage"]) == ("too_small", "quality")
    assert [r["download_error"] for r in rows if r["drop_reason"] is None] == [None, None, None]
    # Every live row with a URL fetched once; the row dropped earlier never.
    assert sorted(requested(log)) == sorted(["/a.png", "/missing.png", "/page.html", "/b.png", "/big.png"])
    assert all(r["agent"].startswith("Mozilla/5.0") and "Firefox/72.0" in r["agent"] for r in log)


def test_retries_user_agent_and_x_robots_tag(www):
    root, files = www
    noai = {"/noai.png": {"X-Robots-Tag": "noai"}}
    with serve(root, fail_first={"/flaky.png": 1}) as (base, log):
        once = _stage().process(_batch([base + "flaky.png"])).to_pylist()[0]  # retries: 0
        assert once["drop_reason"] == "download_failed" and "503" in once["download_error"]
    with serve(root, fail_first={"/flaky.png": 1}, headers=noai) as (base, log):
        stage = _stage(retries=1, user_agent_token="pairsift-test")
        rows = stage.process(_batch([base + "flaky.png", base + "noai.png"])).to_pylist()
        assert rows[0]["image"] == files["flaky.png"] and rows[0]["drop_reason"] is None
        assert requested(log).count("/flaky.png") == 2  # one retry
        assert rows[1]["drop_reason"] == "download_failed" and "X-Robots-Tag" in rows[1]["download_error"]
        assert all("(compatible; pairsift-test; +https://github.com/rom1504/img2dataset)" in r["agent"] for r in log)
        # disallowed_header_directives: [] turns img2dataset's X-Robots-Tag check off
        rows = _stage(disallowed_header_directives=[]).process(_batch([base + "noai.png"])).to_pylist()
        assert rows[0]["image"] == files["noai.png"]


def test_empty_batch_has_the_columns_and_fetches_nothing():
    out = DownloadStage(DownloadConfig(), StageContext()).process(_batch([]))
    assert out.schema.field("image").type == pa.binary()
    assert out.schema.field("download_error").type == pa.string()
    assert out.num_rows == 0


def test_settings_default_from_the_input_section(tmp_path):
    (tmp_path / "l.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    inp = make_job(tmp_path, tmp_path / "out", stages=[], fmt="urls",
                   input={"download_timeout": 3, "download_retries": 2, "download_threads": 5,
                          "max_image_bytes": 1234}).input
    c = DownloadStage.for_input(inp)
    assert (c.timeout, c.retries, c.threads, c.max_bytes) == (3, 2, 5, 1234)
    c = DownloadStage.for_input(inp, DownloadConfig(threads=7))  # what the stage sets wins
    assert (c.timeout, c.retries, c.threads, c.max_bytes) == (3, 2, 7, 1234)
    assert not DownloadStage.needs_pixels(c)
