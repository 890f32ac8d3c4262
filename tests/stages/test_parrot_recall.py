"""Stage parrot on real photos: recall on scene-text photos captioned with their own words, and
false drops on COCO photos with their human captions (issue 11 §3).

* Parrot pairs: the 17 ICDAR 2015 photos (8 training, 9 test; 1280x720 Google Glass photos of
  small incidental text) that have legible ground-truth words, each captioned with those words
  in ground-truth order. The captions are synthetic (made here from the official GT); the words
  and their case are the annotators'.
* Human captions: the 159 COCO 2017 photos of ``coco_mini_captions`` with the first of their
  five captions (all five are scored too).

Recall and false drops are measured with the stage's default, the paper's own rule: ``cotr``
(Algorithm 1, case-sensitive whitespace tokens) and the subset "CoTR < 0.3" (a pair outside it
is a parrot). The paper's thresholds were set on that CoTR, and it is what a job gets; the
normalised variants are printed beside it on the same OCR output.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from conftest import shared_path
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.cotr import cotr, cotr_normalized
from pairsift.stages.parrot import ParrotConfig, ParrotStage

MIN_RECALL = 0.8
MAX_FALSE_DROP = 0.05


def _table(rows: list[tuple[str, bytes, str]]) -> pa.Table:
    n = len(rows)
    return pa.table({"uid": [r[0] for r in rows], "key": [r[0] for r in rows], "source": ["test"] * n,
                     "url": [None] * n, "caption": [r[2] for r in rows], "image": [r[1] for r in rows],
                     "drop_reason": pa.nulls(n, pa.string()), "drop_stage": pa.nulls(n, pa.string())},
                    schema=BASE_SCHEMA)


@pytest.fixture(scope="module")
def engine():
    from pairsift.stages.ocr_engines import RapidOcrEngine

    return RapidOcrEngine(threads=1)


def _stage(engine, **config) -> ParrotStage:
    s = ParrotStage(ParrotConfig(**config))
    s.engine = engine
    return s


@pytest.fixture(scope="module")
def scene_text() -> list[tuple[str, bytes, str]]:
    root = shared_path("realdata", "scene_text_gt", "icdar2015")
    rows = []
    for line in (root / "annotations.jsonl").read_text().splitlines():
        a = json.loads(line)
        legible = [i["text"] for i in a["instances"] if not i["ignore"]]
        if legible:  # synthetic caption: the photo's legible ground-truth words
            rows.append((a["image"], (root / a["image"]).read_bytes(), " ".join(legible)))
    assert len(rows) == 17
    return rows


@pytest.fixture(scope="module")
def coco() -> tuple[list[tuple[str, bytes, str]], dict[str, list[str]]]:
    root = shared_path("realdata", "coco_mini_captions")
    captions: dict[str, list[str]] = {}
    for split in ("train2017", "val2017"):
        ann = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
        files = {im["id"]: f"{split}/{im['file_name']}" for im in ann["images"]}
        for a in ann["annotations"]:
            captions.setdefault(files[a["image_id"]], []).append(a["caption"])
    rows = [(n, (root / n).read_bytes(), captions[n][0]) for n in sorted(captions)]
    assert len(rows) == 159
    return rows, captions


def _caught(rows: list[dict], score) -> int:
    return sum(score(r["caption"], r["ocr_text"]) >= 0.3 for r in rows)


@pytest.mark.slow
def test_recall_on_scene_text_photos_captioned_with_their_own_words(engine, scene_text):
    gated = _stage(engine).process(_table(scene_text)).to_pylist()
    full = _stage(engine, gate_side=None).process(_table(scene_text)).to_pylist()
    boxes_only = _stage(engine, gate_min_prob=None).process(_table(scene_text)).to_pylist()
    for r in gated:  # the stored cotr is Algorithm 1 on the stored OCR text
        assert r["cotr"] == pytest.approx(len(set(r["caption"].split()) & set(r["ocr_text"].split()))
                                          / len(set(r["caption"].split())))
    caught = {r["uid"] for r in gated if r["drop_reason"] == "parrot"}
    assert caught == {r["uid"] for r in gated if r["cotr"] >= 0.3}
    n = len(gated)
    recall = len(caught) / n
    lines = [f"{'':28s}{'gate (default)':>16s}{'boxes-only gate':>17s}{'full OCR':>10s}"]
    for name, score in (("cotr (paper)", cotr), ("cotr_normalized", cotr_normalized),
                        ("cotr_fuzzy", lambda c, o: cotr_normalized(c, o, fuzzy=True))):
        lines.append(f"{name + ' >= 0.3':28s}" + "".join(f"{_caught(rows, score):>{w - 3}d}/{n}"
                                                          for rows, w in ((gated, 16), (boxes_only, 17), (full, 10))))
    print("\nICDAR 2015 parrot pairs caught, of 17:\n" + "\n".join(lines))
    print("missed:", {r["uid"]: (r["caption"], r["ocr_text"]) for r in gated if r["uid"] not in caught})
    assert recall >= MIN_RECALL
    # The gate costs no recall against full OCR on every image, and the unsure rule is what
    # brings it there: with boxes alone the cheap pass misses small signs ("EXIT", "NUS", "DOORS").
    assert caught >= {r["uid"] for r in full if r["drop_reason"] == "parrot"}
    assert len({r["uid"] for r in boxes_only if r["drop_reason"] == "parrot"}) < len(caught)


@pytest.mark.slow
def test_human_captions_of_coco_photos_are_rarely_dropped(engine, coco):
    rows, captions = coco
    out = _stage(engine).process(_table(rows)).to_pylist()
    photos = len(out)
    dropped = [r for r in out if r["drop_reason"] == "parrot"]
    every = {name: np.array([score(c, r["ocr_text"]) for r in out for c in captions[r["uid"]]])
             for name, score in (("cotr", cotr), ("cotr_normalized", cotr_normalized),
                                 ("cotr_fuzzy", lambda c, o: cotr_normalized(c, o, fuzzy=True)))}
    with_text = sum(r["ocr_boxes"] > 0 for r in out)
    print(f"\nCOCO: {photos} photos, {with_text} with legible text ({with_text / photos:.1%}: what "
          f"policy no_text drops); dropped as parrot (first caption): {len(dropped)} "
          f"({len(dropped) / photos:.1%})")
    for name, s in every.items():
        print(f"  all {len(s)} human captions, {name} >= 0.3: {(s >= 0.3).mean():.1%}; > 0: {(s > 0).mean():.1%}; "
              f"max {s.max():.2f}")
    assert len(dropped) / photos <= MAX_FALSE_DROP
    assert (every["cotr"] >= 0.3).mean() <= MAX_FALSE_DROP
    assert with_text >= 30  # the photos do carry text, and it is read: the rate is not trivially 0
