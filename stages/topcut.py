"""The exact top-fraction cut of a score column, for global stages (``clip_score``'s
``top_fraction``, ``score_filter``'s).

Rule: of the N live rows of the whole pool, exactly round(f·N) are kept — the highest scores,
ties broken by the smaller ``uid``; a missing or NaN score ranks last — and the rest are dropped
with the stage's reason. The same decisions as sorting the pool, with no pool-sized state
anywhere (the histogram-then-narrow-pass of ``concept_prune``): pass ``histogram`` counts the
live scores in 2^20 bins of their order-preserving 32-bit keys and finds the bin holding the
cut-off; pass ``cut`` gathers only that bin's (score, uid) pairs and picks the exact cut-off pair;
``apply`` keeps what is at or above it.

A stage mixes in :class:`TopFractionCut` before its global base and says which column
(``cut_column``), which fraction (``cut_fraction``) and which drop reason (``cut_reason``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pairsift.pipeline.table import live_mask, mark_dropped

#: Histogram bins: the top 20 bits of each score's order-preserving 32-bit key (sign, exponent
#: and 11 mantissa bits), so bins follow the float order exactly.
SCORE_BINS = 1 << 20


def rank_scores(scores: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Scores as float32 for ranking: missing or NaN scores rank last; -0.0 is 0.0."""
    s = np.asarray(scores.to_numpy(zero_copy_only=False), dtype=np.float32) + np.float32(0.0)
    return np.where(np.isnan(s), np.float32(-np.inf), s)


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin of each float32 score; a higher score never has a lower bin."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    key = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))  # IEEE order as unsigned order
    return (key >> np.uint32(12)).astype(np.uint32)


class TopFractionCut:
    """The passes, merges and apply of an exact top-fraction cut (see the module docstring)."""

    cut_column: str = "score"
    cut_reason: str = "score"

    @property
    def cut_fraction(self) -> float:  # pragma: no cover - the stage says
        raise NotImplementedError

    @classmethod
    def passes(cls, config) -> tuple[str, ...]:
        return ("histogram", "cut")

    def scan_columns(self, pass_name: str) -> tuple[str, ...]:
        return ("uid", self.cut_column)

    def scan(self, batch: pa.Table, pass_name: str, state: Any) -> Any:
        """``histogram``: counts of the live rows' scores per bin; ``cut``: the (score, uid) of
        the live rows in the bin that holds the cut-off."""
        rows = batch.filter(pa.array(live_mask(batch)))
        scores = rank_scores(rows.column(self.cut_column))
        bins = score_bins(scores)
        if pass_name == "histogram":
            return np.unique(bins, return_counts=True)
        at = bins == state["bin"]
        return scores[at], np.asarray(rows.column("uid").to_pylist(), dtype=object)[at]

    def combine(self, partials: list, pass_name: str) -> Any:
        if pass_name == "histogram":
            if not partials:
                return np.zeros(0, np.uint32), np.zeros(0, np.int64)
            bins = np.concatenate([p[0] for p in partials])
            counts = np.concatenate([p[1] for p in partials])
            uniq, inv = np.unique(bins, return_inverse=True)
            return uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)
        if not partials:
            return np.zeros(0, np.float32), np.zeros(0, object)
        return np.concatenate([p[0] for p in partials]), np.concatenate([p[1] for p in partials])

    def merge(self, partials, pass_name: str, state: Any) -> dict[str, Any]:
        """``histogram``: the pool size N, k = round(f * N), and the bin holding the k-th best
        score (and how many of that bin's rows are kept); ``cut``: the exact cut-off pair (the
        k-th best by score descending, then uid ascending). The driver holds one histogram of
        2^20 counts and the cut-off bin's rows, never one entry per pair."""
        if pass_name == "histogram":
            hist = np.zeros(SCORE_BINS, np.int64)
            for bins, counts in partials:
                np.add.at(hist, bins.astype(np.int64), counts)
            n = int(hist.sum())
            k = round(self.cut_fraction * n)
            out: dict[str, Any] = {"pool": n, "keep": k, "score": None, "uid": None, "bin": None, "need": 0}
            if k:
                above = np.cumsum(hist[::-1])[::-1]  # rows in this bin or higher
                b = int(np.flatnonzero(above >= k)[-1])
                out.update(bin=b, need=k - int(above[b] - hist[b]))
            return out
        if state["bin"] is None:
            return state
        partials = list(partials)
        scores = np.concatenate([p[0] for p in partials]) if partials else np.zeros(0, np.float32)
        uids = np.concatenate([p[1] for p in partials]) if partials else np.zeros(0, object)
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), uids[i]))
        last = order[state["need"] - 1]
        return {**state, "score": float(scores[last]), "uid": str(uids[last])}

    def apply(self, batch: pa.Table, state: dict[str, Any]) -> pa.Table:
        live = live_mask(batch)
        reasons: list[str | None] = [None] * batch.num_rows
        if state["uid"] is None:
            keep = np.zeros(batch.num_rows, dtype=bool)
        else:
            s = rank_scores(batch.column(self.cut_column))
            t = np.float32(state["score"])
            uids = np.asarray(batch.column("uid").to_pylist(), dtype=object)
            keep = (s > t) | ((s == t) & (uids <= state["uid"]))
        for i in np.flatnonzero(live & ~keep):
            reasons[i] = self.cut_reason
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict[str, Any], output: str) -> dict:
        return {"top_fraction": self.cut_fraction, "pool": state["pool"], "kept": state["keep"],
                "cutoff_score": state["score"], "cutoff_uid": state["uid"]}
