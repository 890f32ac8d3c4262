"""Stage ``concept_prune``: density-based pruning, budgets from the complexity of concept clusters.

DBP, "Effective pruning of web-scale datasets based on complexity of concept clusters" (Abbas
et al., ICLR 2024; reference code github.com/amro-kamal/effective_pruning). Rule: the usable
embeddings of the live pool (``embedding``, any float list column) are L2-normalised and
clustered by spherical k-means (faiss, fixed seed) trained on a deterministic sample of at most
``kmeans_sample`` of them; every sample is assigned to its most similar centroid. Per cluster j:
d_intra = mean cosine distance of its members to the centroid, d_inter = mean cosine distance of
the centroid to its ``neighbours`` nearest centroids, complexity C_j = d_intra·d_inter and share
P_j = softmax(C/temperature) over the non-empty clusters. With N = ⌊keep_fraction × pool⌋ (the
reference's ``int(prune_ratio * total)``, taken on the decimal value so that 0.29 of 100 is 29),
the budgets N_j solve the reference's quadratic program: minimise ‖x − N·P‖² subject to
Σx = N and lo_j <= x_j <= size_j, whose solution is the additive shift x_j = clip(N·P_j + μ,
lo_j, size_j) with μ chosen so that they sum to N (``allocation: shift``, the default; pairsift's
earlier rule, x_j = clip(λ·P_j, lo_j, size_j), which hands a capped cluster's surplus out in
proportion to P instead of equally, is ``allocation: scale``). The floor is the reference's
lo_j = min(⌊N/k · min_cluster_share⌋, size_j − 1) over all k centroids, or 1 when
``min_cluster_share`` is 0 (``floor: reference``; ``floor: nonempty`` is pairsift's earlier
lo_j = min(size_j, ⌊min_cluster_share × N / non-empty clusters⌋)). The real solution is rounded
to integers by largest remainder so that the budgets sum to N exactly (the reference rounds
each x_j to the nearest integer, so its total can miss N by a few). Each cluster keeps its N_j
hardest members — the farthest from the centroid (the reference's ``which_to_keep: hard``),
ties to the smaller ``uid`` — and the rest are dropped with reason ``concept_prune``. Empty
clusters take no part (the reference gives them the mean complexity and a [-1, 0] box). Rows
with no usable embedding are left alone. Writes ``cluster_id`` and ``centroid_distance``
(cosine distance to the centroid) and ``OUT/concept_prune/clusters.parquet`` (one row per
cluster: size, d_intra, d_inter, complexity, share, target N·P_j, floor, budget N_j, kept,
threshold distance).

Four looks at the pool (scan/merge; see :mod:`pairsift.stages.clustering` for the first two):
``count`` counts, ``kmeans`` gathers the k-means sample and trains the centroids, ``histogram`` assigns every
sample and sums per cluster its size, its distances (in fixed point, so the sum does not depend
on the order) and a histogram of its distances over 64 bins cut at the sample's per-cluster
quantiles; the merge sets the budgets and finds in which bin each cluster's cut falls. ``cut``
collects the (distance, uid) pairs of the members in that bin only — at most min(r, m - r)
per cluster and shard, for m members in the bin of which r are kept — and the merge finds the
exact cut pair. ``apply`` reassigns each row (bit-identical, see ``clustering.assign``) and
keeps it when it is at least as hard as its cluster's cut. The selection is exact; the driver
holds the sample, the centroids, a clusters x 64 histogram per shard and the cut bins' pairs
(about pool / 128 pairs at most), never the pool's embeddings.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pairsift.pipeline import storage
from pairsift.pipeline.table import mark_dropped, set_column
from pairsift.stages.base import StageConfig, decision
from pairsift.stages.clustering import ClusteringStage, assign, centroid_neighbour_distance, normalise, read_embeddings

#: Histogram bins per cluster in the ``histogram`` pass.
BINS = 64
#: Distances are summed as integers of 2^-32: exact and independent of the order of shards.
_FIXED = float(2**32)


class ConceptPruneConfig(StageConfig):
    embedding: str = "image_emb"
    clusters: int = Field(500, ge=1)
    keep_fraction: float = decision(0.5, gt=0, le=1)
    neighbours: int = decision(20, ge=1)
    temperature: float = decision(0.1, gt=0)
    #: The reference's ``cls_bal_ratio``: each cluster keeps at least this share of an equal share.
    min_cluster_share: float = decision(0.5, ge=0, le=1)
    #: ``shift``: the reference's QP solution clip(N·P_j + μ); ``scale``: clip(λ·P_j).
    allocation: Literal["shift", "scale"] = decision("shift")
    #: ``reference``: ⌊N/k·share⌋ capped at size − 1; ``nonempty``: ⌊share·N/non-empty⌋ capped at size.
    floor: Literal["reference", "nonempty"] = decision("reference")
    kmeans_sample: int = Field(100_000, ge=1)
    kmeans_iterations: int = Field(20, ge=1)


def keep_total(keep_fraction: float, pool: int) -> int:
    """N = ⌊keep_fraction · pool⌋ on the decimal value of ``keep_fraction`` (exact rational
    arithmetic: the reference's ``int(0.29 * 100)`` is 28 by float rounding, this is 29)."""
    return int(math.floor(Fraction(repr(float(keep_fraction))) * pool))


def cluster_floors(sizes: np.ndarray, total: int, share: float, k: int, rule: str) -> np.ndarray:
    """Per-cluster lower bounds of the budgets (0 for an empty cluster).

    ``reference``: the DBP program's ``min(int(N / k * share), size - 1)`` with k the number of
    centroids, and a floor of 1 where ``share`` is 0; ``nonempty``: ``min(size, ⌊share · N /
    non-empty clusters⌋)``."""
    sizes = np.asarray(sizes, np.int64)
    nonempty = sizes > 0
    if rule == "reference":
        m = int((total / max(1, k)) * share) if share > 0 else 1
        lo = np.minimum(m, sizes - 1)
    else:
        m = int(math.floor(share * total / max(1, int(nonempty.sum()))))
        lo = np.minimum(m, sizes)
    return np.where(nonempty, np.maximum(lo, 0), 0).astype(np.int64)


def fill_targets(shares: np.ndarray, sizes: np.ndarray, total: int, floors: np.ndarray,
                 allocation: str = "shift") -> np.ndarray:
    """The real-valued budgets x with Σx = total and floors <= x <= sizes.

    ``shift``: x = clip(total·P + μ, floors, sizes), the minimiser of ‖x − total·P‖² under those
    constraints (the DBP reference's quadratic program, by its KKT conditions); ``scale``: x =
    clip(λ·P, floors, sizes). μ or λ is found by bisection (the clipped sum is monotone in it)."""
    shares = np.asarray(shares, np.float64)
    hi = np.asarray(sizes, np.int64)
    lo = np.minimum(np.asarray(floors, np.int64), hi)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"no budgets: floors sum to {lo.sum()}, sizes to {hi.sum()}, total is {total}")
    if allocation not in ("shift", "scale"):
        raise ValueError(f"allocation must be 'shift' or 'scale', not {allocation!r}")
    base = total * shares

    def filled(t: float) -> np.ndarray:
        return np.clip(base + t if allocation == "shift" else t * shares, lo, hi)

    if allocation == "shift":
        a, b = -float(total) - 1.0, float(hi.max(initial=0)) + 1.0
    else:
        a, b = 0.0, 1.0
        while filled(b).sum() < total and b < 1e300:
            b *= 2.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if filled(mid).sum() < total:
            a = mid
        else:
            b = mid
    return filled(b)


def round_budgets(target: np.ndarray, sizes: np.ndarray, total: int, floors: np.ndarray) -> np.ndarray:
    """Integers b within [floors, sizes] summing to ``total``: the targets floored, then the
    missing units to the largest fractional parts (ties to the lower index)."""
    hi = np.asarray(sizes, np.int64)
    lo = np.minimum(np.asarray(floors, np.int64), hi)
    out = np.minimum(np.maximum(np.floor(target).astype(np.int64), lo), hi)
    frac = target - np.floor(target)
    order = np.lexsort((np.arange(len(out)), -frac))  # largest fraction first, then index
    while out.sum() < total:
        room = order[out[order] < hi[order]]
        for j in room[: total - out.sum()]:
            out[j] += 1
    while out.sum() > total:
        spare = order[::-1][out[order[::-1]] > lo[order[::-1]]]
        for j in spare[: out.sum() - total]:
            out[j] -= 1
    return out


def water_fill(shares: np.ndarray, sizes: np.ndarray, total: int, floors: np.ndarray,
               allocation: str = "shift") -> np.ndarray:
    """Integer budgets b with sum(b) == total and floors <= b <= sizes: :func:`fill_targets`
    rounded by :func:`round_budgets`. Requires sum(floors) <= total <= sum(sizes)."""
    return round_budgets(fill_targets(shares, sizes, total, floors, allocation), sizes, total, floors)


def harder(d: np.ndarray, uids: np.ndarray, td: np.ndarray, tu: np.ndarray) -> np.ndarray:
    """Whether (distance, uid) comes strictly before the threshold pair in hardness order
    (farther from the centroid first, then the smaller uid)."""
    return (d > td) | ((d == td) & (uids < tu))


class ConceptPruneStage(ClusteringStage[ConceptPruneConfig]):
    name = "concept_prune"
    artifacts = ("concept_prune",)

    @classmethod
    def report_section(cls, output: str, manifest: dict) -> str | None:
        """Budget and size per cluster, ordered by complexity (``concept_prune/clusters.parquet``)."""
        import os

        import pyarrow.parquet as pq

        from pairsift.pipeline.report import svg_bars

        path = os.path.join(output, "concept_prune", "clusters.parquet")
        if not os.path.isfile(path):
            return None
        t = pq.read_table(path).to_pandas()
        order = t.sort_values("complexity") if "complexity" in t else t
        return ('<section id="clusters"><h2>Cluster budgets</h2>'
                + svg_bars([str(i) for i in order.index], order["budget"].tolist(), "budget per cluster (by complexity)")
                + svg_bars([str(i) for i in order.index], order["size"].tolist(), "size per cluster") + "</section>")

    OWN_PASSES = ("histogram", "cut")

    # ------------------------------------------------------------------ pass 1 -> 2

    def after_kmeans(self, state: dict, sample_unit: np.ndarray) -> dict:
        """Bin edges for the histogram pass: per cluster, the sample's distance quantiles."""
        k = state["centroids"].shape[0]
        edges = np.zeros((k, BINS - 1), np.float32)
        if k:
            cl, dist = assign(sample_unit, state["centroids"])
            qs = np.arange(1, BINS) / BINS
            overall = np.quantile(dist, qs).astype(np.float32)
            for j in range(k):
                dj = dist[cl == j]
                edges[j] = np.quantile(dj, qs).astype(np.float32) if dj.size else overall
        state["edges"] = edges
        return state

    # ------------------------------------------------------------------ scans

    def scan_clustered(self, batch, pass_name, state, rows, x, x_unit, cluster, dist):
        k = state["centroids"].shape[0]
        if pass_name == "histogram":
            bins = (state["edges"][cluster] <= dist[:, None]).sum(axis=1) if rows.size else np.zeros(0, np.int64)
            fixed = np.rint(dist.astype(np.float64) * _FIXED).astype(np.int64)
            sums = np.zeros(k, np.int64)
            np.add.at(sums, cluster, fixed)
            flat, counts = np.unique(cluster.astype(np.int64) * BINS + bins, return_counts=True)
            return {"pass": 2, "sums": sums, "flat": flat, "counts": counts.astype(np.int64)}
        # cut: the (distance, uid) pairs in each cluster's cut bin
        bins = (state["edges"][cluster] <= dist[:, None]).sum(axis=1) if rows.size else np.zeros(0, np.int64)
        sel = np.flatnonzero(bins == state["cut_bin"][cluster])
        uids = np.asarray(batch.column("uid").take(pa.array(rows[sel])).to_pylist(), dtype=str) if sel.size \
            else np.zeros(0, "U1")
        # the state's cut ranks ride along so that ``combine`` can trim the shard's lists
        return {"pass": 3, "cluster": cluster[sel], "dist": dist[sel], "uid": uids, "take": state["take"],
                "top": state["top"]}

    def combine_clustered(self, pass_name: str, parts: list[dict]) -> Any:
        if pass_name == "histogram":
            sums = np.sum([p["sums"] for p in parts], axis=0)
            flat = np.concatenate([p["flat"] for p in parts])
            counts = np.concatenate([p["counts"] for p in parts])
            uniq, inv = np.unique(flat, return_inverse=True)
            return {"pass": 2, "sums": sums, "flat": uniq, "counts": np.bincount(inv, weights=counts).astype(np.int64)}
        cluster = np.concatenate([p["cluster"] for p in parts])
        dist = np.concatenate([p["dist"] for p in parts])
        uid = np.concatenate([p["uid"].astype(str) for p in parts])
        idx = self._first_in_order(cluster, dist, uid, parts[0]["top"], parts[0]["take"])
        return {"pass": 3, "cluster": cluster[idx], "dist": dist[idx], "uid": uid[idx]}

    @staticmethod
    def _first_in_order(cluster, dist, uid, top, take) -> np.ndarray:
        """Indices of each cluster's first ``take[c]`` pairs: hardest first where ``top[c]``,
        easiest first otherwise. Sorted by cluster, then that order."""
        if cluster.size == 0:
            return np.zeros(0, np.int64)
        t = top[cluster]
        # hardest first: distance descending, uid ascending; easiest first: the reverse.
        uid_rank = np.unique(uid, return_inverse=True)[1]
        key_d = np.where(t, -dist.astype(np.float64), dist.astype(np.float64))
        key_u = np.where(t, uid_rank, -uid_rank)
        order = np.lexsort((key_u, key_d, cluster))
        c_sorted = cluster[order]
        starts = np.searchsorted(c_sorted, c_sorted, side="left")
        pos = np.arange(order.size) - starts
        return order[pos < take[c_sorted]]

    # ------------------------------------------------------------------ merges

    def merge_clustered(self, pass_name: str, parts: list, state: Any) -> Any:
        c = self.config
        k = state["centroids"].shape[0]
        if pass_name == "histogram":
            hist = np.zeros(k * BINS, np.int64)
            sums = [0] * k  # Python ints: exact whatever the pool size
            for p in parts:
                hist[p["flat"]] += p["counts"]  # a partial's bins are unique
                for j in np.flatnonzero(p["sums"]):
                    sums[j] += int(p["sums"][j])
            hist = hist.reshape(k, BINS)
            sizes = hist.sum(axis=1)
            pool = int(sizes.sum())
            d_intra = np.array([s / _FIXED / n if n else 0.0 for s, n in zip(sums, sizes)], np.float64)
            d_inter = centroid_neighbour_distance(state["centroids"], c.neighbours)
            complexity = d_intra * d_inter
            nonempty = sizes > 0
            shares = np.zeros(k, np.float64)
            if nonempty.any():
                z = complexity[nonempty] / c.temperature
                e = np.exp(z - z.max())
                shares[nonempty] = e / e.sum()
            total = keep_total(c.keep_fraction, pool)
            floors = cluster_floors(sizes, total, c.min_cluster_share, k, c.floor)
            budgets = water_fill(shares, sizes, total, floors, c.allocation) if k else np.zeros(0, np.int64)
            # the bin each cut falls in: above[j] members in higher bins, then r[j] from this one
            above_cum = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # members in bins >= b
            cut_bin = np.full(k, -1, np.int64)
            take = np.zeros(k, np.int64)
            top = np.ones(k, bool)
            for j in range(k):
                if budgets[j] == 0 or budgets[j] == sizes[j]:
                    continue
                b = int(np.flatnonzero(above_cum[j] >= budgets[j]).max())
                above = int(above_cum[j, b + 1]) if b + 1 < BINS else 0
                r, m = int(budgets[j]) - above, int(hist[j, b])
                cut_bin[j] = b
                top[j] = r <= m - r or r == m  # collect the smaller side of the bin
                take[j] = r if top[j] else m - r
            return {**state, "sizes": sizes, "pool": pool, "d_intra": d_intra, "d_inter": d_inter,
                    "complexity": complexity, "shares": shares, "total": total, "budgets": budgets,
                    "floors": floors,
                    "cut_bin": cut_bin, "take": take, "top": top}
        # cut: exact cut pairs
        parts = list(parts)
        cluster = np.concatenate([p["cluster"] for p in parts]) if parts else np.zeros(0, np.int32)
        dist = np.concatenate([p["dist"] for p in parts]) if parts else np.zeros(0, np.float32)
        uid = np.concatenate([p["uid"].astype(str) for p in parts]) if parts else np.zeros(0, "U1")
        idx = self._first_in_order(cluster, dist, uid, state["top"], state["take"])
        # threshold: keep a row when harder than (td, tu), or equal to it when `inclusive`
        td = np.full(k, np.inf, np.float32)  # budget 0: nothing is hard enough
        tu = np.array([""] * k, dtype=object)
        inclusive = np.zeros(k, bool)
        full = (state["budgets"] == state["sizes"]) & (state["sizes"] > 0)
        td[full], inclusive[full] = -np.inf, True
        got = np.bincount(cluster[idx], minlength=k) if idx.size else np.zeros(k, np.int64)
        cut = np.flatnonzero(state["cut_bin"] >= 0)
        if (got[cut] != state["take"][cut]).any():
            raise RuntimeError("concept_prune: a cluster's cut bin held other members in the cut pass than in the histogram pass")
        # idx is sorted by cluster, then in collection order: each cluster's last pair is its cut
        cl_sorted = cluster[idx]
        last = idx[np.flatnonzero(np.r_[cl_sorted[1:] != cl_sorted[:-1], True])] if idx.size else idx
        for i in last:
            j = int(cluster[i])
            td[j], tu[j] = dist[i], uid[i]
            inclusive[j] = bool(state["top"][j])  # top: the last kept; bottom: the last dropped
        return {"centroids": state["centroids"], "threshold_distance": td, "threshold_uid": tu,
                "inclusive": inclusive, "clusters": self._cluster_table(state, td),
                "pool": state["pool"], "total": state["total"], "sample_size": state["sample_size"]}

    @staticmethod
    def _cluster_table(state: dict, td: np.ndarray) -> pa.Table:
        k = state["centroids"].shape[0]
        return pa.table({
            "cluster_id": pa.array(np.arange(k, dtype=np.int32)),
            "size": pa.array(state["sizes"], pa.int64()),
            "d_intra": pa.array(state["d_intra"], pa.float64()),
            "d_inter": pa.array(state["d_inter"], pa.float64()),
            "complexity": pa.array(state["complexity"], pa.float64()),
            "share": pa.array(state["shares"], pa.float64()),
            "target": pa.array(state["shares"] * state["total"], pa.float64()),
            "floor": pa.array(state["floors"], pa.int64()),
            "budget": pa.array(state["budgets"], pa.int64()),
            "kept": pa.array(state["budgets"], pa.int64()),
            "threshold_distance": pa.array(np.where(np.isfinite(td), td, np.nan), pa.float32()),
        })

    # ------------------------------------------------------------------ apply

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        n = batch.num_rows
        cluster_id = np.zeros(n, np.int32)
        distance = np.zeros(n, np.float32)
        has = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
        rows, x = read_embeddings(batch, self.config.embedding) if n else (np.zeros(0, np.int64), None)
        if rows.size and state["centroids"].shape[0]:
            cl, dist = assign(normalise(x), state["centroids"])
            uids = np.asarray(batch.column("uid").take(pa.array(rows)).to_pylist(), dtype=object)
            td, tu = state["threshold_distance"][cl], state["threshold_uid"][cl]
            keep = harder(dist, uids, td, tu) | (state["inclusive"][cl] & (dist == td) & (uids == tu))
            cluster_id[rows], distance[rows], has[rows] = cl, dist, True
            for r in rows[~keep]:
                reasons[r] = self.name
        batch = set_column(batch, "cluster_id", pa.array(cluster_id, mask=~has), pa.int32())
        batch = set_column(batch, "centroid_distance", pa.array(distance, mask=~has), pa.float32())
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict, output: str) -> dict:
        table: pa.Table = state["clusters"]
        with storage.atomic_open(storage.join(output, "concept_prune", "clusters.parquet")) as f:
            pq.write_table(table, f, compression="zstd")
        c = self.config
        return {"pool": int(state["pool"]), "kept": int(state["total"]), "clusters": table.num_rows,
                "kmeans_sample": int(state["sample_size"]), "allocation": c.allocation, "floor": c.floor}
