"""Stage score_filter: a cut on a stored score, with clip_score's exact top-fraction code."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_job
from global_driver import base_rows, split
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.runner import run_global_stage, run_job
from pairsift.stages.score_filter import ScoreFilterConfig, ScoreFilterStage


def _table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(0.3, 0.05, n), 2).astype(np.float32)  # many ties
    scores[:3] = np.nan
    uids = [f"{int(x):032x}" for x in rng.integers(0, 2**62, n)]
    return base_rows(uids, {"score": pa.array(scores, pa.float32())}, dropped={uids[5]}), uids, scores


def _kept(out: pa.Table) -> set[str]:
    return {u for u, r in zip(out.column("uid").to_pylist(), out.column("drop_reason").to_pylist()) if r is None}


def test_min_and_max_drop_missing_nan_and_out_of_range():
    table, uids, scores = _table()
    stage = ScoreFilterStage(ScoreFilterConfig(column="score", min=0.25, max=0.35))
    out = stage.process(table)
    expected = {u for i, u in enumerate(uids) if i != 5 and not np.isnan(scores[i]) and 0.25 <= scores[i] <= 0.35}
    assert _kept(out) == expected
    assert set(out.column("drop_reason").to_pylist()) == {None, "score_filter", "earlier"}


def test_top_fraction_is_the_sorted_pools_top_whatever_the_sharding():
    table, uids, scores = _table(301, seed=1)
    pool = [i for i in range(301) if i != 5]
    order = sorted(pool, key=lambda i: (-(scores[i] if not np.isnan(scores[i]) else -np.inf), uids[i]))
    expected = {uids[i] for i in order[:round(0.3 * len(pool))]}
    for sizes in ([301], [1, 100, 0, 200], [150, 151]):
        stage = ScoreFilterStage(ScoreFilterConfig(column="score", top_fraction=0.3))
        _, out, facts = run_global_stage(stage, split(table, sizes, 64))
        assert _kept(out) == expected and facts["kept"] == len(expected)


def test_config_and_missing_column_errors():
    with pytest.raises(ValueError, match="min, max or top_fraction"):
        ScoreFilterConfig(column="score")
    table, _, _ = _table()
    with pytest.raises(ConfigError, match="no column 'nope'"):
        ScoreFilterStage(ScoreFilterConfig(column="nope", min=0.0)).process(table)


def test_cuts_a_shipped_score_column_in_a_job(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    import io

    from PIL import Image

    def jpeg(i):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    n = 40
    scores = rng.random(n).astype(np.float32)
    pq.write_table(pa.table({"image": [jpeg(i) for i in range(n)], "caption": [f"pair {i}" for i in range(n)],
                             "clip_l14": pa.array(scores)}), tmp_path / "pool.parquet")
    out = tmp_path / "out"
    result = run_job(make_job(tmp_path / "pool.parquet", out, fmt="parquet", input={"keep_columns": ["clip_l14"]},
                              stages=[{"score_filter": {"column": "clip_l14", "top_fraction": 0.25}}]))
    kept = pq.read_table(out / "metadata").column("clip_l14").to_numpy()
    assert result.manifest["counts"]["kept"] == 10
    assert sorted(kept) == sorted(np.sort(scores)[-10:])
