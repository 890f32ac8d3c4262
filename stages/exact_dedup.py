"""Stage ``exact_dedup``: identical image bytes are one sample.

Exact-duplicate removal as in LAION-5B and DataComp's pool construction (Gadre et al. 2023,
which dedups on exact hashes before any model-based filter). Rule: the SHA-256 of each live
row's image bytes is computed; of every group of rows with the same hash the row with the
smallest ``uid`` is the representative and is kept, every other member is dropped with
reason ``exact_dedup`` and ``dup_of`` set to the representative's uid. Because the choice
depends only on uids, the result is the same for any sharding and worker count.

A global stage: ``scan`` maps hash -> (smallest uid, count) per shard, ``merge`` keeps the
hashes seen more than once, ``apply`` drops the non-representatives.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from pairsift.pipeline.table import mark_dropped, set_column
from pairsift.stages.base import GlobalStage, StageConfig


class ExactDedupConfig(StageConfig):
    pass


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


class ExactDedupStage(GlobalStage):
    name = "exact_dedup"
    Config = ExactDedupConfig

    def scan(self, batch: pa.Table) -> dict[bytes, tuple[str, int]]:
        seen: dict[bytes, tuple[str, int]] = {}
        for uid, data in zip(batch.column("uid").to_pylist(), batch.column("image").to_pylist()):
            if data is None:
                continue
            h = _digest(data)
            prev = seen.get(h)
            seen[h] = (uid, 1) if prev is None else (min(prev[0], uid), prev[1] + 1)
        return seen

    def combine(self, partials: list[dict]) -> dict[bytes, tuple[str, int]]:
        out: dict[bytes, tuple[str, int]] = {}
        for part in partials:
            for h, (uid, n) in part.items():
                prev = out.get(h)
                out[h] = (uid, n) if prev is None else (min(prev[0], uid), prev[1] + n)
        return out

    def merge(self, partials: list[dict]) -> dict[bytes, str]:
        total = self.combine(partials)
        return {h: uid for h, (uid, n) in total.items() if n > 1}

    def apply(self, batch: pa.Table, state: dict[bytes, str]) -> pa.Table:
        reasons: list[str | None] = []
        dup_of: list[str | None] = []
        for uid, data in zip(batch.column("uid").to_pylist(), batch.column("image").to_pylist()):
            rep = state.get(_digest(data)) if data is not None else None
            if rep is not None and rep != uid:
                reasons.append("exact_dedup")
                dup_of.append(rep)
            else:
                reasons.append(None)
                dup_of.append(None)
        batch = set_column(batch, "dup_of", dup_of, pa.string())
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict[bytes, str], output: str) -> dict[str, Any]:
        return {"duplicate_groups": len(state)}
