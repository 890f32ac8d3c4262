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

The decode check (``decode_check: scaled``, the default) decodes a JPEG at 1/8 scale
(Pillow's ``draft``: libjpeg's DCT scaling, colour JPEGs as greyscale): libjpeg still
entropy-decodes every coefficient of every component and reads the stream to its end, so a
truncated or corrupt file fails exactly where the full decode fails — only the inverse DCT,
upsampling and colour conversion are skipped (~40% of the decode's CPU). The width and height
are the full image's. ``full`` decodes every pixel, as before. Other formats are always decoded
in full. ``tests/stages/test_quality_decode.py`` checks that both verdicts agree on truncated
and bit-flipped JPEGs of every kind and on Pillow's test-image zoo.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_serializer

from pairsift.pipeline.images import ImageRejected, inspect_image
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import Stage, StageConfig, decision, runtime

_WS = re.compile(r"\s+")


class QualityConfig(StageConfig):
    min_side: int = decision(64, ge=1)
    #: Largest long/short side ratio; null: no limit.
    max_aspect: float | None = decision(3.0, ge=1.0)
    min_caption_words: int = decision(1, ge=0)
    max_caption_words: int | None = decision(None, ge=1)
    #: Fewest characters a caption may have (``len``, after the clean-up below).
    min_caption_chars: int = decision(0, ge=0)
    #: Fewest bytes the encoded image may have (LAION: 5 KB).
    min_image_bytes: int = decision(0, ge=0)
    max_pixels: int = Field(89_478_485, ge=1)
    #: ftfy's fixes (mojibake, HTML entities, control characters) on the caption.
    fix_text: bool = True
    #: Runs of whitespace become one space, and the ends are stripped.
    collapse_whitespace: bool = True
    #: ``scaled``: JPEGs are verified by a 1/8-scale decode (every entropy-coded byte is
    #: still read, so the same files fail); ``full``: every pixel is decoded.
    decode_check: Literal["scaled", "full"] = runtime("scaled")

    @model_serializer(mode="wrap")
    def _omit_default_decode_check(self, handler):
        """``decode_check`` is dumped only when set: it does not change the output, so specs
        from before it keep their fingerprint (and their outputs resume)."""
        d = handler(self)
        if isinstance(d, dict) and d.get("decode_check") == "scaled":
            d.pop("decode_check")
        return d


def normalise_caption(text: str, fix_text: bool = True, collapse_whitespace: bool = True) -> str:
    """ftfy's fixes (mojibake, HTML entities, control characters), then whitespace collapsed."""
    if fix_text:
        import ftfy

        text = ftfy.fix_text(text, unescape_html=True)
    return _WS.sub(" ", text).strip() if collapse_whitespace else text


def inspect_image_scaled(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """:func:`pairsift.pipeline.images.inspect_image` with a JPEG decoded at 1/8 scale (the
    same verdicts as the full decode)."""
    return inspect_image(data, max_pixels, scaled=True)


class QualityStage(Stage[QualityConfig]):
    name = "quality"
    rewrites = ("caption",)  # normalised text: cached with the computed columns

    def compute(self, batch: pa.Table) -> pa.Table:
        """The caption clean-up, and for every live row the image check: ``width``,
        ``height`` and ``image_format`` as displayed, ``image_bytes``, and ``image_error``
        (the drop reason of an image that cannot be used). Drops nothing: ``decide`` does, in
        the rule order the stage has always had."""
        c = self.config
        images = batch.column("image").to_pylist()
        captions = batch.column("caption").to_pylist()
        done = batch.column("drop_reason").to_pylist()
        n = batch.num_rows
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        formats: list[str | None] = [None] * n
        sizes: list[int | None] = [None] * n
        errors: list[str | None] = [None] * n
        raw: list[str | None] = [None] * n
        clean: list[str | None] = list(captions)
        inspect = inspect_image_scaled if c.decode_check == "scaled" else inspect_image
        for i in range(n):
            if captions[i] is not None:
                fixed = normalise_caption(captions[i], c.fix_text, c.collapse_whitespace)
                if fixed != captions[i]:
                    raw[i], clean[i] = captions[i], fixed
            if done[i] is not None:
                continue
            data = images[i]
            if data is None:
                errors[i] = "missing_image"
                continue
            sizes[i] = len(data)
            try:
                formats[i], widths[i], heights[i] = inspect(data, c.max_pixels)
            except ImageRejected as e:
                errors[i] = e.reason
        batch = set_column(batch, "caption", clean, pa.string())
        batch = set_column(batch, "caption_raw", raw, pa.string())
        batch = set_column(batch, "width", widths, pa.int32())
        batch = set_column(batch, "height", heights, pa.int32())
        batch = set_column(batch, "image_format", formats, pa.string())
        batch = set_column(batch, "image_bytes", sizes, pa.int64())
        return set_column(batch, "image_error", errors, pa.string())

    def decide(self, batch: pa.Table) -> pa.Table:
        """The rules, first failing one wins: missing image, too few bytes, the caption rules,
        an image that cannot be used (decode error, decompression bomb), too small, bad aspect."""
        n = batch.num_rows
        if not n:
            return batch
        c = self.config
        live = live_mask(batch)
        cols = {k: batch.column(k).to_pylist() for k in ("caption", "width", "height", "image_bytes", "image_error")}
        reasons: list[str | None] = [None] * n
        for i in np.flatnonzero(live):
            error = cols["image_error"][i]
            if error == "missing_image":
                reasons[i] = error
            elif cols["image_bytes"][i] is not None and cols["image_bytes"][i] < c.min_image_bytes:
                reasons[i] = "too_few_bytes"
            elif (why := self._caption_reason(cols["caption"][i])) is not None:
                reasons[i] = why
            elif error is not None:
                reasons[i] = error
            else:
                reasons[i] = self._size_reason(cols["width"][i], cols["height"][i])
        return mark_dropped(batch, reasons, self.name)

    def _caption_reason(self, caption: str | None) -> str | None:
        c = self.config
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
        c = self.config
        if min(w, h) < c.min_side:
            return "too_small"
        if c.max_aspect is not None and max(w, h) / min(w, h) > c.max_aspect:
            return "bad_aspect"
        return None
