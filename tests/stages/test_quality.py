"""Stage quality: each rule, on real encoded images."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.quality import QualityConfig, QualityStage, normalise_caption


def _img(size, fmt="JPEG", exif_orientation=None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (120, 60, 30))
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _batch(pairs) -> pa.Table:
    n = len(pairs)
    return pa.table({
        "uid": [f"{i:032x}" for i in range(n)], "key": [str(i) for i in range(n)], "source": ["s"] * n,
        "url": [None] * n, "caption": [c for _, c in pairs], "image": [i for i, _ in pairs],
        "drop_reason": [None] * n, "drop_stage": [None] * n,
    }, schema=BASE_SCHEMA)


def _run(pairs, **cfg):
    return QualityStage(QualityConfig(**cfg)).process(_batch(pairs)).to_pylist()


def test_each_rule_gives_its_reason():
    rows = _run([
        (_img((200, 100)), "a fine photo"),
        (_img((50, 200)), "too narrow"),
        (_img((400, 100)), "a banner"),
        (b"\x89PNG\r\n\x1a\n garbage", "broken"),
        (_img((200, 200)), "   "),
        (_img((200, 200)), "one"),
        (_img((200, 200)), "far too many words here"),
        (_img((300, 300)), "big"),
    ], min_side=64, max_aspect=3.0, min_caption_words=1, max_caption_words=4, max_pixels=250 * 250)
    assert [r["drop_reason"] for r in rows] == [
        None, "too_small", "bad_aspect", "decode_error", "empty_caption", None, "caption_too_long",
        "decompression_bomb"]
    assert (rows[0]["width"], rows[0]["height"], rows[0]["image_format"]) == (200, 100, "JPEG")
    assert all(r["image"] is None for r in rows if r["drop_reason"])
    assert rows[0]["image"] is not None
    assert {r["drop_stage"] for r in rows if r["drop_reason"]} == {"quality"}
    assert _run([(_img((100, 100)), "two words")], min_caption_words=3)[0]["drop_reason"] == "caption_too_short"


def test_exif_orientation_swaps_width_and_height():
    rows = _run([(_img((300, 100), exif_orientation=6), "rotated"), (_img((300, 100), exif_orientation=3), "upside down")],
                max_aspect=5)
    assert [(r["width"], r["height"]) for r in rows] == [(100, 300), (300, 100)]


def test_caption_normalised_and_original_kept():
    rows = _run([(_img((100, 100)), "  cafÃ©\tau   lait &amp; croissant \n"), (_img((100, 100)), "clean caption")])
    assert rows[0]["caption"] == "café au lait & croissant"
    assert rows[0]["caption_raw"] == "  cafÃ©\tau   lait &amp; croissant \n"
    assert rows[1]["caption"] == "clean caption" and rows[1]["caption_raw"] is None
    assert normalise_caption("a\u00a0b", fix_text=False) == "a b"


def test_rows_dropped_earlier_keep_their_first_reason():
    batch = _batch([(None, "x"), (_img((10, 10)), "tiny")])
    batch = batch.set_column(6, "drop_reason", pa.array(["download_failed", None]))
    rows = QualityStage(QualityConfig()).process(batch).to_pylist()
    assert [r["drop_reason"] for r in rows] == ["download_failed", "too_small"]


# --------------------------------------------------------------------------- the papers' rules

SIZES = [(640, 480), (200, 200), (199, 640), (600, 200), (601, 200), (200, 601), (1024, 341), (300, 150),
         (250, 199), (400, 400)]


def _sized_jpeg(size, cache={}) -> bytes:
    if size not in cache:
        cache[size] = _img(size)
    return cache[size]


def test_datacomp_basic_filter_matches_the_reference_rule_on_real_alt_text():
    """DataComp's basic filter as its baselines code computes it (apply_filter.py,
    load_uids_with_basic_filter_helper): words = len(text.split()) > 2, chars = len(text) > 5,
    min(w, h) >= 200 and max/min <= 3, on the raw text. The quality stage configured as the
    datacomp_basic recipe keeps exactly the same pairs (its English rule is the language stage)."""
    import pyarrow.parquet as pq

    from conftest import shared_path

    path = shared_path("realdata", "laion_alt_text_10k", "test_10000.parquet")
    texts = [t for t in pq.read_table(path).column("TEXT").to_pylist() if t is not None][:1500]
    texts += ["a  b", " ab  cd ", "one two\tthree", "12345", "123456", "a b c", "a\nb\nc d", "x" * 6]
    sizes = [SIZES[i % len(SIZES)] for i in range(len(texts))]
    rows = _run([(_sized_jpeg(s), t) for s, t in zip(sizes, texts)], min_side=200, max_aspect=3.0,
                min_caption_words=3, min_caption_chars=6, fix_text=False, collapse_whitespace=False)

    def reference(text, w, h):
        caption_ok = len(text.split()) > 2 and len(text) > 5
        lo, hi = min(w, h), max(w, h)
        return caption_ok and lo >= 200 and hi / lo <= 3.0

    expected = [reference(t, w, h) for t, (w, h) in zip(texts, sizes)]
    kept = [r["drop_reason"] is None for r in rows]
    assert kept == expected
    assert 0.2 < sum(kept) / len(kept) < 0.8  # both sides of every rule are exercised
    assert [r["caption"] for r in rows] == texts  # the raw text, untouched
    reasons = {r["drop_reason"] for r in rows} - {None}
    assert reasons == {"caption_too_short", "caption_too_few_chars", "too_small", "bad_aspect"}


def test_laion_rules_drop_short_alt_text_and_small_files():
    """LAION-400M/5B: alt text shorter than 5 characters and images under 5 KB are dropped; no
    size or aspect limit."""
    import numpy as np

    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 900, 3), dtype=np.uint8)).save(noisy, format="PNG")
    big = noisy.getvalue()
    small = _img((120, 900))  # a flat JPEG: a few hundred bytes
    assert len(big) >= 5000 > len(small)
    rows = _run([(big, "abcd"), (big, "abcde"), (small, "a long enough caption"), (big, "a 1:7.5 banner")],
                min_side=1, max_aspect=None, min_caption_words=0, min_caption_chars=5, min_image_bytes=5000)
    assert [r["drop_reason"] for r in rows] == ["caption_too_few_chars", None, "too_few_bytes", None]
