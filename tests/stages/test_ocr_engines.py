"""OCR engines of the parrot stage: the gate's probability peak and the word boxes, on the real
RapidOCR models and the real Tesseract binary (rendered text; the real photos are in
test_parrot.py and test_parrot_recall.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"), size)


def _photo(name: str, size: int = 256) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size))


def _sign(text: str, size: tuple[int, int] = (420, 140), font: int = 40) -> np.ndarray:
    img = Image.new("RGB", size, (250, 250, 245))
    ImageDraw.Draw(img).text((size[0] // 2, size[1] // 2), text, font=_font(font), fill=(10, 10, 10), anchor="mm")
    return np.asarray(img)


@pytest.fixture(scope="module")
def rapid():
    from pairsift.stages.ocr_engines import RapidOcrEngine

    return RapidOcrEngine(threads=1)


def _inside(quad: np.ndarray, box: np.ndarray, tol: float = 3.0) -> bool:
    return (quad[:, 0].min() >= box[:, 0].min() - tol and quad[:, 0].max() <= box[:, 0].max() + tol
            and quad[:, 1].min() >= box[:, 1].min() - tol and quad[:, 1].max() <= box[:, 1].max() + tol)


def test_gate_is_the_cheap_detection_plus_the_probability_peak(rapid):
    moon = np.asarray(_photo("moon"))
    sign = _sign("GRAND OPENING")
    for img in (moon, sign):
        boxes, peak = rapid.gate(img, 640)
        assert np.array_equal(boxes, rapid.detect(img, max_side=640)) and 0.0 <= peak <= 1.0
    assert len(rapid.gate(moon, 640)[0]) == 0 and rapid.gate(moon, 640)[1] < 0.3  # no text: a flat map
    boxes, peak = rapid.gate(sign, 640)
    assert len(boxes) == 1 and peak > 0.9
    # The detector is left as it was: the accurate pass after a cheap one is unchanged.
    assert np.array_equal(rapid.detect(sign), rapid.detect(sign))
    assert (rapid._det.limit_type, rapid._det.limit_side_len) == rapid._default_limit


def test_rapidocr_word_boxes_split_each_line_into_its_words(rapid):
    img = _sign("FRESH BREAD 24 HOURS", size=(640, 140), font=30)
    boxes = rapid.detect(img)
    texts, words = rapid.recognize_words(img, boxes)
    assert texts == rapid.recognize(img, boxes) == ["FRESH BREAD 24 HOURS"]
    pieces = [w for w, _ in words[0]]
    assert "".join(pieces) == "FRESHBREAD24HOURS" and len(pieces) >= 4
    quads = [q for _, q in words[0]]
    assert all(q.shape == (4, 2) and _inside(q, boxes[0]) for q in quads)
    lefts = [q[:, 0].min() for q in quads]
    assert lefts == sorted(lefts)  # reading order, left to right
    # Each word's boxes cover where Pillow drew that word (x extent from the font's advances).
    text, font = "FRESH BREAD 24 HOURS", _font(30)
    x0 = 320 - font.getlength(text) / 2
    drawn, pos = {}, 0
    for word in text.split():
        pos = text.index(word, pos)
        drawn[word] = (x0 + font.getlength(text[:pos]), x0 + font.getlength(text[:pos + len(word)]))
        pos += len(word)
    located, pos = {}, 0
    for piece, q in words[0]:
        at = text.index(piece, pos)
        pos = at + len(piece)
        word = next(w for w in drawn if text.index(w) <= at < text.index(w) + len(w))
        lo, hi = located.get(word, (np.inf, -np.inf))
        located[word] = (min(lo, q[:, 0].min()), max(hi, q[:, 0].max()))
    assert set(located) == set(drawn)
    for word, (a, b) in drawn.items():
        lo, hi = located[word]
        overlap = max(0.0, min(b, hi) - max(a, lo))
        assert overlap >= 0.7 * (b - a) and overlap >= 0.7 * (hi - lo), (word, (a, b), (lo, hi))


def test_illegible_lines_have_no_words(rapid):
    img = np.full((120, 200, 3), 245, np.uint8)
    boxes = np.array([[[20, 40], [180, 40], [180, 80], [20, 80]]], np.float32)  # an empty region
    texts, words = rapid.recognize_words(img, boxes)
    assert texts == [""] and words == [[]]


@pytest.mark.skipif(not shutil.which("tesseract"), reason="tesseract-ocr is not installed")
def test_tesseract_boxes_are_its_words():
    from pairsift.stages.ocr_engines import TesseractEngine

    engine = TesseractEngine()
    img = _sign("HELLO WORLD", size=(480, 160))
    boxes = engine.detect(img)
    texts, words = engine.recognize_words(img, boxes)
    assert texts == ["HELLO", "WORLD"]
    assert [[w for w, _ in line] for line in words] == [["HELLO"], ["WORLD"]]
    assert all(np.array_equal(q, b) for line, b in zip(words, boxes) for _, q in line)
