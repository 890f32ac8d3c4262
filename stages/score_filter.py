"""Stage ``score_filter``: a cut on a score the rows already carry.

For a score computed by an earlier stage (``clip_score`` before a SemDeDup pass, as DBP's
recipe orders them) or shipped with the pool (a Parquet column brought in with
``input.keep_columns``, as DataComp's metadata carries its CLIP scores): no model runs. Rule:
a live row is dropped (reason ``score_filter``) when its ``column`` is missing or NaN, below
``min``, or above ``max``; with ``top_fraction`` f, of the N rows still live exactly round(f·N)
are kept — the highest values, ties to the smaller ``uid`` — by the exact two-pass cut of
:mod:`pairsift.stages.topcut` (the same code as ``clip_score``'s ``top_fraction``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import model_validator

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped
from pairsift.stages.base import GlobalStage, StageConfig, decision
from pairsift.stages.topcut import TopFractionCut, rank_scores


class ScoreFilterConfig(StageConfig):
    #: The numeric column to cut on (e.g. clip_score, or a shipped score).
    column: str = "clip_score"
    min: float | None = decision(None)
    max: float | None = decision(None)
    #: Keep exactly this fraction of the live pool, the highest values (a global cut).
    top_fraction: float | None = decision(None, gt=0, le=1)

    @model_validator(mode="after")
    def _something_to_cut(self):
        if self.min is None and self.max is None and self.top_fraction is None:
            raise ValueError("give min, max or top_fraction (else the stage cuts nothing)")
        return self


class ScoreFilterStage(TopFractionCut, GlobalStage[ScoreFilterConfig]):
    name = "score_filter"
    scores = ()
    cut_reason = "score_filter"

    @property
    def cut_column(self) -> str:
        return self.config.column

    @property
    def cut_fraction(self) -> float:
        return self.config.top_fraction

    @classmethod
    def is_global(cls, config: ScoreFilterConfig) -> bool:
        return config.top_fraction is not None

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False

    def summary(self) -> dict:
        c = self.config
        return {"column": c.column, "min": c.min, "max": c.max, "top_fraction": c.top_fraction}

    def decide(self, batch: pa.Table) -> pa.Table:
        """``min`` / ``max`` (a missing or NaN value fails them)."""
        c = self.config
        if c.column not in batch.column_names:
            raise ConfigError(f"score_filter.column: no column {c.column!r} (an earlier stage or "
                              f"input.keep_columns must bring it)")
        if (c.min is None and c.max is None) or not batch.num_rows:
            return batch
        s = rank_scores(batch.column(c.column))
        bad = np.isinf(s) & (s < 0)  # missing or NaN
        if c.min is not None:
            bad |= s < np.float32(c.min)
        if c.max is not None:
            bad |= s > np.float32(c.max)
        live = live_mask(batch)
        return mark_dropped(batch, [self.name if ok and b else None for ok, b in zip(live, bad)], self.name)
