"""The quickstart's sample pool, made on the spot with no network.

Photos are scikit-image's bundled sample images (public domain or CC0; see each
``skimage.data`` function's docstring) with captions written for this project; the rest are
images rendered with Pillow (shapes, gradients, signs with text). A few pairs are bad on
purpose so that every filter has something to do: a byte-identical duplicate, a thumbnail that
is too small, a banner that is too wide, an empty caption, a corrupt file and a caption with
mojibake. Written as WebDataset tars the way img2dataset writes them (``key.jpg``,
``key.txt``, ``key.json``).
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
    import skimage.data

    samples: list[tuple[str, bytes, str]] = []
    for name, caption in PHOTOS.items():
        arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
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
