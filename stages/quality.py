"""Stage ``quality``: decode check, size and aspect limits, caption clean-up and length rules.

The basic hygiene every web-scale recipe applies before scoring. Rule: a pair is kept when its
image bytes number at least ``min_image_bytes``, open and fully decode with Pillow, claim at most
``max_pixels`` pixels (decompression-bomb limit, checked before decoding), have a shorter side
(after EXIF orientation) of at least ``min_side`` and a long/short side ratio of at most
``max_aspect`` (null: no limit); and when its caption — after ftfy's mojibake fixes
(``fix_text``) and whitespace collapsing (``collapse_whitespace``) — has at least
``min_caption_chars`` characters (``len(caption)``) and between ``min_caption_words`` and
``max_caption_words`` words (``len(caption.split())``). The papers' rules in these terms:

* LAION-400M / LAION-5B (Schuhmann et al. 2021, 2022): alt text shorter than 5 characters and
  image data smaller than 5 KB are dropped: ``min_caption_chars: 5, min_image_bytes: 5000``,
  no size or aspect limit.
* DataComp "basic filtering" (Gadre et al. 2023; ``baselines/apply_filter.py``,
  ``load_uids_with_basic_filter_helper``): ``len(text.split()) > 2``, ``len(text) > 5``,
  ``min(w, h) >= 200`` and ``max(w, h) / min(w, h) <= 3`` on the raw text:
  ``min_caption_words: 3, min_caption_chars: 6, min_side: 200, max_aspect: 3.0, fix_text:
  false, collapse_whitespace: false`` (its English rule is the ``language`` stage).

Drop reasons: ``too_few_bytes``, ``decode_error``, ``decompression_bomb``, ``too_small``,
``bad_aspect``, ``empty_caption``, ``caption_too_few_chars``, ``caption_too_short``,
``caption_too_long``. Writes ``width``, ``height`` (as displayed), ``image_format`` and
``caption_raw`` (the caption as received, where normalising changed it). Sizes are those of the
image bytes the pool holds: where a downloader resized the images, DataComp's rule on
``original_width``/``original_height`` sees the size before resizing.
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
    #: Largest long/short side ratio; null: no limit.
    max_aspect: float | None = Field(3.0, ge=1.0)
    min_caption_words: int = Field(1, ge=0)
    max_caption_words: int | None = Field(None, ge=1)
    #: Fewest characters a caption may have (``len``, after the clean-up below).
    min_caption_chars: int = Field(0, ge=0)
    #: Fewest bytes the encoded image may have (LAION: 5 KB).
    min_image_bytes: int = Field(0, ge=0)
    max_pixels: int = Field(89_478_485, ge=1)
    #: ftfy's fixes (mojibake, HTML entities, control characters) on the caption.
    fix_text: bool = True
    #: Runs of whitespace become one space, and the ends are stripped.
    collapse_whitespace: bool = True


def normalise_caption(text: str, fix_text: bool = True, collapse_whitespace: bool = True) -> str:
    """ftfy's fixes (mojibake, HTML entities, control characters), then whitespace collapsed."""
    if fix_text:
        import ftfy

        text = ftfy.fix_text(text, unescape_html=True)
    return _WS.sub(" ", text).strip() if collapse_whitespace else text


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
                fixed = normalise_caption(captions[i], c.fix_text, c.collapse_whitespace)
                if fixed != captions[i]:
                    raw[i], clean[i] = captions[i], fixed
            if done[i] is not None:
                continue
            data = images[i]
            if data is None:
                reasons[i] = "missing_image"
                continue
            if len(data) < c.min_image_bytes:
                reasons[i] = "too_few_bytes"
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
        if caption is None or not caption.strip():
            return "empty_caption"
        if len(caption) < c.min_caption_chars:
            return "caption_too_few_chars"
        words = len(caption.split())
        if words < c.min_caption_words:
            return "caption_too_short"
        if c.max_caption_words is not None and words > c.max_caption_words:
            return "caption_too_long"
        return None

    def _size_reason(self, w: int, h: int) -> str | None:
        c: QualityConfig = self.config
        if min(w, h) < c.min_side:
            return "too_small"
        if c.max_aspect is not None and max(w, h) / min(w, h) > c.max_aspect:
            return "bad_aspect"
        return None
