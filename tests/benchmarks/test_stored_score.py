"""bench_scale's test-only stage: clip_score's exact top-fraction cut on a stored score keeps
exactly round(f * N) live rows, the highest scores, ties to the smaller uid, in any sharding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stored_score import StoredScoreCutConfig, StoredScoreCutStage  # noqa: E402

from pairsift.pipeline.runner import run_global_stage  # noqa: E402
from pairsift.stages.base import StageContext  # noqa: E402


def _shards(n: int, per: int, seed: int = 0) -> tuple[list[list[pa.Table]], dict[str, float]]:
    rng = np.random.default_rng(seed)
    uids = [f"{u:032x}" for u in rng.permutation(n)]
    scores = np.round(rng.normal(0.3, 0.05, n), 2).astype(np.float32)  # many ties
    dropped = rng.random(n) < 0.1
    shards = []
    for s in range(0, n, per):
        sl = slice(s, s + per)
        t = pa.table({"uid": uids[sl], "score": scores[sl],
                      "drop_reason": ["x" if d else None for d in dropped[sl]],
                      "drop_stage": ["quality" if d else None for d in dropped[sl]]})
        shards.append([t.slice(0, per // 2), t.slice(per // 2)])
    live = {u: float(v) for u, v, d in zip(uids, scores, dropped) if not d}
    return shards, live


def test_stored_score_cut_keeps_the_exact_top_fraction(tmp_path):
    shards, live = _shards(5000, 700)
    stage = StoredScoreCutStage(StoredScoreCutConfig(column="score", top_fraction=0.3),
                                StageContext(output=str(tmp_path)))
    shards = [[stage.process(b) for b in batches] for batches in shards]
    _, out, facts = run_global_stage(stage, shards, str(tmp_path))
    kept = set(out.filter(pa.compute.is_null(out.column("drop_reason"))).column("uid").to_pylist())
    expected = set(sorted(live, key=lambda u: (-live[u], u))[: round(0.3 * len(live))])
    assert kept == expected
    assert facts["kept"] == len(expected) and facts["pool"] == len(live)
    reasons = set(out.column("drop_reason").to_pylist()) - {None}
    assert reasons == {"x", "clip_score"}  # clip_score's own reason ...
    cut = out.filter(pa.compute.equal(out.column("drop_reason"), "clip_score"))
    assert set(cut.column("drop_stage").to_pylist()) == {"stored_score_cut"}  # ... under this stage's name
