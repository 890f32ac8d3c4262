"""Image byte helpers shared by stages and the emitter: format sniffing, safe decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

#: WebDataset extension for each Pillow format that open_clip's loader reads as is.
TRAINABLE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes | None) -> str | None:
    """Pillow-style format name from the first bytes, without decoding."""
    if not data:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    return None


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is the drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def inspect_image(data: bytes, max_pixels: int, scaled: bool = False) -> tuple[str, int, int]:
    """Open and decode ``data``; return (format, width, height) as displayed.

    Width and height respect the EXIF orientation (tags 5-8 swap them). Images claiming more
    than ``max_pixels`` pixels are rejected before any pixel is decoded
    (``decompression_bomb``); anything Pillow cannot identify or decode is ``decode_error``.
    With ``scaled``, a JPEG (or MPO) is decoded with ``draft`` at the smallest DCT scale, 1/8,
    colour as greyscale: libjpeg reads and Huffman-decodes the whole entropy-coded stream either
    way, so truncated and corrupt data fail as in a full decode (the same verdicts, measured on
    ~11k damaged JPEGs and Pillow's zoo), several times faster.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except Exception as e:  # Pillow raises many types on hostile input
            raise ImageRejected("decode_error", f"{type(e).__name__}: {e}") from None
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageRejected("decode_error", f"empty image {w}x{h}")
            if w * h > max_pixels:
                raise ImageRejected("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
            fmt = img.format or sniff_format(data) or "UNKNOWN"
            if scaled and fmt in ("JPEG", "MPO"):
                img.draft("L" if img.mode == "RGB" else img.mode, (1, 1))  # after reading the size: it shrinks it
            img.load()
            try:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
            except Exception:
                orientation = 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            return fmt, w, h
        except ImageRejected:
            raise
        except Image.DecompressionBombError as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except Exception as e:
            raise ImageRejected("decode_error", f"{type(e).__name__}: {e}") from None
        finally:
            img.close()


def to_trainable(data: bytes) -> tuple[bytes, str]:
    """Bytes and WebDataset extension open_clip can load: JPEG/PNG/WebP pass through
    untouched; other formats (GIF, BMP, TIFF, AVIF, ...) become a lossless PNG of their
    first frame, EXIF orientation applied."""
    fmt = sniff_format(data)
    if fmt in TRAINABLE_EXT:
        return data, TRAINABLE_EXT[fmt]
    with Image.open(io.BytesIO(data)) as img:
        if img.format in TRAINABLE_EXT:
            return data, TRAINABLE_EXT[img.format]
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"


def make_trainable(data: bytes) -> tuple[bytes, str]:
    """:func:`to_trainable`, with every failure to re-open or re-encode an image turned into
    :class:`ImageRejected` (``decode_error``, or ``decompression_bomb`` past Pillow's limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return to_trainable(data)
        except Image.DecompressionBombError as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except Exception as e:  # Pillow raises many types on hostile input
            raise ImageRejected("decode_error", f"{type(e).__name__}: {e}") from None
