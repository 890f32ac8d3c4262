"""CLIP model loading (stages/clip_models.py): QuickGELU for the weights trained with it, one
loader for every stage (clip_score and the parrot stage's CLIP check), offline.

No network: OpenAI's ViT-B-32 is stood in for by random weights put into a temporary Hugging
Face cache at the exact repo and file name open_clip resolves for ``ViT-B-32``/``openai``;
the other models are tiny ones built from a config (tests/clip_tiny.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from clip_tiny import NAME, TINY_CONFIG, put_in_hf_cache, write_tiny_clip
from pairsift.pipeline.errors import ConfigError
from pairsift.samplepool import pool_samples
from pairsift.stages import clip_models
from pairsift.stages.parrot import ClipModelConfig, ClipSimilarity, check_clip


@pytest.fixture(autouse=True)
def _torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _pairs(n: int) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of the sample pool's decodable pairs: photos and drawings."""
    return [s for s in pool_samples() if s[0] != "corrupt_file"][:n]


def _by_hand(arch: str, weights: str, pairs) -> np.ndarray:
    """open_clip's own computation, one pair at a time, image converted to RGB first."""
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    out = []
    with torch.no_grad():
        for _, data, caption in pairs:
            x = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            out.append(float((model.encode_image(x, normalize=True) * model.encode_text(tokenizer([caption]),
                                                                                         normalize=True)).sum()))
    return np.asarray(out)


# --------------------------------------------------------------------------- the rule


def test_quick_gelu_follows_the_tag_and_the_architecture(tmp_path):
    q = clip_models.quick_gelu
    assert q("ViT-B-32", "openai") and q("ViT-L-14", "openai")  # LAION's and DataComp's filters
    assert q("ViT-B-32", "metaclip_400m")  # MetaCLIP 1 trained with QuickGELU as well
    assert q("ViT-B-32-quickgelu", "openai") and q("ViT-B-32-quickgelu", "/some/checkpoint.pt")
    assert q("ViT-B-32", "hf-hub:timm/vit_base_patch32_clip_224.openai")  # the openai tag's Hub repo
    assert not q("ViT-B-32", "laion2b_s34b_b79k") and not q("ViT-L-14", "datacomp_xl_s13b_b90k")
    assert not q("ViT-B-32", "random") and not q("ViT-B-32", "/some/checkpoint.pt")
    config, _ = write_tiny_clip(tmp_path)
    assert not q(config, "random")
    quick = tmp_path / "tiny-quick.json"
    quick.write_text(json.dumps({**TINY_CONFIG, "quick_gelu": True}))
    assert q(str(quick), "random")
    # Every pretrained tag open_clip ships: QuickGELU exactly where its config or the
    # architecture's says so.
    checked = 0
    for arch, tag in open_clip.list_pretrained():
        expected = bool(open_clip.get_model_config(arch).get("quick_gelu")
                        or open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
        assert q(arch, tag) == expected, (arch, tag)
        checked += expected
    assert checked > 20


def test_the_loaded_model_runs_quickgelu_only_when_the_rule_says_so(tmp_path):
    from open_clip.transformer import QuickGELU

    def activations(loaded):
        return {type(m) for m in loaded.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}

    config, weights = write_tiny_clip(tmp_path)
    plain = clip_models.load(config, weights)
    assert not plain.quick_gelu and activations(plain) == {torch.nn.GELU}
    quick = tmp_path / "tiny-quick.json"
    quick.write_text(json.dumps({**TINY_CONFIG, "quick_gelu": True}))
    loaded = clip_models.load(str(quick), weights)  # the same weights, the config's activation
    assert loaded.quick_gelu and activations(loaded) == {QuickGELU}


# --------------------------------------------------------------------------- OpenAI weights, offline


@pytest.fixture(scope="module")
def openai_cache(tmp_path_factory):
    """(HF_HOME, weights file): random ViT-B-32 weights where open_clip looks for OpenAI's."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf_home")
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    repo, filename = os.path.split(cfg["hf_hub"])  # 'timm/vit_base_patch32_clip_224.openai', ''
    assert cfg["quick_gelu"] and not filename  # the repo's default weights: the safetensors copy first
    torch.manual_seed(0)
    weights = home / "random-vit-b-32.safetensors"
    save_file(open_clip.create_model("ViT-B-32").state_dict(), str(weights))
    put_in_hf_cache(home / "hub", repo, {HF_SAFE_WEIGHTS_NAME: weights})
    return home, str(weights)


def _write_tar(path, pairs) -> None:
    with tarfile.open(path, "w") as tf:
        for key, data, caption in pairs:
            for name, payload in ((f"{key}.png", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def test_openai_weights_score_as_open_clip_quickgelu_offline(openai_cache, tmp_path, monkeypatch):
    """`pairsift run` with clip_score ViT-B-32/openai and HF_HOME pointing at the cache, offline:
    the scores are open_clip's ViT-B-32-quickgelu on the same weights, not ViT-B-32's GELU."""
    from huggingface_hub import constants
    from open_clip.pretrained import download_pretrained

    home, weights = openai_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # what HF_HOME gives a new process
    # The cache holds the file open_clip itself resolves for the tag, offline:
    assert os.path.realpath(download_pretrained(open_clip.get_pretrained_cfg("ViT-B-32", "openai"))) == weights

    pairs = _pairs(6)
    (tmp_path / "pool").mkdir()
    _write_tar(tmp_path / "pool" / "000000.tar", pairs)
    spec = {"name": "openai", "input": {"format": "webdataset", "path": "pool"}, "output": "out",
            "stages": [{"clip_score": {"model": "ViT-B-32", "pretrained": "openai"}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PAIRSIFT_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "pairsift.cli", "run", "job.yaml", "--num-cpus", "2"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stage_facts"]["0:clip_score"]["quick_gelu"] is True
    meta = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    got = {row["key"]: row["clip_score"] for row in meta}
    assert sorted(got) == sorted(k for k, _, _ in pairs)
    scores = np.asarray([got[k] for k, _, _ in pairs])

    quick = _by_hand("ViT-B-32-quickgelu", weights, pairs)
    gelu = _by_hand("ViT-B-32", weights, pairs)
    shift = np.abs(quick - gelu)
    print(f"QuickGELU score shift on random ViT-B-32 weights ({len(pairs)} pairs): mean {shift.mean():.2e}, "
          f"max {shift.max():.2e}, score std {quick.std():.2e}")
    np.testing.assert_allclose(scores, quick, atol=1e-5, rtol=0)
    assert shift.min() > 1e-5 and shift.mean() > 1e-4  # GELU would have failed the line above

    # The parrot stage's CLIP check loads through the same loader: QuickGELU too.
    check_clip(ClipModelConfig(model="ViT-B-32", pretrained="openai"))
    sim = ClipSimilarity("ViT-B-32", "openai")
    assert sim.loaded.quick_gelu
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in pairs]
    np.testing.assert_allclose(sim(arrays, [c for _, _, c in pairs]), quick, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the parrot stage's CLIP


def test_parrot_clip_check_is_clip_scores_offline_check(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as e:
        check_clip(ClipModelConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    msg = str(e.value)
    assert msg.startswith("parrot.clip:") and "offline" in msg
    assert "pairsift models pull ViT-B-32:laion2b_s34b_b79k" in msg
    with pytest.raises(ConfigError, match="parrot.clip.model"):
        check_clip(ClipModelConfig(model="ViT-B-33", pretrained="openai"))
    with pytest.raises(ConfigError, match="parrot.clip.pretrained"):
        check_clip(ClipModelConfig(model="ViT-B-32", pretrained="no_such_tag"))
    with pytest.raises(ConfigError, match="parrot.clip.pretrained: must be empty"):
        check_clip(ClipModelConfig(model="hf-hub:org/repo", pretrained="openai"))


def test_parrot_clip_takes_hf_hub_local_dir_and_config_file_models(tmp_path, monkeypatch):
    """The model forms clip_score takes work in the parrot stage too, with the same numbers."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    config, weights = write_tiny_clip(tmp_path / "tiny")
    state = torch.load(weights, weights_only=True)
    safetensors = tmp_path / "tiny.safetensors"
    save_file(state, str(safetensors))
    open_clip_config = json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}).encode()
    local = tmp_path / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_bytes(open_clip_config)
    (local / "open_clip_model.safetensors").write_bytes(safetensors.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    put_in_hf_cache(tmp_path / "hub", "someone/tiny-clip", {"open_clip_config.json": open_clip_config,
                                                             "open_clip_model.safetensors": safetensors})

    pairs = _pairs(5)
    expected = _by_hand(NAME, weights, pairs)
    arrays = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, d, _ in pairs]
    captions = [c for _, _, c in pairs]
    for clip in (ClipModelConfig(model=config, pretrained=weights),
                 ClipModelConfig(model=f"local-dir:{local}", pretrained=""),
                 ClipModelConfig(model="hf-hub:someone/tiny-clip", pretrained="")):
        check_clip(clip)
        got = ClipSimilarity(clip.model, clip.pretrained, threads=2)(arrays, captions)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=clip.model)


def test_cpu_model_calls_do_not_depend_on_the_thread_count(tmp_path):
    """Batches of 5 to 11 pairs are where MKL splits a float32 product across threads: the
    embedder computes them with one torch thread whatever threads the caller has."""
    config, weights = write_tiny_clip(tmp_path)
    loaded = clip_models.load(config, weights)
    rng = np.random.default_rng(0)
    pixels = [torch.from_numpy(rng.standard_normal((3, 64, 64)).astype(np.float32)) for _ in range(27)]
    tokens = loaded.tokenizer([f"caption number {i} of a few words" for i in range(27)])
    results = []
    for main_threads, pool_threads in ((1, 1), (2, 2), (2, 1), (1, 3)):
        torch.set_num_threads(main_threads)
        embedder = clip_models.PairEmbedder(loaded, pool_threads)
        results.append(embedder.embed(pixels, tokens, 7))  # calls of 7, 7, 7 and 6 pairs
        embedder.close()
        assert torch.get_num_threads() == main_threads  # the caller's count is left alone
    for image, text in results[1:]:
        assert image.tobytes() == results[0][0].tobytes() and text.tobytes() == results[0][1].tobytes()
