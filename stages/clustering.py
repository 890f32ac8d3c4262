"""Spherical k-means over an embedding column, shared by ``semdedup`` and ``concept_prune``.

Both stages follow SemDeDup (Abbas et al. 2023) and DBP (Abbas et al., ICLR 2024): embeddings
are L2-normalised, clustered with faiss spherical k-means, and every sample is assigned to the
centroid it is most cosine-similar to. What is shared lives here: reading a float embedding
column (float16/32/64, ``list``, ``large_list`` or ``fixed_size_list``) into a numpy matrix,
the deterministic k-means sample (a row is in it when its hash(seed, stage, uid) is among the
``kmeans_sample`` smallest of the pool), k-means with a fixed seed, the assignment, and the
blocked pairwise similarity.

:class:`ClusteringStage` runs the first two looks at the pool for a subclass: pass 0 counts
the rows with a usable embedding (it runs with the phase before, so it costs no extra read),
pass 1 collects the rows whose hash falls under a threshold chosen from that count (about
``kmeans_sample`` of them; the merge keeps exactly the ``kmeans_sample`` smallest hashes) and
trains the centroids on the driver. Later passes are the subclass's.

Assignment is bit-for-bit reproducible: BLAS picks different kernels (and so different
rounding) for matrices of a few rows, and even within one product the last bit of a row's
float32 result depends on its position in the block. So rows are multiplied in zero-padded
blocks of :data:`ASSIGN_BLOCK` in float64 and the distances rounded to float32: a row's cluster
and distance are the same whichever batch, shard, position or worker computes them, and two
identical embeddings get identical distances (so their tie goes to the smaller uid, as the
stages promise). That is what lets a later pass and ``apply`` recompute them instead of
carrying per-row state.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairsift.pipeline.errors import ConfigError
from pairsift.stages.base import ConfigT, GlobalStage

#: Rows per matrix product in :func:`assign` (every product has this shape).
ASSIGN_BLOCK = 256
#: Rows and columns per block in :func:`max_similarity_to_earlier`.
PAIR_BLOCK = 2048
_U64 = 2**64


# --------------------------------------------------------------------------- reading


def check_embedding_column(schema: pa.Schema, column: str, stage: str) -> None:
    """ConfigError unless ``column`` is a list of floats in ``schema``."""
    if column not in schema.names:
        raise ConfigError(
            f"{stage}.embedding: the rows have no column {column!r} (columns: {', '.join(schema.names)}); "
            f"run a stage that writes it first (clip_score writes image_emb), or carry it from "
            f"Parquet input with input.keep_columns"
        )
    t = schema.field(column).type
    if not ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_floating(t.value_type)):
        raise ConfigError(f"{stage}.embedding: column {column!r} is {t}, not a list of floats")


def read_embeddings(batch: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, embeddings) of the live rows with a usable embedding.

    Embeddings come back in their own float type (float16 stays float16), one row each.
    A row is skipped when it was dropped already, its embedding is null, has a non-finite
    value or is all zeros (it has no direction). Rows of different lengths raise ValueError.
    """
    n = batch.num_rows
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    arr = batch.column(column)
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    mask = pc.and_(pc.is_null(batch.column("drop_reason")), pc.is_valid(arr)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        return rows, np.zeros((0, 0), np.float32)
    sel = arr if rows.size == n else arr.filter(pa.array(mask))
    if pa.types.is_fixed_size_list(sel.type):
        dim = sel.type.list_size
    else:
        lengths = pc.list_value_length(sel).to_numpy(zero_copy_only=False)
        dim = int(lengths[0])
        if (lengths != dim).any():
            raise ValueError(f"column {column!r} holds embeddings of different lengths "
                             f"({sorted(set(lengths.tolist()))[:5]})")
    values = sel.flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(rows.size, dim)
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    # finite and not all zeros, on the bits (numpy's float16 arithmetic is slow)
    bits, exp, mag = (x.view(np.uint16), 0x7C00, 0x7FFF) if x.dtype == np.float16 else \
        (x.view(np.uint32), 0x7F800000, 0x7FFFFFFF)
    ok = ((bits & exp) != exp).all(axis=1) & ((bits & mag) != 0).any(axis=1)
    if not ok.all():
        rows, x = rows[ok], x[ok]
    return rows, x


def normalise(x: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Rows scaled to unit L2 norm (norms taken in float64), as contiguous float32; in chunks
    of rows, so a large sample needs no float64 copy of itself."""
    out = np.empty(x.shape, np.float32)
    for a in range(0, x.shape[0], chunk):
        x64 = np.asarray(x[a : a + chunk], dtype=np.float64)
        norms = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))
        out[a : a + chunk] = x64 / np.where(norms > 0, norms, 1.0)
    return out


def sample_keys(seed: int, stage: str, uids: list[str]) -> np.ndarray:
    """hash(seed, stage, uid) as uint64: the order the k-means sample is drawn in."""
    salt = hashlib.blake2b(f"{seed}\x00{stage}".encode(), digest_size=16).digest()
    out = np.empty(len(uids), np.uint64)
    for i, u in enumerate(uids):
        out[i] = int.from_bytes(hashlib.blake2b(u.encode("utf-8", "surrogateescape"), digest_size=8,
                                                key=salt).digest(), "big")
    return out


def sample_threshold(count: int, sample_size: int) -> int:
    """Largest hash a row may have to be a k-means candidate: all rows when the pool is no
    larger than the sample, else a rate with ~4 standard deviations of margin over
    ``sample_size`` (the merge then keeps exactly the ``sample_size`` smallest)."""
    if count <= sample_size:
        return _U64 - 1
    rate = min(1.0, (sample_size + 4.0 * math.sqrt(sample_size) + 16.0) / count)
    return min(_U64 - 1, int(rate * _U64))


def smallest_keys(keys: np.ndarray, uids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest (key, uid) pairs, in that order."""
    order = np.lexsort((uids, keys))
    return order[:k]


# --------------------------------------------------------------------------- k-means


def kmeans_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{stage}\x00kmeans".encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def train_kmeans(x_unit: np.ndarray, clusters: int, iterations: int, seed: int) -> np.ndarray:
    """faiss spherical k-means on unit rows; (k, d) unit float32 centroids, k = min(clusters, n).

    The whole sample is used (faiss's own subsampling is off: the sample is ours); faiss's
    initialisation draws from ``seed``, so the same sample gives the same centroids."""
    import faiss

    n, d = x_unit.shape
    k = min(clusters, n)
    if k == n:  # as many centroids as points: every point is its own centroid
        return normalise(x_unit)
    km = faiss.Kmeans(d, k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(1, -(-n // k)), min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x_unit, dtype=np.float32))
    return normalise(km.centroids)


def assign(x_unit: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid as int32, cosine distance 1 - x.c as float32) per row.

    Products are taken in float64, in zero-padded blocks of :data:`ASSIGN_BLOCK` rows, and the
    distance rounded to float32, so that every row gets the same bits whatever else is in its
    batch and wherever it sits in it (float32 BLAS rounds the same row differently at different
    positions); ties go to the lower centroid index."""
    n = x_unit.shape[0]
    cluster = np.zeros(n, np.int32)
    dist = np.zeros(n, np.float32)
    if n == 0 or centroids.shape[0] == 0:
        return cluster, dist
    ct = np.ascontiguousarray(centroids.T, dtype=np.float64)
    buf = np.zeros((ASSIGN_BLOCK, x_unit.shape[1]), np.float64)
    for a in range(0, n, ASSIGN_BLOCK):
        m = min(ASSIGN_BLOCK, n - a)
        buf[:m] = x_unit[a : a + m]
        buf[m:] = 0.0
        sims = buf @ ct
        best = sims.argmax(axis=1)[:m]
        cluster[a : a + m] = best
        dist[a : a + m] = (1.0 - sims[np.arange(m), best]).astype(np.float32)
    return cluster, dist


def centroid_neighbour_distance(centroids: np.ndarray, neighbours: int) -> np.ndarray:
    """Mean cosine distance of each centroid to its ``neighbours`` nearest other centroids
    (all the others when there are fewer; 1.0 for a lone centroid)."""
    k = centroids.shape[0]
    if k <= 1:
        return np.ones(k, np.float64)
    c = centroids.astype(np.float64)
    dist = 1.0 - c @ c.T
    np.fill_diagonal(dist, np.inf)
    m = min(neighbours, k - 1)
    nearest = np.partition(dist, m - 1, axis=1)[:, :m]
    return nearest.mean(axis=1)


# --------------------------------------------------------------------------- pairwise


def max_similarity_to_earlier(x_unit: np.ndarray, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row i: the largest cosine similarity to a row before it, and that row's index
    (-inf and -1 for row 0; the earliest row of equal maxima). Computed in ``block`` x ``block``
    tiles (default :data:`PAIR_BLOCK`) of the upper triangle, so memory is O(block²) whatever
    the number of rows."""
    block = block or PAIR_BLOCK
    n = x_unit.shape[0]
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        rows = x_unit[r0:r1]
        for c0 in range(0, r1, block):
            c1 = min(r1, c0 + block)
            sims = x_unit[c0:c1] @ rows.T  # (earlier candidates, rows)
            if c1 > r0:  # the diagonal tile: only columns strictly before the row count
                j = np.arange(c0, c1)[:, None]
                i = np.arange(r0, r1)[None, :]
                sims = np.where(j < i, sims, -np.inf)
            top = sims.argmax(axis=0)
            val = sims[top, np.arange(r1 - r0)]
            better = val > best[r0:r1]  # strict: the earliest of equal maxima wins
            best[r0:r1] = np.where(better, val, best[r0:r1])
            arg[r0:r1] = np.where(better, c0 + top, arg[r0:r1])
    return best, arg


# --------------------------------------------------------------------------- the stage


class ClusteringStage(GlobalStage[ConfigT]):
    """A global stage that clusters ``config.embedding``: pass ``count`` counts, pass ``kmeans``
    samples and trains the centroids; subclasses name their own passes after those
    (:attr:`OWN_PASSES`) and implement them (``scan_clustered``, ``combine_clustered``,
    ``merge_clustered``, which see every usable row with its cluster and distance)."""

    #: The subclass's passes, after ``count`` and ``kmeans``.
    OWN_PASSES: tuple[str, ...] = ()

    @classmethod
    def passes(cls, config) -> tuple[str, ...]:
        return ("count", "kmeans") + cls.OWN_PASSES

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # it reads an embedding column only

    def scan_columns(self, pass_name: str) -> tuple[str, ...]:
        return ("uid", self.config.embedding)

    # -- the map part: a clear error when the column is not there

    def process(self, batch: pa.Table) -> pa.Table:
        check_embedding_column(batch.schema, self.config.embedding, self.name)
        return batch

    # -- scans

    def scan(self, batch: pa.Table, pass_name: str, state: Any) -> Any:
        rows, x = read_embeddings(batch, self.config.embedding)
        if pass_name == "count":
            return {"pass": 0, "count": int(rows.size), "dim": int(x.shape[1]) if rows.size else None}
        if pass_name == "kmeans":
            if rows.size == 0:
                return {"pass": 1, "keys": np.zeros(0, np.uint64), "uids": np.zeros(0, "U1"), "emb": x}
            uids = np.asarray(batch.column("uid").take(pa.array(rows)).to_pylist())
            keys = sample_keys(self.context.seed, self.name, uids.tolist())
            keep = keys <= np.uint64(state["threshold"])
            return {"pass": 1, "keys": keys[keep], "uids": uids[keep], "emb": x[keep]}
        if state["centroids"].shape[0] == 0:  # nothing was clustered (no usable embedding)
            rows, x = rows[:0], x[:0]
        x_unit = normalise(x) if rows.size else np.zeros((0, state["dim"] or 0), np.float32)
        cluster, dist = assign(x_unit, state["centroids"])
        return self.scan_clustered(batch, pass_name, state, rows, x, x_unit, cluster, dist)

    def combine(self, partials: list, pass_name: str) -> Any:
        parts = [p for p in partials if p]
        if not parts:
            return {}
        if pass_name == "count":
            dims = {q["dim"] for q in parts if q["dim"] is not None}
            return {"pass": 0, "count": sum(q["count"] for q in parts), "dims": dims}
        if pass_name == "kmeans":
            return self._sample_union(parts, self.config.kmeans_sample)
        return self.combine_clustered(pass_name, parts)

    def merge(self, partials, pass_name: str, state: Any) -> Any:
        if pass_name not in ("count", "kmeans"):  # streamed: the subclass folds them as it reads
            return self.merge_clustered(pass_name, (p for p in partials if p), state)
        parts = [p for p in partials if p]
        if pass_name == "count":
            dims = set().union(*(q["dims"] for q in parts)) if parts else set()
            if len(dims) > 1:
                raise ValueError(f"{self.name}: column {self.config.embedding!r} holds embeddings of "
                                 f"different lengths across shards: {sorted(dims)}")
            count = sum(q["count"] for q in parts)
            return {"count": count, "dim": dims.pop() if dims else None,
                    "threshold": sample_threshold(count, self.config.kmeans_sample)}
        if pass_name == "kmeans":
            sample = self._sample_union(parts, self.config.kmeans_sample) if parts else None
            out = {"count": state["count"], "dim": state["dim"]}
            if sample is None or sample["keys"].size == 0:
                out.update(centroids=np.zeros((0, state["dim"] or 0), np.float32), sample_size=0)
                return self.after_kmeans(out, np.zeros((0, state["dim"] or 0), np.float32))
            x_unit = normalise(sample["emb"])
            centroids = train_kmeans(x_unit, self.config.clusters, self.config.kmeans_iterations,
                                     kmeans_seed(self.context.seed, self.name))
            out.update(centroids=centroids, sample_size=int(x_unit.shape[0]))
            return self.after_kmeans(out, x_unit)
        raise AssertionError(pass_name)

    @staticmethod
    def _sample_union(parts: list[dict], k: int) -> dict:
        keys = np.concatenate([q["keys"] for q in parts])
        uids = np.concatenate([q["uids"].astype(str) for q in parts])
        embs = [q["emb"] for q in parts if q["emb"].size]
        if not embs:
            return {"pass": 1, "keys": keys[:0], "uids": uids[:0], "emb": np.zeros((0, 0), np.float32)}
        emb = np.concatenate(embs)
        idx = smallest_keys(keys, uids, k)
        return {"pass": 1, "keys": keys[idx], "uids": uids[idx], "emb": emb[idx]}

    # -- hooks

    def after_kmeans(self, state: dict, sample_unit: np.ndarray) -> dict:
        """Add what the subclass's first own pass needs (the sample is the unit k-means sample)."""
        return state

    def scan_clustered(self, batch, pass_name, state, rows, x, x_unit, cluster, dist):  # pragma: no cover
        raise NotImplementedError

    def combine_clustered(self, pass_name: str, parts: list[dict]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def merge_clustered(self, pass_name: str, parts, state: Any) -> Any:  # pragma: no cover
        """``parts``: the shards' partials, an iterator read once."""
        raise NotImplementedError
