"""clip_score's ``decode: gpu`` path, run here on CPU (torchvision's libjpeg-turbo decode in
place of nvJPEG, the same code otherwise): the same drops as Pillow's path, scores within a
bound of it, Pillow's exact numbers for what it hands back (PNG, CMYK, damaged files)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from clip_tiny import write_tiny_clip
from conftest import make_job
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA, make_uid
from pairsift.samplepool import pool_samples
from pairsift.stages import clip_models
from pairsift.stages.base import StageContext
from pairsift.stages.clip_score import ClipScoreConfig, ClipScoreStage

#: Largest |score difference| between the two decode paths on the tiny model (measured 6e-4).
SCORE_BOUND = 3e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _stage(tiny, **options) -> ClipScoreStage:
    config, weights = tiny
    stage = ClipScoreStage(ClipScoreConfig(model=config, pretrained=weights, decode_threads=2, **options),
                           StageContext(extras={"resources": {"num_cpus": 1, "num_gpus": 0}}))
    stage.preflight()
    stage.setup()
    return stage


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pairs() -> list[tuple[bytes, str, str]]:
    """(bytes, caption, kind): the sample pool's photos, drawings and broken file, plus JPEGs
    torchvision decodes (colour of odd sizes, greyscale, progressive) and ones it hands back
    (CMYK, truncated)."""
    out = [(data, caption, "pool") for _, data, caption in pool_samples()]
    rng = np.random.default_rng(3)
    for k, (w, h) in enumerate([(97, 61), (300, 200), (64, 64), (41, 130)]):
        photo = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.BLUR)
        out.append((_encoded(photo, quality=85), f"a photo number {k}", "jpeg"))
        out.append((_encoded(photo.convert("L")), f"a grey photo number {k}", "grey"))
    out.append((_encoded(photo, progressive=True), "a progressive photo", "jpeg"))
    out.append((_encoded(photo.convert("CMYK")), "a cmyk photo", "cmyk"))
    good = _encoded(photo)
    out.append((good[: len(good) // 2], "half a photo", "truncated"))
    return out


def _table(pairs) -> pa.Table:
    rows = [{"uid": make_uid("t.tar", f"k{i:03d}"), "key": f"k{i:03d}", "source": "t.tar", "url": None,
             "caption": caption, "image": data, "drop_reason": None, "drop_stage": None}
            for i, (data, caption, _) in enumerate(pairs)]
    return pa.Table.from_pylist(rows, schema=BASE_SCHEMA)


def test_gpu_decode_path_matches_pillow_path(tiny):
    pairs = _pairs()
    batch = _table(pairs)
    cpu = _stage(tiny).process(batch)
    dev = _stage(tiny, decode="gpu").process(batch)
    kinds = [k for _, _, k in pairs]

    assert dev.column("drop_reason").to_pylist() == cpu.column("drop_reason").to_pylist()
    assert cpu.column("drop_reason").to_pylist()[kinds.index("truncated")] == "decode_error"
    a = np.asarray(cpu.column("clip_score").to_pylist(), dtype=object)
    b = np.asarray(dev.column("clip_score").to_pylist(), dtype=object)
    scored = [i for i in range(len(pairs)) if a[i] is not None]
    assert len(scored) >= len(pairs) - 2
    diff = np.array([abs(a[i] - b[i]) for i in scored])
    assert diff.max() < SCORE_BOUND, diff.max()
    on_device = [i for i in scored if kinds[i] in ("jpeg", "grey")]
    assert max(diff[scored.index(i)] for i in on_device) > 0  # decoded by torchvision: not Pillow's pixels
    for i in scored:  # what torchvision hands back is Pillow's, number for number
        if kinds[i] in ("cmyk",) or (kinds[i] == "pool" and pairs[i][0][:3] != b"\xff\xd8\xff"):
            assert a[i] == b[i], (i, kinds[i])


def test_tensor_preprocess_is_open_clips_preprocess_on_tensors(tiny):
    """Pixel for pixel within a few levels of Pillow + open_clip's preprocess; greyscale
    expanded as Pillow's convert("RGB"); CMYK and damaged JPEGs and other formats left to Pillow."""
    import torch

    loaded = clip_models.load(tiny[0], tiny[1])
    tp = clip_models.TensorPreprocess(loaded.preprocess, torch.device("cpu"))
    pairs = _pairs()
    got = tp.decode([d for d, _, _ in pairs])
    for (data, _, kind), x in zip(pairs, got):
        if kind in ("jpeg", "grey"):
            ref = loaded.image_tensor(Image.open(io.BytesIO(data)))
            assert x.shape == ref.shape and x.dtype == ref.dtype
            assert (x - ref).abs().mean() < 0.02  # normalised units: ~1/255 on average
        elif kind in ("cmyk", "truncated"):
            assert x is None
        elif data[:3] != b"\xff\xd8\xff":
            assert x is None


def test_tensor_preprocess_refuses_a_preprocess_it_cannot_run():
    import open_clip

    pre = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    with pytest.raises(ConfigError, match="decode: cpu"):
        clip_models.TensorPreprocess(pre, "cpu")


def test_default_decode_keeps_old_fingerprints(tmp_path):
    base = {"model": "ViT-B-32", "pretrained": "random"}
    plain = make_job(tmp_path, tmp_path / "out", stages=[{"clip_score": base}])
    cpu = make_job(tmp_path, tmp_path / "out", stages=[{"clip_score": {**base, "decode": "cpu"}}])
    gpu = make_job(tmp_path, tmp_path / "out", stages=[{"clip_score": {**base, "decode": "gpu"}}])
    assert plain.fingerprint() == cpu.fingerprint() != gpu.fingerprint()
