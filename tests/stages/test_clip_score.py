"""Stage clip_score: the same scores as a plain open_clip loop, exact top fraction, offline
preflight, truncation of long captions. Tiny open_clip model from a config, no network."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from clip_tiny import plain_scores, write_tiny_clip
from conftest import make_job
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.table import BASE_SCHEMA, make_uid
from pairsift.samplepool import pool_samples, write_pool
from pairsift.stages.base import StageContext
from pairsift.stages.clip_score import ClipScoreConfig, ClipScoreStage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """The stage sets torch's threads from the CPUs it was granted (one here): put them back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _stage(tiny, **options) -> ClipScoreStage:
    config, weights = tiny
    options.setdefault("decode_threads", 2)
    stage = ClipScoreStage(ClipScoreConfig(model=config, pretrained=weights, **options),
                           StageContext(extras={"resources": {"num_cpus": 1, "num_gpus": 0}}))
    stage.preflight()
    stage.setup()
    return stage


def _table(pairs: list[tuple[bytes | None, str]], dropped: set[int] = frozenset()) -> pa.Table:
    rows = [{"uid": make_uid("t.tar", f"k{i:03d}"), "key": f"k{i:03d}", "source": "t.tar", "url": None,
             "caption": caption, "image": None if i in dropped else data,
             "drop_reason": "too_small" if i in dropped else None, "drop_stage": "quality" if i in dropped else None}
            for i, (data, caption) in enumerate(pairs)]
    return pa.Table.from_pylist(rows, schema=BASE_SCHEMA)


def _jpeg(seed: int, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- scores


def test_scores_match_plain_open_clip_loop(tiny):
    samples = pool_samples()  # photos, PNG drawings, a corrupt file, an empty caption, ...
    pairs = [(data, caption) for _, data, caption in samples]
    stage = _stage(tiny, batch_size=16)  # several model batches per worker batch
    out = stage.process(_table(pairs, dropped={0}))

    assert out.schema.field("clip_score").type == pa.float32()
    assert out.schema.field("image_emb").type == pa.list_(pa.float16(), 32)
    assert out.schema.field("text_emb").type == pa.list_(pa.float16(), 32)
    scores = out.column("clip_score").to_pylist()
    reasons = out.column("drop_reason").to_pylist()
    assert scores[0] is None and reasons[0] == "too_small"  # dropped earlier: skipped
    corrupt = [i for i, (key, _, _) in enumerate(samples) if key == "corrupt_file"]  # a cut-off JPEG
    assert corrupt and all(reasons[i] == "decode_error" and out.column("drop_stage")[i].as_py() == "clip_score"
                           and scores[i] is None for i in corrupt)
    scored = [i for i in range(len(pairs)) if scores[i] is not None]
    assert len(scored) == len(pairs) - 1 - len(corrupt)

    expected = plain_scores(*tiny, [pairs[i] for i in scored])
    np.testing.assert_allclose([scores[i] for i in scored], expected, atol=1e-4, rtol=0)
    assert np.std(expected) > 1e-3  # the scores differ from pair to pair: a real comparison

    for col in ("image_emb", "text_emb"):
        emb = out.column(col).combine_chunks()
        assert emb.null_count == len(pairs) - len(scored)
        vecs = np.stack([np.asarray(emb[i].values.to_numpy(zero_copy_only=False)) for i in scored])
        assert vecs.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    img = np.stack([np.asarray(out.column("image_emb")[i].values.to_numpy(zero_copy_only=False)) for i in scored])
    txt = np.stack([np.asarray(out.column("text_emb")[i].values.to_numpy(zero_copy_only=False)) for i in scored])
    np.testing.assert_allclose((img.astype(np.float32) * txt).sum(1), expected, atol=5e-3)
    timings = stage.take_timings()
    assert timings["infer"] > 0 and timings["decode"] > 0 and stage.take_timings() == {}


def test_empty_batch_gives_the_schema_without_loading_the_model(tiny):
    stage = _stage(tiny, save_embeddings=False)
    out = stage.process(BASE_SCHEMA.empty_table())
    assert out.num_rows == 0 and out.schema.field("clip_score").type == pa.float32()
    assert "image_emb" not in out.column_names
    assert stage._loaded is None  # nothing live: the model is not even loaded


def test_long_captions_are_truncated_like_open_clip_tokenizer(tiny):
    import open_clip

    words = "a tabby cat sitting on a red wooden chair next to the window in the afternoon sun".split()
    long = " ".join(words * 12)  # ~190 words, far beyond 77 tokens
    longer = long + " and then many more words that the model never sees " * 5
    tokens = open_clip.get_tokenizer("pairsift-tiny-clip")([long])
    assert tokens.shape == (1, 77) and int(tokens[0, -1]) == 49407  # cut, end-of-text token last
    image = _jpeg(1)
    out = _stage(tiny).process(_table([(image, long), (image, longer), (image, "a cat")]))
    s = out.column("clip_score").to_pylist()
    assert s[0] == pytest.approx(plain_scores(*tiny, [(image, long)])[0], abs=1e-4)
    assert s[1] == pytest.approx(s[0], abs=1e-6)  # what lies beyond the context changes nothing
    assert abs(s[2] - s[0]) > 1e-4


def test_min_score_drops_below_the_threshold(tiny):
    pairs = [(_jpeg(i), f"random noise picture number {i}") for i in range(12)]
    scores = np.array(_stage(tiny, save_embeddings=False).process(_table(pairs)).column("clip_score").to_pylist())
    cut = float(np.median(scores))
    out = _stage(tiny, min_score=cut).process(_table(pairs))
    reasons = out.column("drop_reason").to_pylist()
    assert [r == "clip_score" for r in reasons] == list(scores < cut)
    assert all(out.column("image")[i].as_py() is None for i, r in enumerate(reasons) if r)
    assert out.column("clip_score").null_count == 0  # scores are kept for dropped rows too


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _every_mode() -> dict[str, bytes]:
    """Encoded images whose Pillow mode is each mode a web image comes in."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1) % 256
    rgb = Image.fromarray((smooth + rng.integers(0, 40, smooth.shape)).clip(0, 255).astype(np.uint8))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    return {
        "1": _encode(rgb.convert("1"), "PNG"),
        "L": _encode(rgb.convert("L"), "PNG"),
        "LA": _encode(rgb.convert("LA"), "PNG"),
        "P": _encode(palette, "PNG"),
        "P+transparency": _encode(palette, "PNG", transparency=0),
        "RGBA": _encode(rgb.convert("RGBA"), "PNG"),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG"),
        "I;16": _encode(Image.fromarray(grey16), "PNG"),
        "I;16B": _encode(Image.fromarray(grey16.astype(">u2")), "TIFF"),
        "I": _encode(Image.fromarray(grey16.astype(np.int32)), "TIFF"),
        "F": _encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32)), "TIFF"),
        "LAB": _encode(rgb.convert("LAB"), "TIFF"),
        "YCbCr": _encode(rgb.convert("YCbCr"), "TIFF"),
        "RGB": _encode(rgb, "JPEG"),
    }


def test_every_image_mode_is_converted_to_rgb_before_the_transform(tiny):
    """open_clip_train's loader (webdataset ``pilrgb``) converts to RGB, then transforms:
    the scores and embeddings are those of ``preprocess(img.convert("RGB"))``."""
    import open_clip
    import torch

    images = _every_mode()
    for name, data in images.items():
        assert Image.open(io.BytesIO(data)).mode == name.split("+")[0], name
    pairs = [(data, f"a picture in mode {name}") for name, data in images.items()]
    out = _stage(tiny).process(_table(pairs))
    assert out.column("drop_reason").null_count == len(pairs)  # every mode decodes

    open_clip.add_model_config(tiny[0])
    model, _, preprocess = open_clip.create_model_and_transforms("pairsift-tiny-clip", pretrained=tiny[1])
    tokenizer = open_clip.get_tokenizer("pairsift-tiny-clip")
    with torch.no_grad():
        for i, (name, data) in enumerate(images.items()):
            img = Image.open(io.BytesIO(data))
            rgb = preprocess(img.convert("RGB")).unsqueeze(0)
            image = model.encode_image(rgb, normalize=True)
            text = model.encode_text(tokenizer([pairs[i][1]]), normalize=True)
            assert out.column("clip_score")[i].as_py() == pytest.approx(float((image * text).sum()), abs=1e-4), name
            emb = np.asarray(out.column("image_emb")[i].values.to_numpy(zero_copy_only=False), dtype=np.float32)
            np.testing.assert_allclose(emb, image[0].numpy(), atol=2e-3, err_msg=name)
            if name in ("1", "P"):  # where the order matters: resized in its own mode, the input differs
                assert float((preprocess(img) - rgb[0]).abs().max()) > 0.1, name


def test_scores_and_embeddings_do_not_depend_on_the_cpu_count(tiny):
    """With 1 and 2 CPUs granted, the same bytes: on CPU each model call runs with one torch
    thread on a fixed batch (a batch of 5 to 11 pairs is where MKL's float32 products change
    their last bits with the thread count)."""
    pairs = [(_jpeg(i), f"random picture {i}") for i in range(23)]  # model calls of 16 and 7 pairs
    outs = []
    for cpus in (1, 2):
        config, weights = tiny
        stage = ClipScoreStage(ClipScoreConfig(model=config, pretrained=weights, batch_size=32),
                               StageContext(extras={"resources": {"num_cpus": cpus, "num_gpus": 0}}))
        stage.preflight()
        stage.setup()
        outs.append(stage.process(_table(pairs)))
    for col in ("clip_score", "image_emb", "text_emb"):
        assert outs[0].column(col).equals(outs[1].column(col)), col


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for sub in ("metadata", "rejected", "shards")
            for p in sorted((folder / sub).rglob("*")) if p.is_file()}


def test_job_output_is_byte_identical_with_1_and_2_cpus(tiny, tmp_path):
    """`pairsift run --num-cpus 1` and `--num-cpus 2` (issue 12, item 19): the same bytes in
    metadata/, rejected/ and shards/. 7-pair shards: the model batches are 5 to 7 pairs."""
    import subprocess
    import sys

    write_pool(str(tmp_path / "pool"), shard_size=7)
    spec = {"name": "cpus", "input": {"format": "webdataset", "path": "pool"}, "output": "out",
            "stages": [{"quality": {}}, {"clip_score": {"model": tiny[0], "pretrained": tiny[1], "min_score": 0.0}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PAIRSIFT_PROGRESS": "0"}
    outs = []
    for cpus in ("1", "2"):
        r = subprocess.run([sys.executable, "-m", "pairsift.cli", "run", "job.yaml", "--num-cpus", cpus, "--output",
                            f"out{cpus}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(_files(tmp_path / f"out{cpus}"))
    assert any(k.startswith("shards/") for k in outs[0]) and any(k.startswith("rejected/") for k in outs[0])
    assert sorted(outs[0]) == sorted(outs[1])
    assert [k for k in outs[0] if outs[0][k] != outs[1][k]] == []
    kept = pq.read_table(tmp_path / "out1" / "metadata")
    assert kept.num_rows > 0 and kept.column("clip_score").null_count == 0


# --------------------------------------------------------------------------- top fraction


def _scored_table(scores: list[float | None], uids: list[str], live: list[bool] | None = None) -> pa.Table:
    live = live or [True] * len(scores)
    return pa.table({
        "uid": pa.array(uids, pa.string()),
        "image": pa.array([b"x" if ok else None for ok in live], pa.binary()),
        "clip_score": pa.array(scores, pa.float32()),
        "drop_reason": pa.array([None if ok else "too_small" for ok in live], pa.string()),
        "drop_stage": pa.array([None if ok else "quality" for ok in live], pa.string()),
    })


def _top_fraction(table: pa.Table, fraction: float, shard_size: int) -> set[str]:
    stage = ClipScoreStage(ClipScoreConfig(model="ViT-B-32", pretrained="random", top_fraction=fraction))
    shards = [table.slice(i, shard_size) for i in range(0, table.num_rows, shard_size)]
    from pairsift.pipeline.runner import run_global_stage

    state, out, _ = run_global_stage(stage, [[s.slice(j, 3) for j in range(0, s.num_rows, 3)] for s in shards])
    assert out.num_rows == table.num_rows
    return {u for u, r in zip(out.column("uid").to_pylist(), out.column("drop_reason").to_pylist()) if r is None}


def test_top_fraction_is_exact_with_ties_broken_by_uid():
    rng = np.random.default_rng(0)
    n = 101
    uids = [f"{int(x):032x}" for x in rng.integers(0, 2**62, n)]
    scores = np.round(rng.normal(0.25, 0.05, n), 2).astype(np.float32)  # 2 decimals: many ties
    scores[:5] = np.nan  # a NaN score ranks last
    live = [i % 10 != 9 for i in range(n)]  # earlier drops are not in the pool
    table = _scored_table(list(map(float, scores)), uids, live)
    pool = [i for i in range(n) if live[i]]
    order = sorted(pool, key=lambda i: (-(scores[i] if not np.isnan(scores[i]) else -np.inf), uids[i]))
    split_ties = 0
    for fraction in (0.3, 0.5, 1 / 3, 0.7, 0.99, 1.0, 0.001):
        k = round(fraction * len(pool))
        expected = {uids[i] for i in order[:k]}
        results = [_top_fraction(table, fraction, size) for size in (7, 20, n)]
        assert results[0] == results[1] == results[2] == expected, fraction
        split_ties += 0 < k < len(pool) and scores[order[k - 1]] == scores[order[k]]
    assert split_ties >= 2  # cuts that fall inside a group of equal scores: the uid decides


def test_top_fraction_end_to_end_exact_and_deterministic(ray_session, tiny, tmp_path):
    pool = tmp_path / "pool"
    write_pool(str(pool), shard_size=8)  # 7 input shards
    # One CPU per worker: two workers at once with ray.num_cpus 2, one with 1.
    stages = [{"quality": {}}, {"clip_score": {"model": tiny[0], "pretrained": tiny[1], "top_fraction": 0.3,
                                               "batch_size": 64, "cpus_per_worker": 1}}]
    runs = []
    for cpus in (2, 1):
        out = tmp_path / f"out{cpus}"
        result = run_job(make_job(pool, out, stages=stages, ray={"num_cpus": cpus}))
        meta, rej = pq.read_table(out / "metadata"), pq.read_table(out / "rejected")
        counts = {s["stage"]: s for s in result.manifest["counts"]["stages"]}
        pool_n = counts["quality"]["out"]
        assert counts["clip_score"]["reasons"] == {"clip_score": pool_n - round(0.3 * pool_n)}
        assert meta.num_rows == round(0.3 * pool_n)
        cut = rej.filter(pc.equal(rej.column("drop_reason"), "clip_score"))
        assert min(meta.column("clip_score").to_pylist()) >= max(cut.column("clip_score").to_pylist())
        facts = result.manifest["stage_facts"]["1:clip_score"]
        assert facts["pool"] == pool_n and facts["kept"] == meta.num_rows
        assert facts["cutoff_score"] == pytest.approx(min(meta.column("clip_score").to_pylist()))
        worker = {k for t in result.manifest["timings"]["phases"] for k in t.get("worker_seconds", {})}
        assert {"clip_score.decode", "clip_score.infer"} <= worker
        runs.append((set(meta.column("uid").to_pylist()), sorted(meta.column("clip_score").to_pylist())))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]  # the same float32 scores, bit for bit


# --------------------------------------------------------------------------- configuration


def test_preflight_offline_for_a_named_tag_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from pairsift.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pool").mkdir()
    write_pool(str(tmp_path / "pool"))
    spec = {"name": "offline", "input": {"format": "webdataset", "path": "pool"}, "output": "out",
            "stages": [{"quality": {}}, {"clip_score": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", "job.yaml"]) == 2  # the exit code of `pairsift run job.yaml`
    err = capsys.readouterr().err
    assert "ViT-B-32" in err and "laion2b_s34b_b79k" in err and "offline" in err
    assert "pairsift models pull ViT-B-32:laion2b_s34b_b79k" in err  # fix 1: fetch into the cache
    assert "point `pretrained` at a local checkpoint file" in err  # fix 2
    assert not (tmp_path / "out").exists()


def test_preflight_passes_when_the_tag_is_cached(tmp_path, monkeypatch):
    """The Hugging Face cache layout open_clip downloads into: a hit needs no network."""
    from huggingface_hub import constants

    snap = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    stage = ClipScoreStage(ClipScoreConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    stage.preflight()
    from pairsift.stages import clip_models

    assert clip_models.cached_files(clip_models.resolve("ViT-B-32", "laion2b_s34b_b79k")) == [
        str(snap / "open_clip_model.safetensors")]


@pytest.mark.parametrize("options, key", [
    ({"model": "ViT-B-33", "pretrained": "random"}, "clip_score.model"),
    ({"model": "ViT-B-32", "pretrained": "no_such_tag"}, "clip_score.pretrained"),
    ({"model": "ViT-B-32", "pretrained": "/no/such/file.pt"}, "clip_score.pretrained"),
    ({"model": "ViT-B-32", "pretrained": None}, "clip_score.pretrained"),
    ({"model": "/no/such/config.json", "pretrained": "random"}, "clip_score.model"),
])
def test_bad_model_or_weights_are_config_errors_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        ClipScoreStage(ClipScoreConfig(**options)).preflight()


def test_min_score_and_top_fraction_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="at most one"):
        make_job(tmp_path, tmp_path / "out", stages=[{"clip_score": {"min_score": 0.2, "top_fraction": 0.3}}])


def test_global_only_with_top_fraction_and_resources_follow_the_cluster():
    cfg = ClipScoreConfig(pretrained="random")
    assert not ClipScoreStage.is_global(cfg)
    assert ClipScoreStage.is_global(cfg.model_copy(update={"top_fraction": 0.3}))

    def ask(config, cluster):
        return ClipScoreStage(config, StageContext(extras={"cluster": cluster})).resources().ray_options()

    assert ask(cfg, {"CPU": 2.0}) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert ask(cfg, {"CPU": 16.0, "GPU": 2.0})["num_gpus"] == 1.0
    assert ask(cfg, {"CPU": 16.0, "GPU": 2.0})["num_cpus"] == min(8.0, os.cpu_count())
    assert ask(cfg.model_copy(update={"device": "cpu"}), {"CPU": 2.0, "GPU": 1.0})["num_gpus"] == 0.0
    assert ask(cfg.model_copy(update={"cpus_per_worker": 1}), {"CPU": 2.0}) == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match="clip_score.device"):
        ask(cfg.model_copy(update={"device": "cuda"}), {"CPU": 2.0})


def test_models_pull_names_and_offline_refusal(tiny, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from pairsift.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    from pairsift.stages.clip_models import parse_pull_name

    assert parse_pull_name("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_pull_name("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == (
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    assert parse_pull_name("ViT-B-32:hf-hub:org/repo/w.bin") == ("ViT-B-32", "hf-hub:org/repo/w.bin")
    assert main(["models", "pull", "ViT-B-32"]) == 2
    assert "MODEL:PRETRAINED" in capsys.readouterr().err
    assert main(["models", "pull", "ViT-B-32:laion2b_s34b_b79k"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert main(["models", "pull", f"{tiny[0]}:{tiny[1]}"]) == 0  # present: loads it, needs no network
    assert tiny[1] in capsys.readouterr().out
