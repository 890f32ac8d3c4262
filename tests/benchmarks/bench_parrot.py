"""Benchmark: the parrot stage's detection-first OCR versus full OCR on every image.

A pool of 256 px images, ~30% with rendered text (DejaVu Sans Bold words on scikit-image
photos), the rest photos without text (random crops of scikit-image's sample photos). All
modes run the same RapidOCR engine on one core (onnxruntime with one thread), one after the
other in this process, alternating:

* detection-first (the stage's default): a cheap detection pass at the image's own size
  (longer side at most ``gate_side``), then accurate detection + recognition only where it
  found a box or was unsure (its text probability map above ``gate_min_prob``);
* detection-first, boxes only (``gate_min_prob: null``, the gate before issue 11): only a box
  of the cheap pass counts;
* full OCR on every image: accurate detection (RapidOCR's default, shorter side enlarged to
  736 px) and recognition of whatever it finds, on every image (``gate_side: null``).

Prints images per CPU-second for each (process CPU time, so that other work on a shared
machine does not blur the figures; wall seconds beside it), the ratios to full OCR (the
target: detection-first at least 1.5x), and how often the modes agree on the parrot decision and on whether an image has
text. ``--real`` measures the same on real photos from ../shared/realdata when present: the 159
COCO photos of ``coco_mini_captions`` (640 px, a third with incidental text) and the 17
ICDAR 2015 photos with legible words (1280x720); there the cheap pass is a larger share of the
accurate one, so the gain is smaller.

    python tests/benchmarks/bench_parrot.py [--images 60] [--text-share 0.3] [--size 256] [--repeats 3] [--real]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "hubble_deep_field", "retina",
          "brick", "grass", "gravel", "immunohistochemistry", "clock", "cell", "colorwheel"]
TEXTS = ["SUMMER SALE", "FRESH BREAD", "GRAND OPENING", "FREE SHIPPING", "HAPPY BIRTHDAY", "NO PARKING",
         "BEST PRICE", "HOTEL", "COFFEE", "WELCOME HOME", "OPEN 24 HOURS", "LIMITED EDITION"]


def _font(size: int):
    import matplotlib

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf"), size)


def make_pool(n: int, text_share: float, size: int, seed: int = 0) -> list[tuple[str, bytes, str, bool]]:
    """(uid, JPEG bytes, caption, has_text) for ``n`` images; captions of text images spell
    their text half of the time."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        photos[name] = Image.fromarray(arr).convert("RGB")
    pool = []
    n_text = round(n * text_share)
    for i in range(n):
        name = PHOTOS[int(rng.integers(len(PHOTOS)))]
        src = photos[name]
        w, h = src.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img = src.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)
        caption = f"a photo of {name.replace('_', ' ')}"
        has_text = i < n_text
        if has_text:
            text = TEXTS[int(rng.integers(len(TEXTS)))]
            font = _font(int(size * rng.uniform(0.08, 0.14)))
            d = ImageDraw.Draw(img)
            pos = (size * rng.uniform(0.3, 0.7), size * rng.uniform(0.25, 0.75))
            d.text(pos, text, font=font, fill=(255, 255, 255), anchor="mm", stroke_width=2, stroke_fill=(0, 0, 0))
            if i % 2 == 0:
                caption = text
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        pool.append((f"{i:05d}", buf.getvalue(), caption, has_text))
    order = rng.permutation(n)  # text and photos interleaved
    return [pool[j] for j in order]


def to_table(pool) -> pa.Table:
    from pairsift.pipeline.table import BASE_SCHEMA

    n = len(pool)
    return pa.table({"uid": [p[0] for p in pool], "key": [p[0] for p in pool], "source": ["bench"] * n,
                     "url": [None] * n, "caption": [p[2] for p in pool], "image": [p[1] for p in pool],
                     "drop_reason": pa.nulls(n, pa.string()), "drop_stage": pa.nulls(n, pa.string())},
                    schema=BASE_SCHEMA)


class CountingDetector:
    """The engine, counting accurate (full-size) detection passes."""

    name = "rapidocr"

    def __init__(self, inner):
        self.inner = inner
        self.accurate = 0

    def detect(self, image, max_side=None):
        self.accurate += max_side is None
        return self.inner.detect(image, max_side)

    def gate(self, image, max_side):
        return self.inner.gate(image, max_side)

    def recognize(self, image, boxes):
        return self.inner.recognize(image, boxes)


def real_pool(shared: Path) -> dict[str, list[tuple[str, bytes, str, bool | None]]]:
    """(uid, bytes, caption, None) of the real photos under ``shared``/realdata, by set."""
    import json

    sets: dict[str, list] = {}
    coco = shared / "realdata" / "coco_mini_captions"
    if coco.is_dir():
        rows = []
        for split in ("train2017", "val2017"):
            ann = json.loads((coco / "annotations" / f"captions_{split}.json").read_text())
            files = {im["id"]: f"{split}/{im['file_name']}" for im in ann["images"]}
            first = {}
            for a in ann["annotations"]:
                first.setdefault(files[a["image_id"]], a["caption"])
            rows += [(n, (coco / n).read_bytes(), c, None) for n, c in sorted(first.items())]
        sets["COCO photos, human captions"] = rows
    icdar = shared / "realdata" / "scene_text_gt" / "icdar2015"
    if icdar.is_dir():
        rows = []
        for line in (icdar / "annotations.jsonl").read_text().splitlines():
            a = json.loads(line)
            legible = [i["text"] for i in a["instances"] if not i["ignore"]]
            if legible:
                rows.append((a["image"], (icdar / a["image"]).read_bytes(), " ".join(legible), None))
        sets["ICDAR 2015 photos, GT-word captions"] = rows
    return sets


def measure(label: str, pool, stages: dict, engine: CountingDetector, repeats: int) -> None:
    table = to_table(pool)
    for stage in stages.values():  # warm-up (first-shape allocations)
        stage.process(table.slice(0, 4))
    best: dict[str, float] = {}
    wall: dict[str, float] = {}
    outputs: dict[str, list[dict]] = {}
    accurate: dict[str, int] = {}
    for _ in range(repeats):
        for mode, stage in stages.items():  # side by side, alternating
            engine.accurate = 0
            c0, t0 = time.process_time(), time.perf_counter()
            out = stage.process(table)
            cpu, dt = time.process_time() - c0, time.perf_counter() - t0
            best[mode] = min(best.get(mode, float("inf")), cpu)
            wall[mode] = min(wall.get(mode, float("inf")), dt)
            outputs[mode] = out.select(["uid", "ocr_boxes", "cotr", "drop_reason"]).to_pylist()
            accurate[mode] = engine.accurate
    n = len(pool)
    print(f"{label}: RapidOCR, onnxruntime 1 thread; best of {repeats}")
    full = n / best[FULL]
    for mode, cpu in best.items():
        rate = n / cpu
        ratio = f"   {rate / full:.2f}x full OCR" if mode != FULL else ""
        print(f"  {mode:<28} {rate:6.2f} images per CPU-second ({cpu:5.1f} CPU-s, {wall[mode]:5.1f} s wall; "
              f"accurate detection on {accurate[mode]:3d}/{n}){ratio}")
    truth = {p[0]: p[3] for p in pool}
    b = outputs[FULL]
    for mode in stages:
        if mode == FULL:
            continue
        a = outputs[mode]
        same_drop = sum(x["drop_reason"] == y["drop_reason"] for x, y in zip(a, b))
        same_text = sum((x["ocr_boxes"] > 0) == (y["ocr_boxes"] > 0) for x, y in zip(a, b))
        line = f"  {mode}: agrees with full OCR on the parrot decision {same_drop}/{n}, on has-text {same_text}/{n}"
        if all(v is not None for v in truth.values()):
            found = sum(1 for r in a if truth[r["uid"]] and r["ocr_boxes"] > 0)
            junk = sum(1 for r in a if not truth[r["uid"]] and r["ocr_boxes"] > 0)
            line += f"; rendered-text images read {found}/{sum(truth.values())}, photos without it read {junk}"
        print(line)


FULL = "full OCR on every image"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--text-share", type=float, default=0.3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also the real photos of ../shared/realdata")
    args = ap.parse_args(argv)

    from pairsift.stages.ocr_engines import RapidOcrEngine
    from pairsift.stages.parrot import ParrotConfig, ParrotStage

    engine = CountingDetector(RapidOcrEngine(threads=1))
    stages = {}
    for mode, cfg in {"detection-first": ParrotConfig(), "detection-first, boxes only": ParrotConfig(gate_min_prob=None),
                      FULL: ParrotConfig(gate_side=None)}.items():
        stages[mode] = ParrotStage(cfg)
        stages[mode].engine = engine  # one engine, one onnxruntime thread: per-core figures
    pool = make_pool(args.images, args.text_share, args.size)
    n_text = sum(p[3] for p in pool)
    measure(f"pool: {len(pool)} images at {args.size} px, {n_text} with rendered text ({n_text / len(pool):.0%})",
            pool, stages, engine, args.repeats)
    if args.real:
        shared = Path(__file__).resolve().parents[3] / "shared"
        sets = real_pool(shared)
        if not sets:
            print(f"--real: no photos under {shared}/realdata")
        for label, rows in sets.items():
            measure(f"{label}: {len(rows)} photos", rows, stages, engine, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
