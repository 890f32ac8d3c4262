"""A test-only global stage for ``bench_scale.py``: clip_score's exact top-fraction cut on a
score the pool already carries (a Parquet column brought in with ``input.keep_columns``).

pairsift has no stage that cuts on a stored score (``clip_score`` always computes its scores
with a model), so the scale benchmark names this one by import path
(``stored_score:StoredScoreCutStage``, with this folder on ``PYTHONPATH``). It is
:class:`pairsift.stages.clip_score.ClipScoreStage` with ``top_fraction`` and its map part
replaced: ``process`` copies ``column`` into ``clip_score`` (float32) instead of running a
model, and everything after — the ``histogram`` and ``cut`` passes, the driver's merge of a
2^20-bin histogram and the cut-off bin, ``apply`` — is clip_score's own code. Rule (as
clip_score's): exactly round(f·N) of the N live pairs are kept, the highest scores, ties to
the smaller uid; the rest are dropped with clip_score's reason, ``clip_score``, and
``drop_stage: stored_score_cut``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pairsift.pipeline.table import set_column
from pairsift.stages.base import Resources, StageConfig
from pairsift.stages.clip_score import ClipScoreStage


class StoredScoreCutConfig(StageConfig):
    #: The column holding the score (any numeric type; cast to float32 as clip_score's).
    column: str = "score"
    top_fraction: float = Field(..., gt=0, le=1)


class StoredScoreCutStage(ClipScoreStage):
    name = "stored_score_cut"
    Config = StoredScoreCutConfig
    scores = ("clip_score",)

    @classmethod
    def is_global(cls, config) -> bool:
        return True

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False

    def preflight(self) -> None:
        """No model to check."""

    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    def batch_rows(self) -> int | None:
        return None

    def summary(self) -> dict:
        return {"column": self.config.column, "top_fraction": self.config.top_fraction}

    def process(self, batch: pa.Table) -> pa.Table:
        scores = pc.cast(batch.column(self.config.column), pa.float32())
        return set_column(batch, "clip_score", scores, pa.float32())
