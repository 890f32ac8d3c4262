"""Stage concept_prune (DBP): budgets from cluster complexity, the hardest members kept,
exact and independent of sharding; one end-to-end job with semdedup before it."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_job
from global_driver import base_rows, drive, embedding_array, split
from pairsift.stages.base import StageContext
from pairsift.stages.concept_prune import (ConceptPruneConfig, ConceptPruneStage, cluster_floors, keep_total,
                                          water_fill)

SPREADS = (0.02, 0.02, 0.02, 0.09, 0.09, 0.09)  # three tight concepts, three spread-out ones


def _sphere_clusters(per_cluster=300, d=48, seed=0, spreads=SPREADS):
    """Points around well-separated unit centres with a known spread each, shuffled."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((d, d)))[0][: len(spreads)]  # orthonormal
    xs, truth = [], []
    for j, s in enumerate(spreads):
        xs.append(centres[j] + rng.standard_normal((per_cluster, d)) * s)
        truth += [j] * per_cluster
    x = np.concatenate(xs)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float16), np.asarray(truth)[perm]


def _stage(tmp_path, seed=0, **cfg):
    cfg = {"clusters": 6, "keep_fraction": 0.5, "neighbours": 3, "kmeans_sample": 1000, **cfg}
    return ConceptPruneStage(ConceptPruneConfig(**cfg), StageContext(seed=seed, output=str(tmp_path)))


def _kept(out: pa.Table) -> np.ndarray:
    return pc.is_null(out.column("drop_reason")).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- budgets


def test_water_fill_caps_redistributes_and_sums_exactly():
    # cluster 0 wants 42 of 60 but has 10. The reference's program (min ||x - N.P||^2) shifts
    # every other cluster up by the same amount (12 + 16, 6 + 16); the old scaling rule handed
    # the surplus out 2:1 in proportion to P (33.3 / 16.7)
    shares, sizes = np.array([0.7, 0.2, 0.1]), np.array([10, 100, 100])
    assert water_fill(shares, sizes, 60, np.zeros(3)).tolist() == [10, 28, 22]
    assert water_fill(shares, sizes, 60, np.zeros(3), "scale").tolist() == [10, 33, 17]
    # floors lift the small shares; the rest follows the rule
    b = water_fill(np.array([0.9, 0.05, 0.05]), np.array([100, 100, 100]), 90, np.array([20, 20, 20]), "scale")
    assert b.tolist() == [50, 20, 20]
    b = water_fill(np.array([0.6, 0.3, 0.1]), np.array([100, 100, 100]), 90, np.array([20, 20, 20]))
    # 54 - 5.5 and 27 - 5.5 (the floored cluster's extra 11 taken from the others equally), the .5 tie
    # going to the lower index
    assert b.tolist() == [49, 21, 20]
    rng = np.random.default_rng(1)
    for allocation in ("shift", "scale"):
        for _ in range(300):
            k = int(rng.integers(1, 40))
            sizes = rng.integers(0, 50, k)
            shares = rng.dirichlet(np.ones(k)) * (sizes > 0)
            shares = shares / shares.sum() if shares.sum() else shares
            total = int(rng.integers(0, sizes.sum() + 1))
            floors = np.where(sizes > 0, int(rng.uniform(0, 1) * total / max(1, (sizes > 0).sum())), 0)
            b = water_fill(shares, sizes, total, floors, allocation)
            assert b.sum() == total
            assert (b <= sizes).all() and (b >= np.minimum(floors, sizes)).all()
            free = (b > np.minimum(floors, sizes)) & (b < sizes)  # neither floored nor capped
            if free.any():  # those are within one unit of one common shift μ or scale λ
                p = shares[free]
                if allocation == "shift":
                    assert (b[free] - 1 - total * p).max() <= (b[free] + 1 - total * p).min() + 1e-9
                else:
                    assert ((b[free] - 1) / p).max() <= ((b[free] + 1) / p).min() + 1e-9


def test_keep_total_and_floors_follow_the_reference():
    assert keep_total(0.29, 100) == 29 and keep_total(0.5, 7) == 3 and keep_total(1.0, 5) == 5
    sizes = np.array([0, 1, 2, 50, 500])
    # reference: int(N / k * ratio) over all k centroids, capped at size - 1; 1 when the ratio is 0
    assert cluster_floors(sizes, 100, 0.5, 5, "reference").tolist() == [0, 0, 1, 10, 10]
    assert cluster_floors(sizes, 100, 0.0, 5, "reference").tolist() == [0, 0, 1, 1, 1]
    # pairsift's earlier rule: share of an equal split over the non-empty clusters, capped at size
    assert cluster_floors(sizes, 100, 0.5, 5, "nonempty").tolist() == [0, 1, 2, 12, 12]


# --------------------------------------------------------------------------- the rule


def test_spread_out_clusters_get_larger_budgets_and_their_hardest_members_are_kept(tmp_path):
    x, truth = _sphere_clusters()
    n = len(x)
    uids = [f"{i:06x}" for i in range(n)]
    emb = embedding_array(x)
    # a row dropped before and one without an embedding are left as they are
    emb = pa.array([None if i == 7 else v for i, v in enumerate(emb.to_pylist())], emb.type)
    table = base_rows(uids, {"image_emb": emb}, dropped={uids[3]})
    state, out, facts = drive(_stage(tmp_path, min_cluster_share=0.0), split(table, [n], 256))
    pool = n - 2
    assert facts["pool"] == pool and facts["kept"] == round(0.5 * pool)
    clusters = pq.read_table(tmp_path / "concept_prune" / "clusters.parquet").to_pandas()
    assert clusters["budget"].sum() == round(0.5 * pool) and clusters["size"].sum() == pool
    assert (clusters["kept"] == clusters["budget"]).all()
    # k-means found the six concepts; map them to the known spreads
    cid = out.column("cluster_id").to_numpy(zero_copy_only=False)
    live = ~np.isin(np.arange(n), [3, 7])
    spread_of = {int(c): SPREADS[np.bincount(truth[live & (cid == c)]).argmax()] for c in range(6)}
    assert sorted(spread_of.values()) == sorted(SPREADS)
    clusters["spread"] = clusters["cluster_id"].map(spread_of)
    tight, wide = clusters[clusters.spread < 0.05], clusters[clusters.spread > 0.05]
    assert wide["d_intra"].min() > 2 * tight["d_intra"].max()
    assert wide["budget"].min() > tight["budget"].max()
    assert wide["budget"].sum() > 0.8 * clusters["budget"].sum()
    # exactly the budget per cluster, and the kept ones are the farthest from their centroid
    kept = _kept(out)
    dist = out.column("centroid_distance").to_numpy(zero_copy_only=False)
    assert kept.sum() == round(0.5 * pool) + 2 - 1  # + the row with no embedding (row 3 was dropped)
    for c, budget in zip(clusters["cluster_id"], clusters["budget"]):
        members = live & (cid == c)
        assert (kept & members).sum() == budget
        if 0 < budget < members.sum():
            assert dist[kept & members].min() >= dist[~kept & members].max()
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[3] == "earlier" and reasons[7] is None
    assert out.column("cluster_id")[7].as_py() is None and out.column("cluster_id")[3].as_py() is None
    assert set(r for r in reasons if r) == {"earlier", "concept_prune"}


def test_min_cluster_share_floors_the_simple_clusters(tmp_path):
    x, _ = _sphere_clusters(per_cluster=200, seed=2)
    table = base_rows([f"{i:06x}" for i in range(len(x))], {"image_emb": embedding_array(x, fixed=True)})
    state, out, _ = drive(_stage(tmp_path, min_cluster_share=0.8), split(table, [len(x)], 256))
    budgets = state["clusters"].column("budget").to_numpy()
    floor = int(0.8 * 600 / 6)
    assert budgets.sum() == 600 and budgets.min() == floor
    assert _kept(out).sum() == 600


@pytest.mark.parametrize("keep_fraction, kept_far", [(0.5, 20), (0.8, 50)])
def test_ties_at_the_cut_go_to_the_smaller_uid(tmp_path, keep_fraction, kept_far):
    # one cluster: 30 copies of a far point and 70 copies of a near one; the cut falls among the
    # near copies (all at the same distance), so exactly the smallest uids of them are kept
    far, near = np.eye(8)[0], np.eye(8)[1]
    x = np.array([far] * 30 + [near] * 70, np.float32)
    uids = [f"{i:03d}" for i in range(100)]
    order = np.random.default_rng(3).permutation(100)
    table = base_rows([uids[i] for i in order], {"image_emb": embedding_array(x[order])})
    state, out, _ = drive(_stage(tmp_path, clusters=1, keep_fraction=keep_fraction), split(table, [40, 60], 16))
    kept = {u for u, k in zip(out.column("uid").to_pylist(), _kept(out)) if k}
    assert kept == set(uids[:30]) | set(uids[30 : 30 + kept_far])


def test_deterministic_and_invariant_to_sharding(tmp_path):
    x, _ = _sphere_clusters(per_cluster=250, seed=4)
    table = base_rows([f"{i:06x}" for i in range(len(x))], {"image_emb": embedding_array(x)})
    results = []
    for sizes, batch in (([1500], 256), ([1, 499, 0, 700, 300], 64), ([1500], 256)):
        state, out, _ = drive(_stage(tmp_path, kmeans_sample=700), split(table, sizes, batch))
        results.append((out.sort_by("uid"), state["clusters"]))
    for out, clusters in results[1:]:
        assert out.equals(results[0][0])
        assert clusters.equals(results[0][1])


def test_apply_on_an_empty_batch_gives_typed_columns(tmp_path):
    x, _ = _sphere_clusters(per_cluster=20, seed=5)
    table = base_rows([f"{i:06x}" for i in range(len(x))], {"image_emb": embedding_array(x)})
    stage = _stage(tmp_path, clusters=3)
    state, _, _ = drive(stage, split(table, [len(x)], 64))
    empty = stage.apply(table.slice(0, 0), state)
    assert empty.schema.field("cluster_id").type == pa.int32()
    assert empty.schema.field("centroid_distance").type == pa.float32()


# --------------------------------------------------------------------------- end to end


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def test_job_semdedup_then_concept_prune_from_parquet_embeddings(ray_session, tmp_path):
    from pairsift.pipeline.runner import run_job

    x, _ = _sphere_clusters(per_cluster=60, d=64, seed=6, spreads=(0.12, 0.12, 0.25, 0.25))
    x[:10] = x[10:20]  # ten exact embedding duplicates
    src = tmp_path / "pool"
    src.mkdir()
    for f in range(3):
        rows = range(f * 80, (f + 1) * 80)
        pq.write_table(pa.table({
            "image": pa.array([_png(i) for i in rows], pa.binary()),
            "caption": pa.array([f"a picture {i}" for i in rows]),
            "image_emb": embedding_array(x[f * 80 : (f + 1) * 80]),
        }), src / f"part{f}.parquet")
    out = tmp_path / "out"
    stages = [{"semdedup": {"clusters": 4, "kmeans_sample": 1000}},
              {"concept_prune": {"clusters": 4, "keep_fraction": 0.5, "neighbours": 2, "kmeans_sample": 1000}}]
    run_job(make_job(src, out, stages=stages, fmt="parquet", input={"keep_columns": ["image_emb"]}))
    kept = pq.read_table(out / "metadata")
    rejected = pq.read_table(out / "rejected")
    assert kept.num_rows + rejected.num_rows == 240
    assert len(set(kept.column("uid").to_pylist()) | set(rejected.column("uid").to_pylist())) == 240
    reasons = rejected.column("drop_reason").to_pylist()
    assert reasons.count("semdedup") == 10
    assert kept.num_rows == 115  # half of the 230 left after semdedup
    assert kept.schema.field("image_emb").type == pa.list_(pa.float16())
    assert kept.column("cluster_id").null_count == 0
    clusters = pq.read_table(out / "concept_prune" / "clusters.parquet")
    assert pc.sum(clusters.column("budget")).as_py() == 115
    assert pq.read_table(out / "semdedup" / "clusters.parquet").column("duplicates").to_pylist().count(0) >= 1
    facts = json.loads((out / "manifest.json").read_text())["stage_facts"]
    assert facts["0:semdedup"]["duplicates"] == 10 and facts["0:semdedup"]["pool"] == 240
    assert facts["1:concept_prune"]["pool"] == 230 and facts["1:concept_prune"]["kept"] == 115
    assert not list((out / "_work").glob("semdedup-0/spill-*"))  # spill files removed at finalize


def test_a_pool_without_usable_embeddings_passes_through(tmp_path):
    x = np.zeros((20, 8), np.float16)  # no direction: not clusterable
    uids = [f"{i:03d}" for i in range(20)]
    table = base_rows(uids, {"image_emb": embedding_array(x)}, dropped={"000"})
    state, out, facts = drive(_stage(tmp_path), split(table, [10, 10], 4))
    assert facts["pool"] == 0 and facts["clusters"] == 0
    assert out.column("drop_reason").to_pylist().count(None) == 19
    assert out.column("cluster_id").null_count == 20


# --------------------------------------------------------------------------- golden: the reference's logic


def _reference_dbp(x, centroids, keep_fraction, neighbours, temperature, cls_bal_ratio):
    """amro-kamal/effective_pruning on given centroids, step by step as its code does it.

    Sorted clusters as SemDeDup writes them (nearest centroid by inner product, distance =
    1 - similarity, Python's stable sort descending over dataset order; similarities in
    float64 rounded to float32, see test_semdedup's reference). compute_avg_dist_to_cluster_
    centroid.py: d_intra = float32 mean of the distances. compute_centroid_distances.py: faiss
    IndexFlatIP over the centroids, ``num_NNs + 1`` nearest, the first (itself) dropped,
    d_inter = mean(1 - D). prune.py: complexity d_inter * d_intra, probabilities =
    torch.nn.Softmax(complexity / temperature), pruned size = int(ratio * total), min_samples
    = int(N / k * cls_bal_ratio) (1 when the ratio is 0), bounds (min(min_samples, size - 1),
    size), x = solve_qp(P=I, q=-probs * N, A=1, b=N, lb, ub, solver="osqp"), rounded with
    np.rint; each cluster keeps its first x_j (which_to_keep "hard"). Returns (sorted
    clusters, x before rounding, x rounded, kept dataset indices)."""
    import faiss
    import torch
    from qpsolvers import solve_qp

    k = centroids.shape[0]
    sims = np.asarray(x, np.float64) @ np.asarray(centroids, np.float64).T
    nearest = sims.argmax(axis=1)
    dist = (1.0 - sims[np.arange(len(x)), nearest]).astype(np.float32)
    clusters = []
    for c in range(k):
        items = [i for i in range(len(x)) if nearest[i] == c]
        clusters.append([i for i, _ in sorted(zip(items, dist[items]), key=lambda t: t[1], reverse=True)])
    d_intra = np.array([dist[cl].astype("float32").mean() for cl in clusters])
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    D, _ = index.search(np.ascontiguousarray(centroids, dtype=np.float32), neighbours + 1)
    d_inter = np.mean(1 - D[:, 1:], axis=1)
    d_i = d_inter * d_intra
    probs = torch.nn.Softmax(dim=0)(torch.Tensor(d_i) / temperature).numpy()
    sizes = np.array([len(cl) for cl in clusters])
    n_keep = int(keep_fraction * len(x))
    min_samples = int((n_keep / k) * cls_bal_ratio) if cls_bal_ratio > 0 else 1
    lb = np.array([min(min_samples, s - 1) for s in sizes], dtype=float)
    from scipy import sparse

    # the reference passes dense np.eye(k) and a ones vector; qpsolvers converts them to these for osqp
    x_qp = solve_qp(P=sparse.identity(k, format="csc"), q=-probs * n_keep, A=sparse.csc_matrix(np.ones((1, k))),
                    b=np.array([float(n_keep)]), lb=lb, ub=sizes.astype(float), solver="osqp",
                    eps_abs=1e-9, eps_rel=1e-9, polish=True, raise_error=True)
    x_int = np.rint(x_qp).astype(int)
    kept = {i for cl, n in zip(clusters, x_int) for i in cl[:n]}
    return clusters, x_qp, x_int, kept


@pytest.mark.parametrize("keep_fraction, temperature, share", [(0.5, 0.1, 0.5), (0.3, 0.05, 0.0), (0.7, 0.1, 0.8)])
def test_golden_against_the_reference_program_on_real_caption_embeddings(tmp_path, request, keep_fraction,
                                                                         temperature, share):
    """1,500 COCO captions, MiniLM embeddings, 20 clusters. Given the stage's centroids, the
    reference's program gives every cluster the stage's budget up to its rounding (the stage
    rounds so that the total is exact; the reference rounds each cluster to the nearest
    integer), and the stage keeps exactly the first N_j of each cluster in the reference's order."""
    from real_embeddings import coco_caption_embeddings

    _, x = coco_caption_embeddings(request)
    uids = [f"{i:06d}" for i in range(len(x))]  # uid order is dataset order: ties break alike
    table = base_rows(uids, {"image_emb": embedding_array(x)})
    cfg = dict(clusters=20, keep_fraction=keep_fraction, neighbours=5, temperature=temperature,
               min_cluster_share=share, kmeans_sample=1500)
    state, out, facts = drive(_stage(tmp_path, **cfg), split(table, [600, 900], 256))
    budgets = state["clusters"].column("budget").to_numpy()
    clusters, x_qp, x_int, ref_kept = _reference_dbp(x, state["centroids"], keep_fraction, 5, temperature, share)
    assert all(len(c) > 1 for c in clusters)  # the reference's [size - 1, size] box needs no empty cluster
    assert budgets.sum() == int(keep_fraction * len(x)) == facts["kept"]
    assert np.abs(budgets - x_qp).max() < 1.0  # the same solution, each rounded down or up
    assert np.abs(budgets - x_int).max() <= 1 and np.abs(budgets - x_int).sum() <= 2 * len(budgets)
    # the stage's d_intra, d_inter and shares are the reference's quantities
    ref_intra = np.array([np.mean([1.0 - float(x[i] @ state["centroids"][j]) for i in c]) for j, c in enumerate(clusters)])
    np.testing.assert_allclose(state["clusters"].column("d_intra").to_numpy(), ref_intra, atol=1e-5)
    kept = {int(u) for u, k in zip(out.column("uid").to_pylist(), _kept(out)) if k}
    assert kept == {i for c, n in zip(clusters, budgets) for i in c[:n]}
    assert len(kept ^ ref_kept) <= np.abs(budgets - x_int).sum()
    # the old scaling rule is a different program: it misses the reference where bounds bind
    bound = (x_qp <= [min(int(int(keep_fraction * 1500) / 20 * share) if share else 1, len(c) - 1)
                      for c in clusters]) | (x_qp >= [len(c) for c in clusters])
    assert bound.any() and not bound.all()
    state_s, _, _ = drive(_stage(tmp_path, allocation="scale", **cfg), split(table, [1500], 256))
    assert np.abs(state_s["clusters"].column("budget").to_numpy() - x_qp).max() > 1.0
