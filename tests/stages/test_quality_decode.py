"""Stage quality's scaled decode check: a JPEG verified at 1/8 scale fails exactly where the
full decode fails (truncated, bit-flipped, on Pillow's test-image zoo), with the same sizes."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pairsift.pipeline.images import ImageRejected, inspect_image
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.quality import QualityConfig, QualityStage, inspect_image_scaled

MAX_PIXELS = 89_478_485


def verdict(fn, data: bytes, max_pixels: int = MAX_PIXELS):
    try:
        return fn(data, max_pixels)
    except ImageRejected as e:
        return e.reason


def _jpegs() -> dict[str, bytes]:
    """JPEGs of every coding the web holds: baseline 4:2:0 and 4:4:4, progressive, Huffman-
    optimised, restart markers, greyscale (baseline and progressive), CMYK, EXIF-rotated."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.normal(128, 40, (150, 210, 3)).clip(0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    kinds = {
        "baseline_420": (photo, dict(quality=85)),
        "baseline_444": (photo, dict(quality=90, subsampling=0)),
        "progressive": (photo, dict(quality=85, progressive=True)),
        "progressive_444": (photo, dict(progressive=True, subsampling=0)),
        "optimized": (photo, dict(quality=80, optimize=True)),
        "restart_markers": (photo, dict(quality=85, restart_marker_blocks=4)),
        "grey": (photo.convert("L"), dict()),
        "grey_progressive": (photo.convert("L"), dict(progressive=True)),
        "cmyk": (photo.convert("CMYK"), dict()),
        "exif_rotated": (photo, dict(exif=exif.tobytes())),
    }
    out = {}
    for name, (img, kw) in kinds.items():
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)
        out[name] = buf.getvalue()
    return out


JPEGS = _jpegs()


def test_scaled_check_reports_the_full_size_and_orientation():
    for name, data in JPEGS.items():
        full = verdict(inspect_image, data)
        assert verdict(inspect_image_scaled, data) == full, name
        assert full[1:] == ((150, 210) if name == "exif_rotated" else (210, 150)), (name, full)


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_truncated_jpegs_fail_as_in_a_full_decode(name):
    """Every cut point of the first part and of the last 64 bytes (where only the end of the
    entropy-coded data or the EOI marker is missing), and one in every 7 bytes between."""
    data = JPEGS[name]
    n = len(data)
    cuts = sorted(set(range(1, 700)) | set(range(700, n - 64, 7)) | set(range(n - 64, n)))
    full = [verdict(inspect_image, data[:c]) for c in cuts]
    scaled = [verdict(inspect_image_scaled, data[:c]) for c in cuts]
    assert scaled == full
    failed = sum(isinstance(v, str) for v in full)
    assert failed > 0.9 * len(cuts)  # what the full decode catches, the scaled one catches too
    assert verdict(inspect_image_scaled, data[: n - 40]) == "decode_error"  # data missing near the end


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_corrupt_jpegs_fail_as_in_a_full_decode(name):
    """Random bytes of the entropy-coded data (after the last SOS) and of the headers flipped."""
    data = JPEGS[name]
    rng = np.random.default_rng(1)
    sos = data.rfind(b"\xff\xda")
    full, scaled = [], []
    for k in range(300):
        lo, hi = (sos + 12, len(data) - 2) if k % 3 else (2, sos + 12)  # one flip in three: the headers
        pos = int(rng.integers(lo, hi))
        bad = bytearray(data)
        bad[pos] ^= int(rng.integers(1, 256))
        full.append(verdict(inspect_image, bytes(bad)))
        scaled.append(verdict(inspect_image_scaled, bytes(bad)))
    assert scaled == full
    assert any(isinstance(v, str) for v in full)  # the flips do break some files


def test_pillow_zoo_gets_the_same_verdicts():
    """Pillow's own regression images (../shared/realdata/pillow_decode_zoo): every file, and
    every file cut short by a few bytes, gets the same verdict and size both ways; the zoo's
    truncated JPEGs (truncated_jpeg.jpg, ultrahdr.jpg) fail the scaled check."""
    from conftest import shared_path

    folder = shared_path("realdata", "pillow_decode_zoo")
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jpegs = 0
    for row in rows:
        data = (folder / row["file"]).read_bytes()
        expected = verdict(inspect_image, data)
        assert verdict(inspect_image_scaled, data) == expected, row["file"]
        assert (expected == "decode_error" or expected == "decompression_bomb") == (row["pillow_result"] != "ok"), row["file"]
        if row["format"] in ("JPEG", "MPO"):
            jpegs += 1
            for cut in (1, 2, 16, 200):
                assert verdict(inspect_image_scaled, data[:-cut]) == verdict(inspect_image, data[:-cut]), (row["file"], cut)
    assert jpegs >= 30
    for bad in ("truncated_jpeg.jpg", "ultrahdr.jpg"):
        assert verdict(inspect_image_scaled, (folder / bad).read_bytes()) == "decode_error"


def _batch(images: list[bytes]) -> pa.Table:
    n = len(images)
    return pa.table({
        "uid": [f"{i:032x}" for i in range(n)], "key": [str(i) for i in range(n)], "source": ["s"] * n,
        "url": [None] * n, "caption": ["a caption"] * n, "image": images,
        "drop_reason": [None] * n, "drop_stage": [None] * n,
    }, schema=BASE_SCHEMA)


def test_stage_output_is_the_same_with_either_check():
    images = []
    for data in JPEGS.values():
        images += [data, data[: len(data) // 2], data[:-3]]
    batch = _batch(images)
    scaled = QualityStage(QualityConfig()).process(batch)
    full = QualityStage(QualityConfig(decode_check="full")).process(batch)
    assert scaled.equals(full)
    reasons = scaled.column("drop_reason").to_pylist()
    assert reasons.count("decode_error") == 2 * len(JPEGS) and reasons.count(None) == len(JPEGS)


def test_the_default_check_keeps_old_fingerprints(tmp_path):
    from conftest import make_job

    plain = make_job(tmp_path, tmp_path / "out", stages=[{"quality": {}}])
    scaled = make_job(tmp_path, tmp_path / "out", stages=[{"quality": {"decode_check": "scaled"}}])
    full = make_job(tmp_path, tmp_path / "out", stages=[{"quality": {"decode_check": "full"}}])
    assert plain.fingerprint() == scaled.fingerprint() != full.fingerprint()
    assert "decode_check" not in str(plain.dump())
