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
