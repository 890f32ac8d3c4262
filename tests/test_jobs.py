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


def _recipe(name: str, pool: Path, out: Path, tiny: tuple[str, str]):
    raw = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
    raw["input"]["path"] = str(pool)
    raw["output"] = str(out)
    for entry in raw["stages"]:
        if "clip_score" in entry:
            entry["clip_score"]["model"], entry["clip_score"]["pretrained"] = tiny
    return parse_job(raw, base_dir=REPO / "jobs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny"))


def _kept_scores(out: Path) -> list[float]:
    return pq.read_table(out / "metadata", columns=["clip_score"]).column("clip_score").to_pylist()


def test_laion_recipe_keeps_scores_above_028(ray_session, sample_pool, tmp_path, tiny):
    result = run_job(_recipe("laion", sample_pool, tmp_path / "out", tiny))
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    low = [r for r in rejected if r["drop_reason"] == "clip_score"]
    assert all(r["clip_score"] < 0.28 for r in low)
    kept = _kept_scores(tmp_path / "out") if result.manifest["counts"]["kept"] else []
    assert all(s >= 0.28 for s in kept)
    assert len(kept) + len(low) == 50  # 55 in, 5 dropped before scoring


def test_datacomp_recipe_keeps_top_30_percent_of_pool(ray_session, sample_pool, tmp_path, tiny):
    result = run_job(_recipe("datacomp", sample_pool, tmp_path / "out", tiny))
    assert result.manifest["counts"]["kept"] == round(0.3 * 50)
    kept = _kept_scores(tmp_path / "out")
    rejected = [r["clip_score"] for r in pq.read_table(tmp_path / "out" / "rejected").to_pylist()
                if r["drop_reason"] == "clip_score"]
    assert min(kept) >= max(rejected) and all(math.isfinite(s) for s in kept)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["stages"][-1]["stage"] == "clip_score"


def test_metaclip_recipe_balances_with_shipped_metadata(ray_session, sample_pool, tmp_path, tiny):
    result = run_job(_recipe("metaclip", sample_pool, tmp_path / "out", tiny))
    counts = pq.read_table(tmp_path / "out" / "metaclip" / "entry_counts.parquet").to_pandas()
    t = int(counts["t"].iloc[0])
    assert t == 3 and counts["count"].sum() > 0
    head = counts[counts["count"] > t]
    assert not head.empty and (head["p"] < 1).all()
    meta = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert all(r["metaclip_entries"] and 0 < r["metaclip_p"] <= 1 for r in meta)
    stages = {s["stage"]: s for s in result.manifest["counts"]["stages"]}
    assert stages["metaclip"]["dropped"] > 0 and stages["metaclip"]["out"] == len(meta)
