"""Issue 15: compute once, decide many times. A rerun whose spec changes only decisions
(min_score, t, keep_fraction) calls no model and gives the bytes a from-scratch run of the new
spec gives; a changed model, input or upstream computation is recomputed; two outputs share one
cache side by side."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from clip_tiny import write_tiny_clip
from conftest import make_job
from pairsift.pipeline.runner import run_job
from pairsift.samplepool import write_pool
from pairsift.stages import clip_score as clip_score_module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture()
def calls(monkeypatch) -> list[int]:
    """How many pairs the CLIP model embedded (in this process: the local executor)."""
    seen: list[int] = []
    original = clip_score_module.ClipScoreStage._embed

    def counting(self, images, captions):
        seen.append(len(images))
        return original(self, images, captions)

    monkeypatch.setattr(clip_score_module.ClipScoreStage, "_embed", counting)
    return seen


def _stages(tiny, min_score=0.0, t=2, keep=0.6, pretrained=None):
    config, weights = tiny
    return [{"quality": {"min_side": 32}},
            {"clip_score": {"model": config, "pretrained": pretrained or weights, "min_score": min_score,
                            "batch_size": 16}},
            {"metaclip": {"t": t}},
            {"concept_prune": {"embedding": "image_emb", "clusters": 3, "keep_fraction": keep, "kmeans_sample": 500}}]


def _files(out: Path) -> dict[str, str]:
    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "metadata", "rejected") for p in sorted((out / sub).glob("*"))}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cachepool")
    write_pool(str(folder), shard_size=20)
    return folder


def test_new_decisions_reuse_every_computed_column(tiny, pool, tmp_path, calls):
    out = tmp_path / "out"
    first = run_job(make_job(pool, out, stages=_stages(tiny)), executor="local")
    assert sum(calls) > 0
    computed = first.manifest["cache"]["1:clip_score"]["computed"]
    assert computed == sum(calls) and first.manifest["cache"]["1:clip_score"]["reused"] == 0

    calls.clear()
    new = _stages(tiny, min_score=-0.05, t=1, keep=0.8)
    again = run_job(make_job(pool, out, stages=new), executor="local")  # same job name: a rerun
    assert calls == [], "the model was called on a decision-only change"
    assert again.manifest["cache"]["1:clip_score"] == {"reused": computed, "computed": 0}
    assert again.manifest["cache"]["0:quality"]["computed"] == 0

    fresh = tmp_path / "fresh"
    run_job(make_job(pool, fresh, stages=new, cache=""), executor="local")  # no cache at all
    assert _files(out) == _files(fresh)
    assert sum(calls) == computed


def test_a_loosened_upstream_threshold_computes_only_the_new_rows(tiny, pool, tmp_path, calls):
    out = tmp_path / "out"
    strict = _stages(tiny)
    strict[0] = {"quality": {"min_side": 300}}
    run_job(make_job(pool, out, stages=strict), executor="local")
    before = sum(calls)
    calls.clear()
    result = run_job(make_job(pool, out, stages=_stages(tiny)), executor="local")
    stats = result.manifest["cache"]["1:clip_score"]
    assert stats["reused"] == before and stats["computed"] == sum(calls) > 0


def test_stale_entries_are_never_used(tiny, pool, tmp_path, calls):
    config, weights = tiny
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    run_job(make_job(pool, out, stages=_stages(tiny), cache=str(cache)), executor="local")
    n = sum(calls)

    # another model (other weights): every score recomputed
    other = write_tiny_clip(tmp_path / "other", seed=1) if "seed" in write_tiny_clip.__code__.co_varnames else None
    if other is None:
        import torch

        state = torch.load(weights)
        for v in state.values():
            if v.dtype.is_floating_point:
                v.mul_(1.01)
        other_weights = tmp_path / "other.pt"
        torch.save(state, other_weights)
    else:
        other_weights = other[1]
    calls.clear()
    run_job(make_job(pool, tmp_path / "o2", stages=_stages(tiny, pretrained=str(other_weights)), cache=str(cache)),
            executor="local")
    assert sum(calls) == n

    # an upstream computation changed (quality's caption normalisation): scores recomputed
    calls.clear()
    changed = _stages(tiny)
    changed[0] = {"quality": {"min_side": 32, "collapse_whitespace": False}}
    run_job(make_job(pool, tmp_path / "o3", stages=changed, cache=str(cache)), executor="local")
    assert sum(calls) == n

    # the input changed (one shard rewritten with new times): its rows recomputed, the others reused
    calls.clear()
    victim = sorted(pool.glob("*.tar"))[0]
    data = victim.read_bytes()
    copy = tmp_path / "pool2"
    copy.mkdir()
    for p in sorted(pool.glob("*.tar")):
        (copy / p.name).write_bytes(p.read_bytes())
        os.utime(copy / p.name, (1_000_000, 1_000_000))
    run_job(make_job(copy, tmp_path / "o4", stages=_stages(tiny), cache=str(cache)), executor="local")
    first_pass = sum(calls)
    calls.clear()
    (copy / victim.name).write_bytes(data)  # same bytes, new mtime: another input as far as anyone can tell
    os.utime(copy / victim.name, (time.time(), time.time()))
    run_job(make_job(copy, tmp_path / "o5", stages=_stages(tiny), cache=str(cache)), executor="local")
    assert 0 < sum(calls) < first_pass


def test_two_outputs_from_one_cache_side_by_side(tiny, pool, tmp_path, calls):
    cache = tmp_path / "shared"
    a, b = tmp_path / "a", tmp_path / "b"
    run_job(make_job(pool, a, stages=_stages(tiny, min_score=-1.0), cache=str(cache)), executor="local")
    n = sum(calls)
    calls.clear()
    result = run_job(make_job(pool, b, stages=_stages(tiny, min_score=0.02), cache=str(cache)), executor="local")
    assert calls == []
    assert result.manifest["cache"]["1:clip_score"]["reused"] == n
    assert result.manifest["counts"]["kept"] < len(list((a / "metadata").glob("*"))) * 10**6


def test_what_if_gives_the_funnel_a_rerun_gives_without_running_a_model(tiny, pool, tmp_path, calls, capsys):
    from pairsift.cli import main as cli_main
    from pairsift.pipeline.whatif import what_if

    out = tmp_path / "out"
    run_job(make_job(pool, out, stages=_stages(tiny)), executor="local")
    calls.clear()
    # stricter upstream (every row a later stage sees was computed there), looser concept_prune
    changes = ["clip_score.min_score=0.01", "metaclip.t=1", "concept_prune.keep_fraction=0.8"]
    predicted = what_if(str(out), changes)
    assert calls == []
    rerun = run_job(make_job(pool, tmp_path / "rerun", stages=_stages(tiny, min_score=0.01, t=1, keep=0.8)),
                    executor="local")
    assert predicted["not_computed"] == 0
    assert [(r["stage"], r["dropped"]) for r in predicted["what_if"]] == \
        [(r["stage"], r["dropped"]) for r in rerun.manifest["counts"]["stages"]]
    assert predicted["what_if"][-1]["out"] == rerun.manifest["counts"]["kept"]

    assert cli_main(["stats", str(out), "--what-if", "clip_score.min_score=0.02"]) == 0
    assert "dropped (what-if)" in capsys.readouterr().out
    assert cli_main(["stats", str(out), "--what-if", "clip_score.model=ViT-L-14"]) == 2  # a computation
    assert cli_main(["stats", str(out), "--what-if", "nosuch.t=1"]) == 2


def test_what_if_counts_rows_that_were_never_computed(tiny, pool, tmp_path):
    from pairsift.pipeline.whatif import what_if

    strict = _stages(tiny)
    strict[0] = {"quality": {"min_side": 300}}
    out = tmp_path / "out"
    run_job(make_job(pool, out, stages=strict), executor="local")
    result = what_if(str(out), ["quality.min_side=32"])
    assert result["not_computed"] > 0
    assert result["what_if"][1]["dropped"] < result["actual"][1]["dropped"]  # quality drops fewer
