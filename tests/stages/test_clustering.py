"""Shared k-means helpers: reading embedding columns, bit-identical assignment, blocked
pairwise similarity, and the deterministic k-means sample."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from global_driver import base_rows, embedding_array, split
from pairsift.pipeline.errors import ConfigError
from pairsift.stages import clustering
from pairsift.stages.base import StageContext
from pairsift.stages.clustering import (assign, max_similarity_to_earlier, normalise, read_embeddings,
                                        sample_keys)
from pairsift.stages.concept_prune import ConceptPruneConfig, ConceptPruneStage


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return normalise(x)


@pytest.mark.parametrize("kind", ["list16", "list32", "fixed16", "large64"])
def test_read_embeddings_any_float_list_skipping_dropped_null_and_degenerate_rows(kind):
    x = np.random.default_rng(1).standard_normal((6, 4))
    x[3] = 0.0  # no direction
    x[4, 2] = np.nan
    dtype = {"list16": np.float16, "list32": np.float32, "fixed16": np.float16, "large64": np.float64}[kind]
    xs = x.astype(dtype)
    if kind == "large64":
        arr = pa.array([list(r) for r in xs], pa.large_list(pa.float64()))
    else:
        arr = embedding_array(xs, fixed=kind == "fixed16")
    arr = pa.array([None if i == 5 else v for i, v in enumerate(arr.to_pylist())], arr.type)  # a null row
    batch = base_rows(["a", "b", "c", "d", "e", "f"], {"emb": arr}, dropped={"b"})
    rows, got = read_embeddings(batch, "emb")
    assert rows.tolist() == [0, 2]  # b dropped earlier, d zero, e NaN, f null
    assert got.dtype == (np.float16 if dtype == np.float16 else np.float32)
    np.testing.assert_allclose(got.astype(np.float64), xs[[0, 2]].astype(np.float64), rtol=1e-6)
    assert read_embeddings(batch.slice(0, 0), "emb")[0].size == 0


def test_read_embeddings_refuses_rows_of_different_lengths():
    arr = pa.array([[1.0, 0.0], [1.0, 0.0, 0.0]], pa.list_(pa.float32()))
    with pytest.raises(ValueError, match="different lengths"):
        read_embeddings(base_rows(["a", "b"], {"emb": arr}), "emb")


def test_missing_or_non_float_embedding_column_is_a_config_error_naming_the_key():
    stage = ConceptPruneStage(ConceptPruneConfig(embedding="image_emb"))
    with pytest.raises(ConfigError, match=r"concept_prune\.embedding.*image_emb"):
        stage.process(base_rows([]))
    ints = base_rows(["a"], {"image_emb": pa.array([[1, 2]], pa.list_(pa.int32()))})
    with pytest.raises(ConfigError, match="not a list of floats"):
        stage.process(ints)


def test_assignment_is_bit_identical_whatever_the_batch_it_is_in():
    x = _unit(1100, 48, seed=2)
    c = _unit(37, 48, seed=3)
    full_c, full_d = assign(x, c)
    for size in (1, 2, 5, 255, 257):
        parts = [assign(x[a : a + size], c) for a in range(0, 1100, size)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), full_c)
        assert np.concatenate([p[1] for p in parts]).tobytes() == full_d.tobytes()
    # and it is the nearest centroid, with the cosine distance
    sims = x.astype(np.float64) @ c.T.astype(np.float64)
    assert (full_c == sims.argmax(axis=1)).mean() > 0.999
    np.testing.assert_allclose(full_d, 1 - sims.max(axis=1), atol=1e-5)


def test_normalise_is_row_wise_and_batch_independent():
    x = np.random.default_rng(4).standard_normal((300, 33)).astype(np.float16)
    whole = normalise(x)
    assert np.concatenate([normalise(x[i : i + 7]) for i in range(0, 300, 7)]).tobytes() == whole.tobytes()
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)


def test_blocked_max_similarity_to_earlier_matches_the_dense_upper_triangle():
    x = _unit(301, 16, seed=5)
    x[100] = x[20]  # exact duplicates: the earliest equal maximum wins
    x[200] = x[20]
    best, arg = max_similarity_to_earlier(x, block=64)
    sims = x @ x.T
    dense = np.where(np.triu(np.ones((301, 301), bool), k=1), sims, -np.inf)  # [j, i]: j before i
    assert best[0] == -np.inf and arg[0] == -1
    np.testing.assert_allclose(best[1:], dense.max(axis=0)[1:], atol=1e-6)
    assert (arg[1:] == dense.argmax(axis=0)[1:]).mean() > 0.99
    assert arg[100] == 20 and arg[200] == 20
    one_block, one_arg = max_similarity_to_earlier(x, block=1000)
    np.testing.assert_allclose(best, one_block, atol=1e-6)


def _sample_state(stage, shards):
    state = None
    for p in ("count", "kmeans"):
        partials = [stage.combine([stage.scan(b, p, state) for b in batches], p) for batches in shards]
        state = stage.merge(partials, p, state)
    return state


def test_kmeans_sample_is_the_smallest_hashes_whatever_the_sharding(tmp_path):
    rng = np.random.default_rng(6)
    n = 900
    x = rng.standard_normal((n, 24)).astype(np.float16)
    uids = [f"u{i:05d}" for i in range(n)]
    table = base_rows(uids, {"image_emb": embedding_array(x)})
    stage = ConceptPruneStage(ConceptPruneConfig(clusters=5, kmeans_sample=200), StageContext(seed=7))
    seen = []
    for sizes, batch in (([900], 256), ([1, 299, 0, 400, 200], 64)):
        shards = split(table, sizes, batch)
        state = None
        partials = [stage.combine([stage.scan(b, "count", state) for b in bs], "count") for bs in shards]
        state = stage.merge(partials, "count", state)
        assert state["count"] == n
        partials = [stage.combine([stage.scan(b, "kmeans", state) for b in bs], "kmeans") for bs in shards]
        sample = stage._sample_union([p for p in partials if p], 200)
        keys = sample_keys(7, "concept_prune", uids)
        expected = {uids[i] for i in np.argsort(keys)[:200]}
        assert set(sample["uids"].tolist()) == expected
        seen.append(stage.merge(partials, "kmeans", state)["centroids"])
    assert seen[0].shape == (5, 24)
    assert seen[0].tobytes() == seen[1].tobytes()
    other = _sample_state(ConceptPruneStage(stage.config, StageContext(seed=8)), split(table, [900], 256))
    assert other["centroids"].tobytes() != seen[0].tobytes()  # another seed, another sample


def test_sample_threshold_keeps_enough_rows():
    assert clustering.sample_threshold(10, 100) == 2**64 - 1
    t = clustering.sample_threshold(1_000_000, 1000)
    assert 1000 / 1e6 < t / 2**64 < 1300 / 1e6


def test_assign_gives_a_row_the_same_bits_wherever_it_sits():
    """float32 BLAS rounds the same row differently at different positions of one product (here
    rows at positions 60-63 of every 64 take another kernel path: with a plain float32 product 38
    of these 300 rows get a different distance at position 61 than at 0); the assignment must
    not, or identical embeddings stop tying (and a tie's rule stops holding)."""
    rng = np.random.default_rng(7)
    x = normalise(rng.standard_normal((300, 384)).astype(np.float32))
    centroids = normalise(rng.standard_normal((12, 384)).astype(np.float32))
    cl0, d0 = assign(x, centroids)
    for pos in (0, 61):
        for r in range(0, 300, 2):
            y = x[:256].copy()
            y[pos] = x[r]
            cl, dist = assign(y, centroids)
            assert (cl[pos], dist[pos].tobytes()) == (cl0[r], d0[r].tobytes()), (r, pos)
