"""Stage ``semdedup``: semantic deduplication within embedding clusters.

SemDeDup, "SemDeDup: Data-efficient learning at web-scale through semantic deduplication"
(Abbas et al. 2023; reference code github.com/facebookresearch/SemDeDup). Rule: the usable
embeddings of the live pool (``embedding``, any float list column) are L2-normalised and
clustered by spherical k-means (faiss, fixed seed) trained on a deterministic sample of at most
``kmeans_sample`` of them, and every sample is assigned to its most similar centroid. Within
each cluster the members are ordered by cosine distance to the centroid, farthest first, and a
member is a duplicate — dropped with reason ``semdedup`` — when its cosine similarity to any
member before it in that order exceeds 1 - ``eps``. So of every group of near-duplicates the
member least similar to the centroid is kept. This is the reference's default: its
``clustering/sort_clusters.py`` sorts each cluster by 1 - (similarity to the centroid) in
descending order with ``keep_hard: True`` (Python's stable sort, so ties stay in dataset
order; here ties go to the smaller ``uid``, the pool's only order that does not depend on
sharding); its ``semdedup.py`` takes M_j = max_{i<j} sim(i, j) over the upper triangle of the
cluster's similarity matrix and removes j where M_j > 1 - eps — compared in float32, as torch
compares a float32 tensor with a Python float, which this stage does too — so an earlier
member counts even when it is itself a duplicate. Rows with no usable embedding
are left alone. Writes ``near_dup_of`` (the earlier member it is most similar to) and
``near_dup_similarity`` on the dropped rows, and ``OUT/semdedup/clusters.parquet`` (size and
duplicates per cluster).

Three looks at the pool (see :mod:`pairsift.stages.clustering` for the first two): pass 0
counts, pass 1 gathers the k-means sample and trains the centroids, pass 2 assigns every sample
and each shard writes its members' (cluster, distance, uid, embedding) sorted by cluster to
``OUT/_work/semdedup-<stage index>/``. The merge reads those back a range of clusters at a
time (at most :data:`GATHER_ROWS` members, or one cluster when it is bigger) and compares
each cluster's members in tiles of ``PAIR_BLOCK`` x ``PAIR_BLOCK`` similarities: the driver's
memory is bounded by the largest cluster's embeddings, never by the pool, and a 300k-member
cluster never needs a 300k² matrix. The decisions (dropped uids) are cached beside the spill
files, which ``finalize`` deletes; ``apply`` only looks uids up.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pairsift.pipeline import storage
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import StageConfig
from pairsift.stages.clustering import ClusteringStage, max_similarity_to_earlier, normalise

#: Most cluster members the merge holds at once (a larger cluster is read alone).
GATHER_ROWS = 1 << 17


class SemDedupConfig(StageConfig):
    embedding: str = "image_emb"
    clusters: int = Field(1000, ge=1)
    eps: float = Field(0.07, gt=0, lt=1)
    kmeans_sample: int = Field(100_000, ge=1)
    kmeans_iterations: int = Field(20, ge=1)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p)
        h.update(b"\x00")
    return h.hexdigest()


def _uid_bytes(uids) -> np.ndarray:
    return np.array([u.encode("utf-8", "surrogateescape") for u in uids], dtype=object)


class SemDedupStage(ClusteringStage):
    name = "semdedup"
    artifacts = ("semdedup",)
    Config = SemDedupConfig

    @classmethod
    def passes(cls, config) -> int:
        return 3

    @property
    def work_dir(self) -> str:
        return storage.join(self.context.output, "_work", f"semdedup-{self.context.index}")

    # ------------------------------------------------------------------ pass 2: spill by cluster

    def scan_clustered(self, batch, pass_index, state, rows, x, x_unit, cluster, dist):
        uids = np.asarray(batch.column("uid").take(pa.array(rows)).to_pylist(), dtype=str) if rows.size \
            else np.zeros(0, "U1")
        return {"pass": 2, "k": state["centroids"].shape[0], "uid": uids, "cluster": cluster, "dist": dist, "emb": x}

    def combine_clustered(self, pass_index: int, parts: list[dict]) -> dict:
        k = parts[0]["k"]
        parts = [p for p in parts if p["uid"].size]
        if not parts:
            return {"pass": 2, "path": None, "counts": np.zeros(k, np.int64)}
        uid = np.concatenate([p["uid"].astype(str) for p in parts])
        cluster = np.concatenate([p["cluster"] for p in parts])
        dist = np.concatenate([p["dist"] for p in parts])
        emb = np.concatenate([p["emb"] for p in parts])
        if emb.dtype != np.float16:
            emb = emb.astype(np.float32)
        order = np.argsort(cluster, kind="stable")
        table = pa.table({
            "cluster": pa.array(cluster[order], pa.int32()),
            "distance": pa.array(dist[order], pa.float32()),
            "uid": pa.array(uid[order].tolist(), pa.string()),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb[order].reshape(-1)), emb.shape[1]),
        })
        # named by the shard's first uid: the same shard (a retry) writes the same file
        path = storage.join(self.work_dir, f"spill-{_digest(uid[0].encode())}.parquet")
        with storage.atomic_open(path) as f:
            pq.write_table(table, f, row_group_size=8192)
        return {"pass": 2, "path": path, "counts": np.bincount(cluster, minlength=k).astype(np.int64)}

    # ------------------------------------------------------------------ merge: pairwise per cluster

    def merge_clustered(self, pass_index: int, parts: list, state: Any) -> dict:
        k = state["centroids"].shape[0]
        counts = np.zeros(k, np.int64)
        spills = sorted(p["path"] for p in parts if p["path"] is not None)
        for p in parts:
            counts += p["counts"]
        key = _digest(str(self.config.eps).encode(), counts.tobytes(), *(s.encode() for s in spills))
        cache = storage.join(self.work_dir, f"decisions-{key}.parquet")
        if storage.exists(cache):  # a rerun after finalize removed the spill files
            fs, p = storage.fs_path(cache)
            decisions = pq.read_table(p, filesystem=fs)
        else:
            decisions = self._decide(spills, counts)
            with storage.atomic_open(cache) as f:
                pq.write_table(decisions, f)
        uids = _uid_bytes(decisions.column("uid").to_pylist())
        order = np.argsort(uids, kind="stable")
        dups = np.bincount(decisions.column("cluster").to_numpy(), minlength=k) if decisions.num_rows \
            else np.zeros(k, np.int64)
        return {
            "uids": uids[order],
            "dup_of": np.asarray(decisions.column("near_dup_of").to_pylist(), dtype=object)[order],
            "similarity": decisions.column("near_dup_similarity").to_numpy()[order],
            "clusters": pa.table({"cluster_id": pa.array(np.arange(k, dtype=np.int32)),
                                  "size": pa.array(counts, pa.int64()), "duplicates": pa.array(dups, pa.int64())}),
            "pool": int(counts.sum()), "sample_size": state["sample_size"], "spills": spills,
            "centroids": state["centroids"],
        }

    def _decide(self, spills: list[str], counts: np.ndarray) -> pa.Table:
        """Read the spill files a range of clusters at a time and decide each cluster."""
        out_uid, out_of, out_sim, out_cluster = [], [], [], []
        limit = np.float32(1.0 - self.config.eps)
        a = 0
        k = counts.size
        while a < k:
            b, held = a, 0
            while b < k and (b == a or held + counts[b] <= GATHER_ROWS):
                held += counts[b]
                b += 1
            if held > 1:
                members = self._read_clusters(spills, a, b)
                c = members.column("cluster").to_numpy()
                starts = np.searchsorted(c, np.arange(a, b + 1))
                for j in range(a, b):
                    lo, hi = starts[j - a], starts[j - a + 1]
                    if hi - lo < 2:
                        continue
                    part = members.slice(lo, hi - lo)
                    emb = part.column("emb").combine_chunks()
                    x = emb.flatten().to_numpy(zero_copy_only=False).reshape(hi - lo, emb.type.list_size)
                    best, arg = max_similarity_to_earlier(normalise(x))
                    dup = np.flatnonzero(best > limit)  # float32 on both sides, as in the reference
                    if dup.size:
                        uid = np.asarray(part.column("uid").to_pylist(), dtype=object)
                        out_uid.extend(uid[dup])
                        out_of.extend(uid[arg[dup]])
                        out_sim.append(best[dup])
                        out_cluster.append(np.full(dup.size, j, np.int32))
            a = b
        return pa.table({
            "uid": pa.array(out_uid, pa.string()),
            "near_dup_of": pa.array(out_of, pa.string()),
            "near_dup_similarity": pa.array(np.concatenate(out_sim) if out_sim else np.zeros(0, np.float32), pa.float32()),
            "cluster": pa.array(np.concatenate(out_cluster) if out_cluster else np.zeros(0, np.int32), pa.int32()),
        })

    @staticmethod
    def _read_clusters(spills: list[str], a: int, b: int) -> pa.Table:
        """Members of clusters [a, b) from every spill file, each cluster in the paper's order:
        farthest from the centroid first, then by uid."""
        parts = []
        for path in spills:
            fs, p = storage.fs_path(path)
            if not fs.exists(p):
                raise RuntimeError(f"semdedup: the pass-2 spill file {path} is gone and no decisions are cached "
                                   f"for it; rerun the job with --restart")
            t = pq.read_table(p, filesystem=fs, filters=[("cluster", ">=", a), ("cluster", "<", b)])
            if t.num_rows:
                parts.append(t)
        members = pa.concat_tables(parts)
        return members.sort_by([("cluster", "ascending"), ("distance", "descending"), ("uid", "ascending")])

    # ------------------------------------------------------------------ apply

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        n = batch.num_rows
        reasons: list[str | None] = [None] * n
        dup_of: list[str | None] = [None] * n
        sim = np.zeros(n, np.float32)
        hit = np.zeros(n, bool)
        live = np.flatnonzero(live_mask(batch)) if n else np.zeros(0, np.int64)
        if live.size and state["uids"].size:
            uids = _uid_bytes(batch.column("uid").take(pa.array(live)).to_pylist())
            pos = np.searchsorted(state["uids"], uids)
            pos_ok = np.minimum(pos, state["uids"].size - 1)
            found = (pos < state["uids"].size) & (state["uids"][pos_ok] == uids)
            for r, q in zip(live[found], pos_ok[found]):
                reasons[r] = self.name
                dup_of[r] = state["dup_of"][q]
                sim[r] = state["similarity"][q]
                hit[r] = True
        batch = set_column(batch, "near_dup_of", dup_of, pa.string())
        batch = set_column(batch, "near_dup_similarity", pa.array(sim, mask=~hit), pa.float32())
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict, output: str) -> dict:
        with storage.atomic_open(storage.join(output, "semdedup", "clusters.parquet")) as f:
            pq.write_table(state["clusters"], f, compression="zstd")
        for path in state["spills"]:  # the decisions are cached; the embeddings are not needed again
            fs, p = storage.fs_path(path)
            if fs.exists(p):
                fs.rm(p)
        return {"pool": state["pool"], "duplicates": int(state["uids"].size), "clusters": state["clusters"].num_rows,
                "eps": self.config.eps, "kmeans_sample": int(state["sample_size"])}
