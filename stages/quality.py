"""Stage ``quality``: decode check, size and aspect limits, caption clean-up.

The basic hygiene every web-scale recipe applies before scoring (LAION-5B, Schuhmann et al.
2022; DataComp, Gadre et al. 2023, "basic filtering"). Rule: a pair is kept when its image
bytes open and fully decode with Pillow, claim at most ``max_pixels`` pixels (decompression-bomb
limit, checked before decoding), have a shorter side (after EXIF orientation) of at least
``min_side`` and a long/short side ratio of at most ``max_aspect``; and when its caption,
after ftfy's mojibake fixes and whitespace collapsing, has between ``min_caption_words`` and
``max_caption_words`` whitespace-separated words. Drop reasons: ``decode_error``,
``decompression_bomb``, ``too_small``, ``bad_aspect``, ``empty_caption``,
``caption_too_short``, ``caption_too_long``. Writes ``width``, ``height`` (as displayed),
``image_format`` and ``caption_raw`` (the caption as received, where normalising changed it).
"""

from __future__ import annotations

import re

import pyarrow as pa
from pydantic import Field

from pairsift.pipeline.images import ImageRejected, inspect_image
from pairsift.pipeline.table import mark_dropped, set_column
from pairsift.stages.base import Stage, StageConfig

_WS = re.compile(r"\s+")


class QualityConfig(StageConfig):
    min_side: int = Field(64, ge=1)
    max_aspect: float = Field(3.0, ge=1.0)
    min_caption_words: int = Field(1, ge=0)
    max_caption_words: int | None = Field(None, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    fix_text: bool = True


def normalise_caption(text: str, fix_text: bool = True) -> str:
    """ftfy's fixes (mojibake, HTML entities, control characters), then whitespace collapsed."""
    if fix_text:
        import ftfy

        text = ftfy.fix_text(text, unescape_html=True)
    return _WS.sub(" ", text).strip()


class QualityStage(Stage):
    name = "quality"
    Config = QualityConfig

    def process(self, batch: pa.Table) -> pa.Table:
        c: QualityConfig = self.config
        images = batch.column("image").to_pylist()
        captions = batch.column("caption").to_pylist()
        done = batch.column("drop_reason").to_pylist()
        n = batch.num_rows
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        formats: list[str | None] = [None] * n
        raw: list[str | None] = [None] * n
        clean: list[str | None] = list(captions)
        reasons: list[str | None] = [None] * n
        for i in range(n):
            if captions[i] is not None:
                fixed = normalise_caption(captions[i], c.fix_text)
                if fixed != captions[i]:
                    raw[i], clean[i] = captions[i], fixed
            if done[i] is not None:
                continue
            data = images[i]
            if data is None:
                reasons[i] = "missing_image"
                continue
            reasons[i] = self._caption_reason(clean[i])
            if reasons[i] is not None:
                continue  # no need to decode a pair that is dropped anyway
            try:
                formats[i], widths[i], heights[i] = inspect_image(data, c.max_pixels)
            except ImageRejected as e:
                reasons[i] = e.reason
                continue
            reasons[i] = self._size_reason(widths[i], heights[i])
        batch = set_column(batch, "caption", clean, pa.string())
        batch = set_column(batch, "caption_raw", raw, pa.string())
        batch = set_column(batch, "width", widths, pa.int32())
        batch = set_column(batch, "height", heights, pa.int32())
        batch = set_column(batch, "image_format", formats, pa.string())
        return mark_dropped(batch, reasons, self.name)

    def _caption_reason(self, caption: str | None) -> str | None:
        c: QualityConfig = self.config
        if caption is None or not caption:
            return "empty_caption"
        words = len(caption.split(" "))
        if words < c.min_caption_words:
            return "caption_too_short"
        if c.max_caption_words is not None and words > c.max_caption_words:
            return "caption_too_long"
        return None

    def _size_reason(self, w: int, h: int) -> str | None:
        c: QualityConfig = self.config
        if min(w, h) < c.min_side:
            return "too_small"
        if max(w, h) / min(w, h) > c.max_aspect:
            return "bad_aspect"
        return None
