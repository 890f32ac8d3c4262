"""The ready job specs in jobs/: every one is valid, and the recipes run on the quickstart pool
(with a tiny local CLIP model in place of the real weights, which need network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clip_tiny import write_tiny_clip
from conftest import REPO
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.spec import load_job, parse_job

JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_job_spec_is_valid(path):
    spec = load_job(path)
    assert spec.name and spec.stages


def _recipe(name: str, pool: Path, out: Path, tiny: tuple[str, str], **overrides):
    """The shipped job with the quickstart pool as input, the tiny CLIP for every clip_score
    pass, and ``overrides`` ({stage name: {key: value}}) merged into its stages' settings."""
    raw = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
    raw["input"]["path"] = str(pool)
    raw["output"] = str(out)
    for entry in raw["stages"]:
        if "clip_score" in entry:
            entry["clip_score"]["model"], entry["clip_score"]["pretrained"] = tiny
        for stage, values in overrides.items():
            if stage in entry:
                entry[stage].update(values)
    return parse_job(raw, base_dir=REPO / "jobs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny"))


def _kept_scores(out: Path) -> list[float]:
    return pq.read_table(out / "metadata", columns=["clip_score"]).column("clip_score").to_pylist()


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    kept = pq.read_table(out / "metadata").to_pylist() if list((out / "metadata").glob("*.parquet")) else []
    return kept, pq.read_table(out / "rejected").to_pylist()


def _stage_names(result) -> list[str]:
    """The job's stages in the order they ran (after ingest)."""
    return [s["stage"] for s in result.manifest["counts"]["stages"] if s["stage"] != "ingest"]


def test_shipped_recipes_are_named_after_their_papers():
    names = {p.stem for p in JOBS}
    assert {"laion400m", "laion5b_en", "datacomp_clip_score", "datacomp_basic_clip_score", "datacomp_prune",
            "recaption"} <= names
    assert not {"laion", "datacomp"} & names  # the old "-style" recipes said neither paper's setting


@pytest.mark.parametrize("name, threshold", [("laion400m", 0.3), ("laion5b_en", 0.28)])
def test_laion_recipes_keep_their_papers_threshold(ray_session, sample_pool, tmp_path, tiny, name, threshold):
    result = run_job(_recipe(name, sample_pool, tmp_path / "out", tiny))
    kept, rejected = _rows(tmp_path / "out")
    assert len(kept) + len(rejected) == result.manifest["counts"]["input"]
    low = [r for r in rejected if r["drop_reason"] == "clip_score"]
    assert low and all(r["clip_score"] < threshold for r in low)
    assert all(r["clip_score"] >= threshold for r in kept)  # (the tiny random CLIP may pass none)
    assert {r["drop_reason"] for r in rejected if r["drop_stage"] == "quality"} >= {"caption_too_few_chars"}
    assert all(len(r["caption"]) >= 5 for r in kept)
    spec = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
    clip = next(e["clip_score"] for e in spec["stages"] if "clip_score" in e)
    assert (clip["model"], clip["pretrained"], clip["min_score"]) == ("ViT-B-32", "openai", threshold)
    if name == "laion5b_en":  # CLD3 as DataComp's LAION-2B reproduction runs it
        import gcld3

        cld3 = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        assert _stage_names(result) == ["quality", "language", "clip_score"]
        for r in kept + [r for r in rejected if r["drop_stage"] in ("language", "clip_score")]:
            english = cld3.FindLanguage(text=r["caption"].replace("\n", " ")).language == "en"
            assert english == (r["drop_reason"] != "language"), r["caption"]
    else:
        assert _stage_names(result) == ["quality", "clip_score"] and "language" not in rejected[0]


def test_datacomp_clip_score_recipe_keeps_top_30_percent_of_the_raw_pool(ray_session, sample_pool, tmp_path, tiny):
    result = run_job(_recipe("datacomp_clip_score", sample_pool, tmp_path / "out", tiny))
    assert _stage_names(result) == ["clip_score"]  # no other filter first
    kept, rejected = _rows(tmp_path / "out")
    scored = [r for r in rejected if r["drop_reason"] == "clip_score"]
    pool = len(kept) + len(scored)  # every pair that could be scored
    assert pool == result.manifest["counts"]["input"] - sum(
        r["drop_reason"] in ("decode_error", "missing_caption", "missing_image", "caption_not_utf8") for r in rejected)
    assert len(kept) == round(0.3 * pool)
    assert min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in scored)
    assert all(math.isfinite(r["clip_score"]) for r in kept)


def test_datacomp_basic_intersect_clip_score_recipe(ray_session, sample_pool, tmp_path, tiny):
    """Basic ∩ CLIP score: the 30% is of the raw pool (as DataComp intersects two uid lists),
    and the basic filter's rules, as baselines/apply_filter.py states them, hold for every kept pair."""
    import fasttext

    from pairsift.stages.language import shipped_fasttext_model

    spec = yaml.safe_load((REPO / "jobs" / "datacomp_basic_clip_score.yaml").read_text())
    assert spec["stages"][0]["clip_score"]["top_fraction"] == 0.3
    # with the tiny random CLIP the pool's few bad pairs all rank low: a wider cut reaches them
    fraction = 0.9
    result = run_job(_recipe("datacomp_basic_clip_score", sample_pool, tmp_path / "out", tiny,
                             clip_score={"top_fraction": fraction}))
    assert _stage_names(result) == ["clip_score", "quality", "language"]
    kept, rejected = _rows(tmp_path / "out")
    by_clip = [r for r in rejected if r["drop_reason"] == "clip_score"]
    top = kept + [r for r in rejected if r["drop_stage"] in ("quality", "language")]
    assert len(top) == round(fraction * (len(top) + len(by_clip)))  # the cut is of the raw pool
    assert min(r["clip_score"] for r in top) >= max(r["clip_score"] for r in by_clip)
    ft = fasttext.load_model(shipped_fasttext_model())
    for r in kept:
        text, w, h = r["caption"], r["width"], r["height"]
        assert ft.predict(text.replace("\n", " "))[0][0] == "__label__en"
        assert len(text.split()) > 2 and len(text) > 5 and min(w, h) >= 200 and max(w, h) / min(w, h) <= 3.0
    assert {r["drop_reason"] for r in rejected if r["drop_stage"] == "quality"} & {"too_small", "caption_too_short",
                                                                                   "caption_too_few_chars"}


def test_datacomp_prune_recipe_runs_in_the_dbp_papers_order(ray_session, sample_pool, tmp_path, tiny):
    """SemDeDup -> CLIP-score filter -> DBP: each step's pool is what the step before left."""
    # the tiny random CLIP embeds every image nearly alike: a tight eps keeps SemDeDup from eating the pool
    small = {"semdedup": {"clusters": 4, "eps": 1e-4, "kmeans_sample": 1000},
             "concept_prune": {"clusters": 3, "neighbours": 2, "kmeans_sample": 1000}}
    result = run_job(_recipe("datacomp_prune", sample_pool, tmp_path / "out", tiny, **small))
    facts = result.manifest["stage_facts"]
    assert sorted(facts, key=lambda k: int(k.split(":")[0])) == [
        "0:clip_score", "1:semdedup", "2:score_filter", "3:concept_prune"]
    assert facts["0:clip_score"]["top_fraction"] is None and facts["2:score_filter"]["top_fraction"] == 0.3
    after_dedup = facts["1:semdedup"]["pool"] - facts["1:semdedup"]["duplicates"]
    assert facts["2:score_filter"]["pool"] == after_dedup > 10
    assert facts["2:score_filter"]["kept"] == round(0.3 * after_dedup) == facts["3:concept_prune"]["pool"]
    assert result.manifest["cache"]["0:clip_score"]["computed"] > 0  # CLIP ran once: the filter reads its scores
    kept, rejected = _rows(tmp_path / "out")
    assert len(kept) == facts["3:concept_prune"]["kept"] == int(0.5 * facts["3:concept_prune"]["pool"]) > 0
    assert (facts["3:concept_prune"]["allocation"], facts["3:concept_prune"]["floor"]) == ("shift", "reference")
    assert len(kept) + len(rejected) == result.manifest["counts"]["input"]
    assert {r["drop_reason"] for r in rejected} >= {"score_filter", "concept_prune"}


def test_metaclip_recipe_balances_with_shipped_metadata(ray_session, sample_pool, tmp_path, tiny):
    result = run_job(_recipe("metaclip", sample_pool, tmp_path / "out", tiny))
    counts = pq.read_table(tmp_path / "out" / "metaclip" / "entry_counts.parquet").to_pandas()
    t = int(counts["t"].iloc[0])
    # jobs/metaclip.yaml gives no t: it comes from MetaCLIP's tail share (t = 20k at 400M)
    from pairsift.metadata.balance import PAPER_TAIL_SHARE, p_to_t

    assert t == p_to_t(counts["count"].to_numpy(), PAPER_TAIL_SHARE) and counts["count"].sum() > 0
    head = counts[counts["count"] > t]
    assert not head.empty and (head["p"] < 1).all()
    meta = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert all(r["metaclip_entries"] and 0 < r["metaclip_p"] <= 1 for r in meta)
    stages = {s["stage"]: s for s in result.manifest["counts"]["stages"]}
    assert stages["metaclip"]["dropped"] > 0 and stages["metaclip"]["out"] == len(meta)
