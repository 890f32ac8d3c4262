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

Three looks at the pool, and no process ever holds it (see :mod:`pairsift.stages.clustering`
for the first two): ``count`` counts, ``kmeans`` gathers the k-means sample and trains the
centroids, ``spill`` assigns every sample and each shard writes its members' (cluster,
distance, uid, shard, embedding) into ``partitions`` spill folders by range of cluster ids
(``OUT/_work/semdedup-<stage index>/spill/``); the driver only adds up cluster sizes. Then one
reduce task per spill partition — in parallel, on any node — reads only its partition, a range
of clusters at a time (at most :data:`GATHER_ROWS` members, or one cluster when it is bigger),
compares each cluster's members in tiles of ``PAIR_BLOCK`` x ``PAIR_BLOCK`` similarities (so a
300k-member cluster never needs a 300k² matrix) and writes its decisions sorted by source
shard; ``apply`` reads only its own shard's decisions (Parquet statistics prune the rest).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pairsift.pipeline import storage
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import StageConfig, decision, runtime
from pairsift.stages.exact_dedup import _spill_files
from pairsift.stages.clustering import ClusteringStage, max_similarity_to_earlier, normalise

#: Most cluster members the merge holds at once (a larger cluster is read alone).
GATHER_ROWS = 1 << 17


class SemDedupConfig(StageConfig):
    embedding: str = "image_emb"
    clusters: int = Field(1000, ge=1)
    eps: float = decision(0.07, gt=0, lt=1)
    kmeans_sample: int = Field(100_000, ge=1)
    kmeans_iterations: int = Field(20, ge=1)
    #: Spill partitions (contiguous ranges of cluster ids): one parallel reduce task each.
    partitions: int = runtime(64, ge=1)


def _range_of(clusters: np.ndarray, k: int, parts: int) -> np.ndarray:
    """The spill partition of each cluster id: ``parts`` contiguous ranges of cluster ids."""
    return (clusters.astype(np.int64) * parts) // max(k, 1)


class SemDedupStage(ClusteringStage[SemDedupConfig]):
    name = "semdedup"
    artifacts = ("semdedup",)
    OWN_PASSES = ("spill",)

    def _parts(self, k: int) -> int:
        return max(1, min(k, self.config.partitions))

    def _spill_dir(self, r: int) -> str:
        return storage.join(self.work_dir, "spill", f"{r:05d}")

    def _decisions(self, r: int) -> str:
        return storage.join(self.work_dir, "decisions", f"{r:05d}.parquet")

    # ------------------------------------------------------------------ spill: by cluster range

    def scan_clustered(self, batch, pass_name, state, rows, x, x_unit, cluster, dist):
        uids = np.asarray(batch.column("uid").take(pa.array(rows)).to_pylist(), dtype=str) if rows.size \
            else np.zeros(0, "U1")
        return {"k": state["centroids"].shape[0], "uid": uids, "cluster": cluster, "dist": dist, "emb": x}

    def combine_clustered(self, pass_name: str, parts: list[dict]) -> dict:
        """Write this shard's members into the spill partitions of their cluster ranges, each
        file sorted by cluster (named by the shard: a retry writes the same file)."""
        k = parts[0]["k"]
        parts = [p for p in parts if p["uid"].size]
        if not parts:
            return {"counts": np.zeros(k, np.int64)}
        uid = np.concatenate([p["uid"].astype(str) for p in parts])
        cluster = np.concatenate([p["cluster"] for p in parts])
        dist = np.concatenate([p["dist"] for p in parts])
        emb = np.concatenate([p["emb"] for p in parts])
        if emb.dtype != np.float16:
            emb = emb.astype(np.float32)
        order = np.argsort(cluster, kind="stable")
        uid, cluster, dist, emb = uid[order], cluster[order], dist[order], emb[order]
        ranges = _range_of(cluster, k, self._parts(k))
        for r in np.unique(ranges):
            sel = np.flatnonzero(ranges == r)
            table = pa.table({
                "cluster": pa.array(cluster[sel], pa.int32()),
                "distance": pa.array(dist[sel], pa.float32()),
                "uid": pa.array(uid[sel].tolist(), pa.string()),
                "shard": pa.array([self.shard.name] * sel.size, pa.string()),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb[sel].reshape(-1)), emb.shape[1]),
            })
            with storage.atomic_open(storage.join(self._spill_dir(int(r)), f"{self.shard.name}.parquet")) as f:
                pq.write_table(table, f, row_group_size=8192)
        return {"counts": np.bincount(cluster, minlength=k).astype(np.int64),
                "ranges": np.unique(ranges).astype(np.int32), "shard": self.shard.name}

    def merge_clustered(self, pass_name: str, parts: list, state: Any) -> dict:
        """Only the cluster sizes: the pairwise work runs in the reduce tasks."""
        k = state["centroids"].shape[0]
        counts = np.zeros(k, np.int64)
        spilled: dict[int, int] = {}  # spill partition -> how many shards wrote to it (their files are listed)
        for p in parts:
            counts += p["counts"]
            for r in p.get("ranges", ()):
                spilled[int(r)] = spilled.get(int(r), 0) + 1
        state = {"counts": counts, "pool": int(counts.sum()), "sample_size": state["sample_size"],
                 "centroids": state["centroids"], "spilled": spilled}
        if not self.reduce_tasks(pass_name, state):  # nothing spilled: nothing to compare
            return self._decided(state, [])
        return state

    # ------------------------------------------------------------------ reduce: pairwise per cluster

    def reduce_tasks(self, pass_name: str, state: dict) -> list[list[int]]:
        """The spill partitions (each reduce reads its folder's files), grouped into
        about 4 tasks per CPU of the job with equal pairwise work (sum of cluster sizes squared):
        a small pool is one task, a large one keeps every worker busy. The grouping changes
        no decision."""
        if pass_name != "spill":
            return []
        spilled = sorted(state.get("spilled", {}).items())
        if not spilled:
            return []
        counts = state["counts"].astype(np.float64)
        k = counts.size
        part = _range_of(np.arange(k), k, self._parts(k))
        cost = np.bincount(part, weights=counts * counts, minlength=self._parts(k))
        cpus = int(self.context.cluster.get("CPU", 1) or 1)
        target = max(float(cost.sum()) / max(1, 4 * cpus), 1.0)
        tasks, current, held = [], [], 0.0
        for r, _ in spilled:
            current.append(r)
            held += cost[r]
            if held >= target:
                tasks.append(current)
                current, held = [], 0.0
        return tasks + ([current] if current else [])

    def reduce(self, pass_name: str, task: list[int], state: dict) -> list[dict]:
        return [self._decide(r, state) for r in task]

    def _decide(self, task: int, state: dict) -> dict:
        """Decide every cluster of one spill partition, a range of clusters at a time (at most
        :data:`GATHER_ROWS` members, or one bigger cluster), and write the partition's
        decisions sorted by shard. Returns the duplicates per cluster."""
        fs, _ = storage.fs_path(self._spill_dir(task))
        files = _spill_files(self._spill_dir(task))
        counts = state["counts"]
        k = counts.size
        ids = np.flatnonzero(_range_of(np.arange(k), k, self._parts(k)) == task)
        limit = np.float32(1.0 - self.config.eps)
        out_uid, out_of, out_sim, out_cluster, out_shard = [], [], [], [], []
        i = 0
        while i < ids.size:
            j, held = i, 0
            while j < ids.size and (j == i or held + counts[ids[j]] <= GATHER_ROWS):
                held += counts[ids[j]]
                j += 1
            a, b = int(ids[i]), int(ids[j - 1]) + 1
            if held > 1:
                members = self._read_clusters(fs, files, a, b)
                c = members.column("cluster").to_numpy()
                starts = np.searchsorted(c, np.arange(a, b + 1))
                for cl in range(a, b):
                    lo, hi = starts[cl - a], starts[cl - a + 1]
                    if hi - lo < 2:
                        continue
                    part = members.slice(lo, hi - lo)
                    emb = part.column("emb").combine_chunks()
                    x = emb.flatten().to_numpy(zero_copy_only=False).reshape(hi - lo, emb.type.list_size)
                    best, arg = max_similarity_to_earlier(normalise(x))
                    dup = np.flatnonzero(best > limit)  # float32 on both sides, as in the reference
                    if dup.size:
                        uid = np.asarray(part.column("uid").to_pylist(), dtype=object)
                        shard = np.asarray(part.column("shard").to_pylist(), dtype=object)
                        out_uid.extend(uid[dup])
                        out_of.extend(uid[arg[dup]])
                        out_shard.extend(shard[dup])
                        out_sim.append(best[dup])
                        out_cluster.append(np.full(dup.size, cl, np.int32))
            i = j
        decisions = pa.table({
            "shard": pa.array(out_shard, pa.string()),
            "uid": pa.array(out_uid, pa.string()),
            "near_dup_of": pa.array(out_of, pa.string()),
            "near_dup_similarity": pa.array(np.concatenate(out_sim) if out_sim else np.zeros(0, np.float32), pa.float32()),
            "cluster": pa.array(np.concatenate(out_cluster) if out_cluster else np.zeros(0, np.int32), pa.int32()),
        }).sort_by([("shard", "ascending"), ("uid", "ascending")])
        with storage.atomic_open(self._decisions(task)) as f:
            pq.write_table(decisions, f, row_group_size=1024)  # apply reads its shard's rows: small groups prune well
        dups = np.bincount(decisions.column("cluster").to_numpy(), minlength=k) if decisions.num_rows \
            else np.zeros(k, np.int64)
        nz = np.flatnonzero(dups)
        return {"partition": task, "clusters": nz.astype(np.int32), "duplicates": dups[nz].astype(np.int64)}

    def reduced(self, pass_name: str, state: dict, results: list[dict]) -> dict:
        return self._decided(state, results)

    def _decided(self, state: dict, results: list) -> dict:
        results = [r for group in results for r in (group if isinstance(group, list) else [group])]
        k = state["counts"].size
        dups = np.zeros(k, np.int64)
        for r in results:
            dups[r["clusters"]] += r["duplicates"]
        clusters = pa.table({"cluster_id": pa.array(np.arange(k, dtype=np.int32)),
                             "size": pa.array(state["counts"], pa.int64()), "duplicates": pa.array(dups, pa.int64())})
        parts = sorted(r["partition"] for r in results)
        return {"token": uuid.uuid4().hex, "clusters": clusters, "pool": state["pool"], "duplicates": int(dups.sum()),
                "sample_size": state["sample_size"], "partitions": parts, "centroids": state["centroids"]}

    @staticmethod
    def _read_clusters(fs, files: list[str], a: int, b: int) -> pa.Table:
        """Members of clusters [a, b) from the partition's spill files, each cluster in the
        paper's order: farthest from the centroid first, then by uid."""
        parts = []
        for p in files:
            t = pq.read_table(p, filesystem=fs, filters=[("cluster", ">=", a), ("cluster", "<", b)])
            if t.num_rows:
                parts.append(t)
        members = pa.concat_tables(parts)
        return members.sort_by([("cluster", "ascending"), ("distance", "descending"), ("uid", "ascending")])

    # ------------------------------------------------------------------ apply

    def _shard_decisions(self, state: dict) -> dict[str, tuple[str, float]]:
        key = (state["token"], self.shard.name)
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        import pyarrow.dataset as ds

        out: dict[str, tuple[str, float]] = {}
        paths = [self._decisions(r) for r in state["partitions"]]
        if paths:
            fs, _ = storage.fs_path(paths[0])
            dataset = ds.dataset([storage.fs_path(p)[1] for p in paths], format="parquet", filesystem=fs)
            t = dataset.to_table(filter=ds.field("shard") == self.shard.name,
                                 columns=["uid", "near_dup_of", "near_dup_similarity"])
            out = {u: (o, s) for u, o, s in zip(t.column("uid").to_pylist(), t.column("near_dup_of").to_pylist(),
                                                 t.column("near_dup_similarity").to_pylist())}
        self._cached = (key, out)
        return out

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        n = batch.num_rows
        reasons: list[str | None] = [None] * n
        dup_of: list[str | None] = [None] * n
        sim = np.zeros(n, np.float32)
        hit = np.zeros(n, bool)
        if n:
            decided = self._shard_decisions(state)
            live = live_mask(batch)
            for r, u in enumerate(batch.column("uid").to_pylist()):
                d = decided.get(u) if live[r] else None
                if d is not None:
                    reasons[r], dup_of[r], sim[r], hit[r] = self.name, d[0], d[1], True
        batch = set_column(batch, "near_dup_of", dup_of, pa.string())
        batch = set_column(batch, "near_dup_similarity", pa.array(sim, mask=~hit), pa.float32())
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict, output: str) -> dict:
        with storage.atomic_open(storage.join(output, "semdedup", "clusters.parquet")) as f:
            pq.write_table(state["clusters"], f, compression="zstd")
        return {"pool": state["pool"], "duplicates": state["duplicates"], "clusters": state["clusters"].num_rows,
                "eps": self.config.eps, "kmeans_sample": int(state["sample_size"])}
