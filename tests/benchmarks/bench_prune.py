"""Pruning benchmark: ``concept_prune`` (k-means + assignment + selection) on 250k, 500k and
1M 512-d float16 embeddings, seconds and peak memory for each, side by side in one run.

    python tests/benchmarks/bench_prune.py [--sizes 250000 500000 1000000] [--clusters 500]
                                           [--kmeans-sample 100000] [--stage concept_prune|semdedup]

For each size a synthetic pool is written once as shards of 10k rows (a mixture of 1000
concepts on the unit sphere, each with its own spread, stored as ``list<float16>``; not timed)
in Arrow IPC files, so that reading them costs next to nothing: what is timed is the stage,
not Parquet's decoding of nested columns (timed apart, on one shard: one look at the pool
through Parquet, as the runner's work shards cost). Then a fresh process (BLAS on one thread,
as in a Ray worker with num_cpus=1) runs the stage the way the runner does, in-process and
without Ray: every pass reads every shard in batches of 256 rows (``pipeline.worker.BATCH_SIZE``),
calls ``scan_pass`` per batch and ``combine`` per shard, pickles the shard's partial as the
ledger does, and ``merge_pass`` merges on the "driver"; then ``apply`` runs on every batch.
Reported per step: seconds; for the whole run: the process's peak RSS (``VmHWM``) and the
RSS after imports, and growth ratios against the smallest size (seconds ratio / size ratio;
<= 1 means no worse than linear). The pool itself is never in memory: peak memory should stay
flat, bounded by the k-means sample, the centroids and one shard.

Not collected by pytest (the file name is ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHARD = 10_000
DIM = 512
CONCEPTS = 1000


def write_pool(folder: str, n: int, seed: int = 0) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CONCEPTS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.02, 0.08, CONCEPTS).astype(np.float32)  # per-dimension noise
    weight = rng.dirichlet(np.ones(CONCEPTS) * 2.0)
    paths = []
    for s, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        r = np.random.default_rng([seed, s])
        c = r.choice(CONCEPTS, m, p=weight)
        x = centres[c] + r.standard_normal((m, DIM), dtype=np.float32) * spread[c, None]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uids = [f"{start + i:032x}" for i in range(m)]
        flat = pa.array(x.astype(np.float16).reshape(-1))
        table = pa.table({
            "uid": pa.array(uids, pa.string()),
            "key": pa.array(uids, pa.string()),
            "source": pa.array(["bench"] * m, pa.string()),
            "url": pa.nulls(m, pa.string()),
            "caption": pa.array(["a caption"] * m, pa.string()),
            "image": pa.array([b"x"] * m, pa.binary()),
            "drop_reason": pa.nulls(m, pa.string()),
            "drop_stage": pa.nulls(m, pa.string()),
            "image_emb": pa.ListArray.from_arrays(pa.array(np.arange(0, m * DIM + 1, DIM, dtype=np.int32)), flat),
        })
        path = os.path.join(folder, f"{s:06d}.arrow")
        with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=256)
        if s == 0:  # the same shard as Parquet, to time what the runner's work shards cost to read
            pq.write_table(table, os.path.join(folder, "shard0.parquet"), compression="zstd")
        paths.append(path)
    return paths


def _vm(field: str) -> float:
    """A /proc/self/status memory figure in MB (VmHWM: this process's peak RSS; unlike
    ru_maxrss it does not carry over the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_stage(folder: str, stage_name: str, clusters: int, kmeans_sample: int) -> dict:
    """Runs in a fresh process: the stage over the shards in ``folder``, timed per step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pairsift.pipeline.worker import BATCH_SIZE
    from pairsift.stages import get_stage_class
    from pairsift.stages.base import StageContext

    rss_imports = _vm("VmRSS")
    cls = get_stage_class(stage_name)
    cfg = {"clusters": clusters, "kmeans_sample": kmeans_sample}
    out = tempfile.mkdtemp(prefix="bench_prune_out_")
    stage = cls(cls.Config(**cfg), StageContext(seed=0, output=out))
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".arrow"))

    def batches(path):  # Arrow IPC: the stage's work, not Parquet decoding, is timed
        with pa.OSFile(path) as src:
            reader = pa.ipc.open_file(src)
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])

    t0 = time.perf_counter()
    for rb in pq.ParquetFile(os.path.join(folder, "shard0.parquet")).iter_batches(BATCH_SIZE):
        pass
    parquet_read = (time.perf_counter() - t0) * len(shards)  # one look at the pool through Parquet

    steps: dict[str, float] = {}
    read = 0.0
    state = None
    names = {"concept_prune": ["count", "sample", "assign+histogram", "cut pairs"],
             "semdedup": ["count", "sample", "assign+spill"]}[stage_name]
    merges = {"concept_prune": ["merge: totals", "merge: k-means", "merge: budgets", "merge: cuts"],
              "semdedup": ["merge: totals", "merge: k-means", "merge: pairwise"]}[stage_name]
    for p in range(cls.passes(stage.config)):
        t_scan = 0.0
        partials = []
        for path in shards:
            parts = []
            t0 = time.perf_counter()
            for b in batches(path):
                t1 = time.perf_counter()
                read += t1 - t0
                parts.append(stage.scan_pass(b, p, state))
                t0 = time.perf_counter()
                t_scan += t0 - t1
            t1 = time.perf_counter()
            partials.append(pickle.loads(pickle.dumps(stage.combine(parts))))
            t_scan += time.perf_counter() - t1
        steps[f"pass {p}: {names[p]}"] = t_scan
        t0 = time.perf_counter()
        state = stage.merge_pass(partials, p, state)
        steps[merges[p]] = time.perf_counter() - t0
        partial_mb = sum(len(pickle.dumps(q)) for q in partials) / 2**20
        steps[f"(pass {p} partials, MB)"] = partial_mb
        del partials
    t0 = time.perf_counter()
    stage.finalize(state, out)
    steps["finalize"] = time.perf_counter() - t0
    t_apply, kept, rows = 0.0, 0, 0
    for path in shards:
        t0 = time.perf_counter()
        for b in batches(path):
            t1 = time.perf_counter()
            read += t1 - t0
            res = stage.apply(b, state)
            kept += res.column("drop_reason").null_count
            rows += res.num_rows
            t0 = time.perf_counter()
            t_apply += t0 - t1
    steps["apply"] = t_apply
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "read": read, "parquet_read": parquet_read, "rows": rows, "kept": kept,
            "rss_imports_mb": rss_imports, "peak_rss_mb": _vm("VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--kmeans-sample", type=int, default=100_000)
    ap.add_argument("--stage", default="concept_prune", choices=["concept_prune", "semdedup"])
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OPENBLAS_NUM_THREADS of the measured process (Ray workers with num_cpus=1 run 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child, args.stage, args.clusters, args.kmeans_sample)))
        return

    results = {}
    for n in args.sizes:
        folder = tempfile.mkdtemp(prefix=f"bench_prune_{n}_")
        try:
            t0 = time.perf_counter()
            write_pool(folder, n)
            print(f"[{n:,}] pool written in {time.perf_counter() - t0:.1f} s (not timed)", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.blas_threads)}
            r = subprocess.run([sys.executable, __file__, "--child", folder, "--stage", args.stage,
                                "--clusters", str(args.clusters), "--kmeans-sample", str(args.kmeans_sample)],
                               check=True, capture_output=True, text=True, env=env)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["wall"] = time.perf_counter() - t0
            results[n] = res
            print(f"[{n:,}] {res['wall']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    sizes = list(results)
    step_names = [s for s in results[sizes[0]]["steps"] if not s.startswith("(")]
    print(f"\n{args.stage}: {DIM}-d float16 embeddings, clusters={args.clusters}, kmeans_sample={args.kmeans_sample}, "
          f"shards of {SHARD:,}, batches of 256, {os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={args.blas_threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    head = f"{'step':32s}" + "".join(f"{n:>14,}" for n in sizes)
    print(head + "\n" + "-" * len(head))
    for s in step_names:
        print(f"{s:32s}" + "".join(f"{results[n]['steps'][s]:13.1f}s" for n in sizes))
    print(f"{'(reading Arrow shards, all)':32s}" + "".join(f"{results[n]['read']:13.1f}s" for n in sizes))
    print(f"{'(one Parquet read of the pool)':32s}" + "".join(f"{results[n]['parquet_read']:13.1f}s" for n in sizes))
    for s in [s for s in results[sizes[0]]["steps"] if s.startswith("(")]:
        print(f"{s:32s}" + "".join(f"{results[n]['steps'][s]:14.1f}" for n in sizes))
    total = {n: sum(v for k, v in results[n]["steps"].items() if not k.startswith("(")) for n in sizes}
    print(f"{'total (stage work)':32s}" + "".join(f"{total[n]:13.1f}s" for n in sizes))
    print(f"{'peak RSS, MB':32s}" + "".join(f"{results[n]['peak_rss_mb']:14.0f}" for n in sizes))
    print(f"{'RSS after imports, MB':32s}" + "".join(f"{results[n]['rss_imports_mb']:14.0f}" for n in sizes))
    print(f"{'kept / rows':32s}" + "".join(f"{results[n]['kept'] / results[n]['rows']:14.3f}" for n in sizes))
    base = sizes[0]
    print("\ngrowth against the smallest size (ratio of seconds / ratio of sizes; <= 1.0 is no worse than linear):")
    for n in sizes[1:]:
        print(f"  {n:,}: time x{total[n] / total[base]:.2f} for size x{n / base:.1f} -> {total[n] / total[base] / (n / base):.2f};"
              f" peak RSS x{results[n]['peak_rss_mb'] / results[base]['peak_rss_mb']:.2f}")
    for n in sizes:
        steps = {k: v for k, v in results[n]["steps"].items() if not k.startswith("(")}
        top = max(steps, key=steps.get)
        print(f"  dominant step at {n:,}: {top} ({steps[top]:.1f} s of {total[n]:.1f} s)")


if __name__ == "__main__":
    main()
