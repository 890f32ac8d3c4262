"""Stage language: each engine labels real alt text as its reference code runs it, ``keep``
drops the rest with reason ``language``, and a missing package or model is a config error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_job, shared_path
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages import get_stage_class
from pairsift.stages.base import StageContext
from pairsift.stages.language import LanguageConfig, LanguageStage, shipped_fasttext_model

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog near the river bank.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund am Flussufer.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux près de la rivière.",
    "es": "El rápido zorro marrón salta sobre el perro perezoso cerca del río.",
}


def _batch(texts, dropped=()) -> pa.Table:
    n = len(texts)
    return pa.Table.from_pylist([
        {"uid": f"{i:032x}", "key": str(i), "source": "s", "url": None, "caption": t,
         "image": None if i in dropped else b"img", "drop_reason": "too_small" if i in dropped else None,
         "drop_stage": "quality" if i in dropped else None} for i, t in enumerate(texts)], schema=BASE_SCHEMA)


def _run(texts, dropped=(), **cfg) -> list[dict]:
    stage = LanguageStage(LanguageConfig(**cfg), StageContext())
    stage.preflight()
    stage.setup()
    return stage.process(_batch(texts, dropped)).to_pylist()


@pytest.mark.parametrize("engine", ["fasttext", "cld3", "langid"])
def test_each_engine_names_clear_sentences(engine):
    rows = _run(list(SENTENCES.values()) + ["", None, "Ein Satz"], dropped={6}, engine=engine, keep=["en"])
    assert [r["language"] for r in rows[:4]] == list(SENTENCES)
    assert [r["drop_reason"] for r in rows] == [None, "language", "language", "language", "language", "language",
                                                "too_small"]
    assert rows[4]["language"] is None and rows[6]["language"] is None  # blank text; dropped before
    assert all(0 < r["language_score"] <= 1 for r in rows[:4])
    assert get_stage_class("language") is LanguageStage


def test_label_only_drops_nothing():
    rows = _run(list(SENTENCES.values()), engine="fasttext")
    assert [r["drop_reason"] for r in rows] == [None] * 4 and rows[1]["language"] == "de"


def test_engines_follow_their_reference_calls_on_real_alt_text():
    """fasttext: DataComp's basic filter (predict on the text with newlines as spaces, top label);
    cld3: DataComp's LAION-2B reproduction (NNetLanguageIdentifier(0, 1000).FindLanguage)."""
    import fasttext
    import gcld3

    path = shared_path("realdata", "laion_alt_text_10k", "test_10000.parquet")
    texts = [t for t in pq.read_table(path).column("TEXT").to_pylist() if t and t.strip()][:1000]
    ft = fasttext.load_model(shipped_fasttext_model())
    ft_en = [ft.predict(t.replace("\n", " "))[0][0].split("__label__")[1] == "en" for t in texts]
    cld = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    cld_en = [cld.FindLanguage(text=t.replace("\n", " ")).language == "en" for t in texts]
    for engine, expected in (("fasttext", ft_en), ("cld3", cld_en)):
        rows = _run(texts, engine=engine, keep=["en"])
        assert [r["drop_reason"] is None for r in rows] == expected, engine
    # the engines disagree on short alt text, which is why a recipe names its engine
    assert 0.8 < sum(ft_en) / len(texts) and sum(cld_en) / len(texts) < 0.7


def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="language.model_path"):
        LanguageStage(LanguageConfig(engine="fasttext", model_path=str(tmp_path / "lid.176.bin"))).preflight()
    with pytest.raises(ConfigError, match="language.model_path"):
        LanguageStage(LanguageConfig(engine="cld3", model_path=shipped_fasttext_model())).preflight()
    with pytest.raises(ConfigError, match="keep"):
        make_job(tmp_path, tmp_path / "out", stages=[{"language": {"keep": []}}])
    with pytest.raises(ConfigError, match="engine"):
        make_job(tmp_path, tmp_path / "out", stages=[{"language": {"engine": "cld2"}}])


def test_job_keeps_english_and_accounts_for_every_sample(ray_session, sample_pool, tmp_path):
    from pairsift.pipeline.runner import run_job

    out = tmp_path / "out"
    result = run_job(make_job(sample_pool, out, stages=[{"quality": {}}, {"language": {"keep": ["en"]}}]))
    kept = pq.read_table(out / "metadata").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert len(kept) + len(rejected) == result.manifest["counts"]["input"]
    assert kept and all(r["language"] == "en" for r in kept)
    assert all(r["language"] != "en" for r in rejected if r["drop_reason"] == "language")
