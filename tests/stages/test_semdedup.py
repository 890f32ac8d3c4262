"""Stage semdedup: near-duplicates within a cluster go, the member farthest from the centroid
stays, distinct samples stay; the same for any sharding and any tiling of the pairwise work."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from global_driver import base_rows, drive, embedding_array, split
from pairsift.stages import clustering, semdedup
from pairsift.stages.base import StageContext
from pairsift.stages.clustering import assign, normalise
from pairsift.stages.semdedup import SemDedupConfig, SemDedupStage


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _pool(seed=0, d=64):
    """600 distinct points, 50 near-duplicates of the first 50 (cosine ~0.995) and 30 points
    similar to the next 30 but not duplicates (cosine ~0.85)."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((600, d)))
    near = _unit(base[:50] + _unit(rng.standard_normal((50, d))) * 0.1)
    similar = _unit(base[50:80] + _unit(rng.standard_normal((30, d))) * 0.62)
    x = np.concatenate([base, near, similar]).astype(np.float16)
    uids = [f"b{i:04d}" for i in range(600)] + [f"n{i:04d}" for i in range(50)] + [f"s{i:04d}" for i in range(30)]
    return x, uids


def _stage(tmp_path, **cfg):
    cfg = {"clusters": 8, "eps": 0.07, "kmeans_sample": 2000, **cfg}
    return SemDedupStage(SemDedupConfig(**cfg), StageContext(seed=0, output=str(tmp_path)))


def _dropped(out: pa.Table) -> dict[str, str]:
    rej = out.filter(pc.equal(out.column("drop_reason"), "semdedup"))
    return dict(zip(rej.column("uid").to_pylist(), rej.column("near_dup_of").to_pylist()))


def _reference(x: np.ndarray, uids: list[str], centroids: np.ndarray, eps: float) -> dict[str, str]:
    """The paper's rule computed densely: per cluster, sort by distance to the centroid
    descending, drop j when max_{i<j} sim(i, j) > 1 - eps."""
    xu = normalise(x)
    cl, dist = assign(xu, centroids)
    out = {}
    for c in np.unique(cl):
        idx = np.flatnonzero(cl == c)
        idx = idx[np.lexsort((np.asarray(uids)[idx], -dist[idx].astype(np.float64)))]
        sims = xu[idx] @ xu[idx].T
        for j in range(1, len(idx)):
            i = int(np.argmax(sims[:j, j]))
            if sims[i, j] > 1 - eps:
                out[uids[idx[j]]] = uids[idx[i]]
    return out


def test_near_duplicates_go_distinct_samples_stay_and_the_member_farthest_from_the_centroid_is_kept(tmp_path):
    x, uids = _pool()
    table = base_rows(uids, {"image_emb": embedding_array(x)})
    state, out, facts = drive(_stage(tmp_path), split(table, [680], 256))
    dropped = _dropped(out)
    assert len(dropped) == 50 and facts["duplicates"] == 50 and facts["pool"] == 680
    pairs = {f"b{i:04d}": f"n{i:04d}" for i in range(50)}
    for b, n in pairs.items():  # exactly one of each pair, pointing at the other
        assert (b in dropped) != (n in dropped)
        assert dropped[b] == n if b in dropped else dropped[n] == b
    assert not any(u.startswith("s") or u in {f"b{i:04d}" for i in range(50, 600)} for u in dropped)
    # the kept one is the less similar to its centroid
    cl, dist = assign(normalise(x), state["centroids"])
    at = {u: i for i, u in enumerate(uids)}
    for u, of in dropped.items():
        assert cl[at[u]] == cl[at[of]]
        assert dist[at[of]] > dist[at[u]] or (dist[at[of]] == dist[at[u]] and of < u)
    sims = out.column("near_dup_similarity").to_numpy(zero_copy_only=False)
    assert np.nanmin(sims) > 0.93 and np.isnan(sims[np.asarray([u not in dropped for u in out.column("uid").to_pylist()])]).all()
    assert dropped == _reference(x, uids, state["centroids"], 0.07)


def test_an_earlier_duplicate_counts_even_when_it_is_dropped_itself(tmp_path):
    # a, b, c on one great circle away from the bulk's centre: a~b and b~c (cos 0.95), a and c
    # not (cos 0.81). Farthest first is a, b, c: a stays, b goes (like a), c goes (like b).
    rng = np.random.default_rng(1)
    d = 64
    e = np.eye(d)
    beta = np.arccos(0.95)
    a, b, c = (np.cos(k * beta) * e[0] + np.sin(k * beta) * e[1] for k in (3, 2, 1))
    bulk = _unit(e[0] + np.concatenate([np.zeros((200, 3)), rng.standard_normal((200, d - 3)) * 0.1], axis=1))
    x = np.vstack([a, b, c, bulk]).astype(np.float32)
    uids = ["a", "b", "c"] + [f"x{i:03d}" for i in range(200)]
    _, out, _ = drive(_stage(tmp_path, clusters=1), split(base_rows(uids, {"image_emb": embedding_array(x)}), [203], 64))
    assert _dropped(out) == {"b": "a", "c": "b"}


def test_deterministic_invariant_to_sharding_and_to_the_tiling(tmp_path, monkeypatch):
    x, uids = _pool(seed=2)
    order = np.random.default_rng(3).permutation(len(uids))
    table = base_rows([uids[i] for i in order], {"image_emb": embedding_array(x[order], fixed=True)},
                      dropped={uids[order[5]]})
    stage = _stage(tmp_path, kmeans_sample=300)
    results = [drive(stage, split(table, [680], 256))[1]]
    results.append(drive(stage, split(table, [1, 300, 0, 250, 129], 64))[1])
    monkeypatch.setattr(semdedup, "GATHER_ROWS", 40)  # many cluster ranges, several tiles per cluster
    monkeypatch.setattr(clustering, "PAIR_BLOCK", 16)
    results.append(drive(stage, split(table, [400, 280], 100))[1])
    first, resharded, retiled = (r.sort_by("uid") for r in results)
    assert resharded.equals(first)
    # other tiles, other float rounding in the similarity reported; the same decisions
    sim = "near_dup_similarity"
    assert retiled.drop_columns([sim]).equals(first.drop_columns([sim]))
    np.testing.assert_allclose(retiled.column(sim).to_numpy(zero_copy_only=False),
                               first.column(sim).to_numpy(zero_copy_only=False), atol=1e-6)
    assert first.column("drop_reason").to_pylist().count("earlier") == 1
    assert 40 <= first.column("drop_reason").to_pylist().count("semdedup") <= 50


def test_spill_partitions_reduce_tasks_and_per_shard_decisions(tmp_path):
    """The pairwise work runs in one reduce task per spill partition (a range of cluster ids);
    each writes its decisions sorted by shard, and apply reads its own shard's. The decisions
    do not depend on how many partitions (so tasks) there are."""
    import pyarrow.parquet as pq

    from pairsift.stages.semdedup import SemDedupConfig, SemDedupStage

    x, uids = _pool(seed=4)
    table = base_rows(uids, {"image_emb": embedding_array(x)})
    results = {}
    for parts in (1, 3, 64):
        out_dir = tmp_path / f"p{parts}"
        stage = SemDedupStage(SemDedupConfig(clusters=8, eps=0.05, kmeans_sample=500, partitions=parts),
                              StageContext(seed=0, output=str(out_dir)))
        state, out, facts = drive(stage, split(table, [300, 380], 128))
        work = out_dir / "_work" / "semdedup-0"
        spills = sorted(p.relative_to(work / "spill").as_posix() for p in (work / "spill").rglob("*.parquet"))
        assert {s.split("/")[1] for s in spills} == {"000000.parquet", "000001.parquet"}  # one file per shard and range
        assert len({s.split("/")[0] for s in spills}) == min(parts, 8)
        decisions = [pq.read_table(p) for p in sorted((work / "decisions").glob("*.parquet"))]
        assert len(decisions) == len(state["partitions"]) == min(parts, 8)
        for d in decisions:
            assert d.column("shard").to_pylist() == sorted(d.column("shard").to_pylist())
        assert sum(d.num_rows for d in decisions) == facts["duplicates"] == 50
        assert (out_dir / "semdedup" / "clusters.parquet").exists()
        results[parts] = _dropped(out)
    assert results[1] == results[3] == results[64]


def test_apply_on_an_empty_batch_and_rows_without_embeddings(tmp_path):
    x, uids = _pool(seed=5)
    emb = embedding_array(x)
    emb = pa.array([None if i == 0 else v for i, v in enumerate(emb.to_pylist())], emb.type)  # b0000 has none
    table = base_rows(uids, {"image_emb": emb})
    stage = _stage(tmp_path)
    state, out, _ = drive(stage, split(table, [680], 256))
    assert "b0000" not in _dropped(out) and "n0000" not in _dropped(out)  # its twin has no one to match
    assert len(_dropped(out)) == 49
    empty = stage.apply(table.slice(0, 0), state)
    assert empty.schema.field("near_dup_of").type == pa.string()
    assert empty.schema.field("near_dup_similarity").type == pa.float32()
    assert os.path.basename(stage.work_dir) == "semdedup-0"


def test_a_pool_without_usable_embeddings_passes_through(tmp_path):
    uids = [f"{i:03d}" for i in range(20)]
    table = base_rows(uids, {"image_emb": embedding_array(np.zeros((20, 8), np.float32))}, dropped={"000"})
    _, out, facts = drive(_stage(tmp_path), split(table, [10, 10], 4))
    assert facts["pool"] == 0 and facts["duplicates"] == 0
    assert out.column("drop_reason").to_pylist().count(None) == 19


# --------------------------------------------------------------------------- golden: the reference's logic


def _reference_semdedup(x: np.ndarray, centroids: np.ndarray, eps: float, keep: str = "hard") -> set[int]:
    """facebookresearch/SemDeDup on given centroids, step by step as its code does it; returns
    the dataset indices it removes.

    clustering/clustering.py: each sample's nearest centroid by inner product (spherical
    k-means) and that similarity. clustering/sort_clusters.py (sim_metric cosine): distance =
    1 - similarity, each cluster sorted by it with Python's stable ``sorted`` over the members in
    dataset order, descending for ``keep_hard`` ("easy" reverses the sorted cluster, as
    semdedup.py's which_to_keep does). semdedup.py: the pairwise similarity of the sorted
    members (torch, float32), diagonal zeroed, upper triangle (diagonal=1), M = column maxima,
    remove where M > 1 - eps; a cluster of one is kept. The one liberty: the reference gets the
    centroid similarity from faiss's float32 BLAS search, whose last bit depends on where a row
    sits in the query batch, so two identical captions can tie or not by accident; here it is
    taken in float64 and rounded to float32, so identical embeddings tie and the stable sort
    keeps them in dataset order."""
    import torch

    sims = np.asarray(x, np.float64) @ np.asarray(centroids, np.float64).T
    nearest = sims.argmax(axis=1)
    dist_to_cent = (1.0 - sims[np.arange(len(x)), nearest]).astype(np.float32)
    removed = set()
    for c in range(centroids.shape[0]):
        items = [i for i in range(len(x)) if nearest[i] == c]
        if len(items) < 2:
            continue
        ordered = [i for i, _ in sorted(zip(items, dist_to_cent[items]), key=lambda t: t[1], reverse=True)]
        if keep == "easy":
            ordered = ordered[::-1]
        reps = torch.tensor(x[ordered])
        pair = reps @ reps.T
        pair.fill_diagonal_(0.0)
        m = torch.max(torch.triu(pair, diagonal=1), dim=0)[0]
        removed |= {ordered[j] for j in np.flatnonzero((m > 1 - eps).numpy())}
    return removed


def test_golden_against_the_reference_logic_on_real_caption_embeddings(tmp_path, request):
    """1,500 COCO captions (five per image: near-duplicates by nature), MiniLM embeddings. The
    stage removes exactly the samples the reference code removes given the same centroids:
    the same ordering within a cluster, the same threshold rule, the same member kept."""
    from real_embeddings import coco_caption_embeddings

    captions, x = coco_caption_embeddings(request)
    uids = [f"{i:06d}" for i in range(len(x))]  # uid order is dataset order: ties break alike
    table = base_rows(uids, {"image_emb": embedding_array(x)})
    for eps in (0.1, 0.2):
        state, out, facts = drive(_stage(tmp_path, clusters=12, eps=eps, kmeans_sample=1500),
                                  split(table, [700, 800], 256))
        ours = {int(u) for u in _dropped(out)}
        expected = _reference_semdedup(x, state["centroids"], eps)
        assert ours == expected, eps
        assert len(expected) >= (40 if eps == 0.1 else 200)
        # the kept member of each removed pair is the one farther from the centroid
        cl, dist = assign(normalise(x), state["centroids"])
        for u, of in _dropped(out).items():
            assert cl[int(u)] == cl[int(of)] and dist[int(of)] >= dist[int(u)]
    # the rule is not vacuous: keeping the member nearest the centroid instead changes the answer
    assert _reference_semdedup(x, state["centroids"], 0.2, keep="easy") != expected
