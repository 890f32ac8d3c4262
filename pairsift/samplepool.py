"""The quickstart's sample pool, made on the spot with no network.

Photos are scikit-image's bundled sample images (public domain or CC0; see each
``skimage.data`` function's docstring) with captions written for this project; the rest are
images rendered with Pillow (shapes, gradients, signs with text, words over photos) and crops
of the photos. Every stage of ``jobs/quickstart.yaml`` has something to do:

* ``quality``: a thumbnail that is too small, a banner that is too wide, an empty caption, a
  corrupt file (and a caption with mojibake that it repairs);
* ``exact_dedup``: a byte-identical copy of a photo;
* ``parrot``: signs and photos whose caption spells the words drawn on them ("parrot
  captions", Lin et al. 2023), beside signs whose caption describes them;
* ``semdedup`` on caption embeddings: photos posted again with their caption retyped, and the
  template captions of the wave patterns;
* ``metaclip``: web alt text made of a few frequent words ("cat photo", "coffee cup"): their
  metadata entries ("cat", "coffee", "photo") are head entries on this pool for a small ``t``,
  so that balancing thins them out.

Deterministic: the same Pillow and scikit-image give the same bytes. Written as WebDataset tars
the way img2dataset writes them (``key.jpg``, ``key.txt``, ``key.json``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHOTOS = {
    "astronaut": "portrait of astronaut Eileen Collins in her orange flight suit with the US flag",
    "chelsea": "a ginger tabby cat named Chelsea looking to the side",
    "coffee": "a cup of coffee with latte art on a saucer",
    "rocket": "a rocket on the launch pad against a blue sky",
    "hubble_deep_field": "the Hubble deep field full of distant galaxies",
    "retina": "fundus photograph of a human retina with blood vessels",
    "camera": "black and white photo of a cameraman with a tripod",
    "coins": "old coins lying on a dark background",
    "moon": "grey surface of the moon with craters",
    "immunohistochemistry": "microscope image of stained tissue cells",
    "clock": "a wall clock photographed at an angle",
    "brick": "texture of a red brick wall",
    "grass": "close up texture of green grass",
    "gravel": "grey gravel stones seen from above",
    "colorwheel": "a colour wheel with the full hue spectrum",
    "cell": "microscopy of a single cell",
    "logo": "the scikit-image logo on a transparent background",
    "page": "a scanned page of printed text",
    "text": "handwritten and printed letters on a wall",
}

SHAPES = [
    ("red", (220, 40, 40)), ("blue", (40, 80, 220)), ("green", (40, 170, 60)),
    ("yellow", (240, 210, 40)), ("purple", (140, 60, 180)), ("orange", (250, 140, 30)),
]

SIGNS = ["OPEN", "SALE 50%", "STOP", "EXIT", "HELLO WORLD", "COFFEE SHOP"]

#: Words drawn on a band over a photo, and the caption: (key, photo, words, caption). The first
#: three captions spell the words (parrot captions); the last one does not.
OVERLAYS = [
    ("meme_rocket", "rocket", "TO THE MOON", "TO THE MOON"),
    ("poster_coffee", "coffee", "But first, coffee", "But first, coffee poster"),
    ("quote_astronaut", "astronaut", "Dream Big", "Dream Big quote"),
    ("banner_chelsea", "chelsea", "ADOPT ME", "a ginger cat waiting at a shelter"),
]

#: Photos posted again, re-encoded, with their caption retyped: (key, photo, caption).
REPOSTS = [
    ("repost_astronaut", "astronaut", "Portrait of astronaut Eileen Collins in her orange flight suit with the US flag."),
    ("repost_coffee", "coffee", "a cup of coffee with latte art on a saucer."),
    ("repost_moon", "moon", "Grey surface of the Moon with craters"),
]

#: Web alt text of a few frequent words, each on its own crop of a photo: (photo, captions).
ALT_TEXT = [
    ("chelsea", ["cat", "Cat", "cat photo", "free cat photo", "cat image", "cat stock photo"]),
    ("coffee", ["coffee", "coffee cup", "cup of coffee", "free coffee photo", "coffee image", "coffee stock image"]),
    ("rocket", ["rocket", "rocket photo", "free rocket image", "rocket stock photo"]),
]


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    img = Image.fromarray(arr)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _shape_image(name: str, color: tuple, shape: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    bg = tuple(int(x) for x in rng.integers(200, 256, 3))
    img = Image.new("RGB", (320, 256), bg)
    d = ImageDraw.Draw(img)
    x, y = int(rng.integers(40, 120)), int(rng.integers(30, 80))
    box = (x, y, x + 150, y + 150)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(x + 75, y), (x, y + 150), (x + 150, y + 150)], fill=color)
    return _png(img) if seed % 2 else _jpeg(np.asarray(img))


def _sign_image(text: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (384, 256), tuple(int(x) for x in rng.integers(0, 90, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle((30, 70, 354, 186), fill=(250, 250, 240))
    d.text((192, 128), text, fill=(10, 10, 10), font=_font(44), anchor="mm")
    return _jpeg(np.asarray(img))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def _overlay_image(photo: str, text: str) -> bytes:
    """A photo with a light band across its lower part and ``text`` on it."""
    img = Image.fromarray(_photo(photo)).convert("RGB")
    w, h = img.size
    d = ImageDraw.Draw(img)
    band = (0, int(h * 0.68), w, int(h * 0.92))
    d.rectangle(band, fill=(245, 245, 235))
    font = _font(max(24, int((band[3] - band[1]) * 0.55)))
    d.text((w // 2, (band[1] + band[3]) // 2), text, fill=(15, 15, 15), font=font, anchor="mm")
    return _jpeg(np.asarray(img), quality=88)


def _repost_image(photo: str) -> bytes:
    """The photo as a repost: scaled to 90% and saved at a lower JPEG quality."""
    img = Image.fromarray(_photo(photo))
    img = img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.BICUBIC)
    return _jpeg(np.asarray(img), quality=70)


def _crop_image(photo: str, seed: int) -> bytes:
    """A crop of the photo, 55-85% of each side at an offset from ``seed``."""
    arr = _photo(photo)
    rng = np.random.default_rng(seed)
    h, w = arr.shape[:2]
    ch, cw = int(h * rng.uniform(0.55, 0.85)), int(w * rng.uniform(0.55, 0.85))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return _jpeg(np.ascontiguousarray(arr[y:y + ch, x:x + cw]), quality=85)


def _gradient(seed: int, size=(256, 256)) -> bytes:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.5, 3)
    arr = np.stack([(np.sin(xx / 40 * a[0]) + 1) * 127, (np.cos(yy / 30 * a[1]) + 1) * 127,
                    ((xx + yy) / (h + w)) * 255 * a[2] % 256], axis=-1).astype(np.uint8)
    return _jpeg(arr)


def pool_samples() -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) for every pair of the pool, in shard order."""
    samples: list[tuple[str, bytes, str]] = []
    for name, caption in PHOTOS.items():
        arr = _photo(name)
        if arr.ndim == 3 and arr.shape[2] == 4:
            data = _png(Image.fromarray(arr))
        else:
            data = _jpeg(arr)
        samples.append((f"photo_{name}", data, caption))
    i = 0
    for cname, color in SHAPES:
        for shape in ("circle", "square", "triangle"):
            samples.append((f"shape_{i:03d}", _shape_image(cname, color, shape, i), f"a {cname} {shape} on a light background"))
            i += 1
    for j, text in enumerate(SIGNS):
        samples.append((f"sign_{j:03d}", _sign_image(text, j), f'a white sign that says "{text}"' if j % 2 else text))
    for j in range(6):
        samples.append((f"pattern_{j:03d}", _gradient(j), f"abstract colourful wave pattern number {j + 1}"))
    # Pairs that the filters should catch.
    samples.append(("dup_chelsea", samples[1][1], "the same cat photo posted again"))
    samples.append(("tiny_thumb", _gradient(99, (40, 40)), "a tiny thumbnail"))
    samples.append(("wide_banner", _gradient(98, (80, 600)), "a very wide web banner"))
    samples.append(("no_caption", _gradient(97), "   "))
    samples.append(("corrupt_file", samples[0][1][: len(samples[0][1]) // 3], "a download that was cut off"))
    samples.append(("mojibake", _gradient(96), "cafÃ© au lait on a   rainy morning"))
    # Pairs for the later stages of the quickstart (parrot captions, reposts, alt text).
    for key, photo, text, caption in OVERLAYS:
        samples.append((key, _overlay_image(photo, text), caption))
    for key, photo, caption in REPOSTS:
        samples.append((key, _repost_image(photo), caption))
    n = 0
    for photo, captions in ALT_TEXT:
        for caption in captions:
            samples.append((f"alt_{n:03d}", _crop_image(photo, 1000 + n), caption))
            n += 1
    return samples


def write_pool(folder: str, shard_size: int = 32) -> list[str]:
    """Write the pool as WebDataset tars under ``folder``; returns the tar paths."""
    os.makedirs(folder, exist_ok=True)
    samples = pool_samples()
    paths = []
    for s, start in enumerate(range(0, len(samples), shard_size)):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tf:
            for key, data, caption in samples[start : start + shard_size]:
                ext = "png" if data.startswith(b"\x89PNG") else "jpg"
                meta = {"key": key, "caption": caption, "status": "success"}
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode()),
                                      (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths
