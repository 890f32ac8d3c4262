"""Scale benchmark (issue 13): grow a synthetic pool and watch the driver's and the workers'
memory, the bytes moved and the time of every phase of a job with every global stage.

    python tests/benchmarks/bench_scale.py [--sizes 1000000,4000000] [--small]
        [--shard-rows 10000] [--num-cpus 2] [--clusters 1000] [--kmeans-sample 100000]
        [--speedup-size N] [--skip-speedup] [--workdir DIR] [--keep]

``--small`` is the smoke run: pools of 50k and 200k rows, 100 clusters, a 20k k-means sample.

The pool (Parquet, ``--shard-rows`` rows a file, made in parallel processes before any clock
starts): ``url`` (one per source row), ``caption`` (4-12 words drawn Zipf-like from common
English words, so MetaCLIP's matching has a head and a tail), ``image`` (a ~0.5 KB JPEG,
distinct per row by bytes after its EOI marker; ``--dup-share`` of the rows repeat an earlier
row's bytes exactly, ``--no-image-share`` have none and are dropped at ingest as
``missing_image``), ``emb`` (512-d float16 ``fixed_size_list``, unit vectors around 4,000 topic
centres; ``--near-dup-share`` of the rows are a near copy, cosine ~0.97, of an earlier row of
their file) and ``score`` (float32, rounded to 1/1000 so that ties occur).

The job: ``exact_dedup`` -> an exact top-fraction cut on ``score`` (clip_score's histogram +
narrow pass through the ``score_filter`` stage, which cuts on a stored score) -> ``semdedup`` -> ``concept_prune`` -> ``metaclip`` -> emit, each size in a
fresh process with its own local Ray of ``--num-cpus`` CPUs, through ``run_job`` with the Ray
executor wrapped to time each of its calls (every phase, every reduce, the emit) and to sample
the resident memory of the Ray worker processes (``/proc``, every 0.2 s) while it runs.

Per phase it prints wall time, bytes read and written (``manifest.json`` ``timings.phases``:
the sizes of the files the workers read and wrote, whole files even where a scan reads only
some columns), the driver's peak RSS so far (VmHWM at the end of the call: a barrier's merge
shows in the call after it) and the largest peak RSS of a Ray worker busy in the call (VmHWM,
reset to the current RSS as the call starts; workers are reused across phases, so this counts
what earlier tasks left allocated in them).
Targets, printed as ratios:

* the driver's peak RSS at the largest pool within 1.1x of the smallest;
* no worker's RSS grows with the pool: the largest worker RSS of each phase at the largest
  pool within 1.1x of the smallest;
* image bytes written = one copy of the kept images (every image byte written anywhere — work
  shards, the image store, the training tars — over the kept images' bytes in the tars;
  the job keeps its work files for this count);
* semdedup's pairwise stage (its reduce tasks) >= 1.7x faster on 2 workers than on 1: a
  semdedup-only job on the ``--speedup-size`` pool (default: the largest) with ``--num-cpus 1``
  and then 2, ``--speedup-clusters`` clusters (default: a cluster per 4,000 rows, so that the
  pairwise products, not task overhead, dominate).

Not collected by pytest (the file name is ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PAIRSIFT_PROGRESS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
DIM = 512
TOPICS = 4000
DRIVER_TARGET = 1.1
WORKER_TARGET = 1.1
IMAGE_COPIES_TARGET = 1.0
SPEEDUP_TARGET = 1.7
VOCAB = ("dog cat car tree house red blue green old new city street river mountain beach boat bridge "
         "flower garden table chair book window door sky cloud snow night light portrait woman man child "
         "girl boy family wedding dress shoe bag watch phone computer kitchen food cake coffee tea bread "
         "pizza salad fish bird horse cow sheep lake forest field road train plane bus bicycle market shop "
         "church castle tower museum park school office party music guitar piano art painting drawing map "
         "logo icon vector illustration pattern texture background wallpaper poster card sign banner frame "
         "black white yellow orange purple pink brown gold silver wooden stone glass metal leather vintage "
         "modern classic small large little big beautiful happy funny cute summer winter spring autumn "
         "christmas birthday holiday travel sunset sunrise ocean island desert waterfall canyon valley hill "
         "farm village harbor bay coast pier lighthouse airport station highway tunnel bridge skyline").split()


# --------------------------------------------------------------------------- the pool


def _tiny_jpegs(count: int = 256) -> list[bytes]:
    """``count`` distinct 24x24 JPEGs (~0.5 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        px = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        img = Image.fromarray(px).resize((24, 24), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _image(base: list[bytes], row: int) -> bytes:
    """Row ``row``'s image: a base JPEG with the row number after its EOI (decoders ignore it),
    so that every row's bytes differ."""
    return base[row % len(base)] + row.to_bytes(8, "big")


def _centres() -> np.ndarray:
    rng = np.random.default_rng(11)
    c = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def write_pool_file(args: tuple) -> dict:
    """One Parquet file of the pool: rows [start, start + rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, start, rows, o = args
    rng = np.random.default_rng(1_000_003 + start)
    base = _tiny_jpegs()
    idx = np.arange(start, start + rows)
    # images: none, an exact repeat of an earlier row's, or the row's own
    u = rng.random(rows)
    no_image = u < o["no_image_share"]
    dup = (~no_image) & (u < o["no_image_share"] + o["dup_share"]) & (idx > 0)
    src = np.where(dup, (idx * rng.random(rows)).astype(np.int64), idx)
    images = [None if no_image[i] else _image(base, int(src[i])) for i in range(rows)]
    # captions: Zipf-like word choice
    weights = 1.0 / np.arange(1, len(VOCAB) + 1) ** 1.1
    weights /= weights.sum()
    lengths = rng.integers(4, 13, rows)
    words = rng.choice(len(VOCAB), int(lengths.sum()), p=weights)
    cuts = np.concatenate([[0], np.cumsum(lengths)])
    captions = [" ".join(VOCAB[w] for w in words[cuts[i]:cuts[i + 1]]) for i in range(rows)]
    # embeddings: around a topic centre; some rows a near copy of an earlier row of this file
    centres = _centres()
    topic = rng.integers(0, TOPICS, rows)
    x = centres[topic] + 0.9 * rng.standard_normal((rows, DIM)).astype(np.float32) / np.sqrt(DIM)
    near = (rng.random(rows) < o["near_dup_share"]) & (np.arange(rows) > 0)
    partner = (np.arange(rows) * rng.random(rows)).astype(np.int64)
    x[near] = x[partner[near]] + 0.01 * rng.standard_normal((int(near.sum()), DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1)), DIM)
    score = np.round(rng.normal(0.3, 0.05, rows), 3).astype(np.float32)
    table = pa.table({
        "url": pa.array([f"https://img.example/{i:011d}.jpg" for i in idx], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "emb": emb,
        "score": pa.array(score, pa.float32()),
    })
    pq.write_table(table, path, row_group_size=2048, compression="zstd")
    return {"rows": rows, "bytes": os.path.getsize(path), "images": int((~no_image).sum()),
            "image_bytes": int(sum(len(b) for b in images if b is not None))}


def make_pool(folder: str, rows: int, shard_rows: int, processes: int, o: dict) -> dict:
    """The pool as Parquet files of ``shard_rows`` rows (reused when already there)."""
    done = os.path.join(folder, "pool.json")
    if os.path.exists(done):
        with open(done) as f:
            facts = json.load(f)
        if facts.get("options") == {**o, "rows": rows, "shard_rows": shard_rows}:
            return facts
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"{i:06d}.parquet"), start, min(shard_rows, rows - start), o)
            for i, start in enumerate(range(0, rows, shard_rows))]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        parts = list(pool.map(write_pool_file, jobs))
    facts = {"options": {**o, "rows": rows, "shard_rows": shard_rows}, "files": len(jobs),
             **{k: sum(p[k] for p in parts) for k in ("rows", "bytes", "images", "image_bytes")}}
    with open(done, "w") as f:
        json.dump(facts, f)
    return facts


# --------------------------------------------------------------------------- the job (child process)


def job_dict(pool: str, output: str, num_cpus: int, a: dict, stages: str = "all") -> dict:
    clusters, sample = a["clusters"], a["kmeans_sample"]
    if stages == "semdedup":
        chain = [{"semdedup": {"embedding": "emb", "clusters": a["speedup_clusters"], "kmeans_sample": sample}}]
    else:
        chain = [
            {"exact_dedup": {}},
            {"score_filter": {"column": "score", "top_fraction": 0.8}},
            {"semdedup": {"embedding": "emb", "clusters": clusters, "kmeans_sample": sample}},
            {"concept_prune": {"embedding": "emb", "clusters": clusters, "keep_fraction": 0.8,
                               "kmeans_sample": sample}},
            {"metaclip": {"metadata": "en"}},
        ]
    return {
        "name": f"bench-scale-{stages}", "seed": 0,
        "input": {"format": "parquet", "path": pool, "keep_columns": ["emb", "score"]},
        "output": output, "ray": {"num_cpus": num_cpus},
        "stages": chain,
        "emit": {"shard_size": a["shard_rows"], "keep_work": stages == "all"},
    }


def _proc_tree(root: int) -> dict[int, tuple[str, int, float]]:
    """Every process under ``root``: pid -> (its command line, VmRSS in kB, CPU seconds used)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
            out[pid] = (cmd, _status_kb(pid, "VmRSS"), cpu)
        except OSError:
            continue
    return out


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _reset_peak(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux ``clear_refs`` 5), so that VmHWM is
    the peak from now on; where that is not allowed, VmHWM stays the peak since it started."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_kb(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run_child(spec_file: str, result_file: str) -> int:
    """Run one job in this process with a timed Ray executor; write what was measured."""
    sys.path.insert(0, HERE)
    from pairsift.pipeline.executor import RayExecutor
    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.spec import parse_job

    with open(spec_file) as f:
        spec = parse_job(json.load(f))
    calls: list[dict] = []
    me = os.getpid()

    class TimedRayExecutor(RayExecutor):
        """Ray's executor, timing each ``map`` and sampling the workers' RSS meanwhile."""

        def map(self, fn, items, make_args, resources, desc, count_rows):
            stop = threading.Event()
            peak = {"worker_kb": 0, "workers": 0}
            cpu_first: dict[int, float] = {}
            cpu_last: dict[int, float] = {}
            busy: set[int] = set()
            for pid, (cmd, _, _) in _proc_tree(me).items():  # each worker's peak RSS from now on
                if cmd.startswith("ray::"):
                    _reset_peak(pid)

            def sample():
                while True:
                    tree = _proc_tree(me)
                    now = [pid for pid, (cmd, _, _) in tree.items()
                           if cmd.startswith("ray::") and not cmd.startswith("ray::IDLE")]  # busy workers
                    busy.update(now)
                    peak["workers"] = max(peak["workers"], len(now))
                    for pid in busy:  # the peak since the reset (VmHWM) of every worker busy in this call
                        try:
                            peak["worker_kb"] = max(peak["worker_kb"], _status_kb(pid, "VmHWM"))
                        except OSError:
                            pass
                    for pid, (cmd, _, cpu) in tree.items():
                        if cmd.startswith("ray::"):
                            cpu_first.setdefault(pid, cpu)
                            cpu_last[pid] = cpu
                    if stop.is_set():
                        return
                    stop.wait(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            t0 = time.perf_counter()
            sampler.start()
            try:
                return super().map(fn, items, make_args, resources, desc, count_rows)
            finally:
                stop.set()
                sampler.join()
                calls.append({"desc": desc, "start": t0, "seconds": time.perf_counter() - t0, "tasks": len(items),
                              "worker_cpu_s": sum(cpu_last[p] - cpu_first[p] for p in cpu_last),
                              "worker_rss_mb": peak["worker_kb"] / 1024, "workers": peak["workers"],
                              "driver_hwm_mb": _status_kb("self", "VmHWM") / 1024})

    t0 = time.perf_counter()
    res = run_job(spec, executor=TimedRayExecutor())
    wall = time.perf_counter() - t0
    out = {"wall": wall, "run_s": res.run_s, "ray_init_s": res.ray_init_s, "calls": calls,
           "driver_hwm_calls_mb": max((c["driver_hwm_mb"] for c in calls), default=0.0),
           "driver_hwm_mb": _status_kb("self", "VmHWM") / 1024, "counts": res.manifest["counts"],
           "phases": res.manifest["timings"]["phases"]}
    with open(result_file, "w") as f:
        json.dump(out, f, default=str)
    import ray

    ray.shutdown()
    return 0


def run_job_process(pool: str, output: str, num_cpus: int, a: dict, stages: str, work: str) -> dict:
    """One job in a fresh process (its own driver RSS, its own local Ray)."""
    shutil.rmtree(output, ignore_errors=True)
    tag = os.path.basename(output)
    spec_file, result_file = os.path.join(work, f"{tag}.spec.json"), os.path.join(work, f"{tag}.result.json")
    with open(spec_file, "w") as f:
        json.dump(job_dict(pool, output, num_cpus, a, stages), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_file, result_file], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {tag} job failed (exit {proc.returncode})")
    with open(result_file) as f:
        return json.load(f)


# --------------------------------------------------------------------------- image copies


def image_bytes_written(output: str) -> dict:
    """Image bytes the job wrote: the ``image`` column of every work shard (``_work/p*``), the
    image store (``_work/images``), and the image members of the training tars (the kept
    images, once)."""
    import pyarrow.parquet as pq

    work = {"work_shards": 0, "image_store": 0}
    wdir = os.path.join(output, "_work")
    for name in sorted(os.listdir(wdir)) if os.path.isdir(wdir) else []:
        path = os.path.join(wdir, name)
        if re.fullmatch(r"p\d+", name):
            for f in os.listdir(path):
                md = pq.ParquetFile(os.path.join(path, f)).metadata
                for g in range(md.num_row_groups):
                    rg = md.row_group(g)
                    for c in range(rg.num_columns):
                        col = rg.column(c)
                        if col.path_in_schema == "image":
                            work["work_shards"] += col.total_compressed_size
        elif name == "images":
            for root, _, files in os.walk(path):
                work["image_store"] += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    kept = 0
    sdir = os.path.join(output, "shards")
    for f in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
        with tarfile.open(os.path.join(sdir, f)) as tf:
            kept += sum(m.size for m in tf.getmembers() if m.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"))
    total = work["work_shards"] + work["image_store"] + kept
    return {**work, "tars": kept, "total": total, "copies": total / kept if kept else float("nan")}


def projected_speedup(output: str, workers: int = 2) -> dict | None:
    """What the partitioning allows: each semdedup reduce task's pairwise work (sum of n_c^2
    over its clusters, from ``OUT/semdedup/clusters.parquet``), dispatched in order to
    ``workers`` slots as the executor does; the speedup over one slot if time were only that
    work (no task overhead, no other load on the machine)."""
    import heapq

    import pyarrow.parquet as pq

    from pairsift.stages.base import StageContext
    from pairsift.stages.semdedup import SemDedupConfig, SemDedupStage, _range_of

    path = os.path.join(output, "semdedup", "clusters.parquet")
    if not os.path.exists(path):
        return None
    sizes = pq.read_table(path, columns=["size"]).column("size").to_numpy()
    k = sizes.size
    stage = SemDedupStage(SemDedupConfig(clusters=k), StageContext(extras={"cluster": {"CPU": float(workers)}}))
    parts = max(1, min(k, SemDedupConfig().partitions))
    part = _range_of(np.arange(k), k, parts)
    cost = np.bincount(part, weights=sizes.astype(np.float64) ** 2, minlength=parts)
    try:  # the stage's own grouping of spill partitions into tasks, for a job of ``workers`` CPUs
        state = {"counts": sizes.astype(np.int64), "spilled": {int(r): [] for r in np.unique(part[sizes > 0])}}
        work = np.array([sum(cost[r] for r, _ in task) for task in stage.reduce_tasks("spill", state)])
    except Exception:  # noqa: BLE001 - an older or newer grouping: one task per partition
        work = cost[cost > 0]
    slots = [0.0] * workers
    for w in work:  # in task order: the next task goes to the slot that frees first
        heapq.heapreplace(slots, slots[0] + w)
    return {"tasks": int(work.size), "speedup": float(work.sum() / max(slots)), "largest_share": float(work.max() / work.sum())}


# --------------------------------------------------------------------------- report


def _phase_rows(res: dict) -> list[dict]:
    """The job's calls (phases, reduces, emit) with the manifest's I/O figures where it has them."""
    phases = list(res["phases"])
    rows = []
    for call in res["calls"]:
        m = re.match(r"phase (\d+)/\d+ \[(.*)\]", call["desc"])
        row = {"name": call["desc"], "seconds": call["seconds"], "worker_rss_mb": call["worker_rss_mb"],
               "driver_hwm_mb": call["driver_hwm_mb"], "bytes_read": None, "bytes_written": None}
        if m:
            row["name"] = f"{int(m.group(1)):2d} {m.group(2)}"
            t = next((p for p in phases if p["phase"] == m.group(2)), None)
            if t is not None:
                phases.remove(t)
                row.update(bytes_read=t.get("bytes_read"), bytes_written=t.get("bytes_written"))
        elif call["desc"] == "emit":
            t = next((p for p in phases if p["phase"] == "emit"), None)
            if t is not None:
                row.update(bytes_written=t.get("bytes_written"))
        rows.append(row)
    return rows


def _mb(x) -> str:
    return f"{x / 1e6:9,.1f}" if x is not None else "        -"


def print_job(label: str, res: dict) -> None:
    c = res["counts"]
    print(f"\n== {label}: {c.get('input', 0):,} rows in, {c.get('kept', 0):,} kept; job {res['run_s']:.1f} s "
          f"(Ray start {res['ray_init_s']:.1f} s); driver peak RSS {res['driver_hwm_mb']:,.0f} MB "
          f"({res['driver_hwm_calls_mb']:,.0f} MB until the emit ended; the rest: manifest and report.html)")
    print(f"  {'phase / call':<44} {'wall s':>8} {'read MB':>9} {'written MB':>10} {'driver MB':>9} {'worker MB':>9}")
    for r in _phase_rows(res):
        print(f"  {r['name'][:44]:<44} {r['seconds']:8.1f} {_mb(r['bytes_read'])} {_mb(r['bytes_written']):>10} "
              f"{r['driver_hwm_mb']:9,.0f} {r['worker_rss_mb']:9,.0f}")


def _verdict(ok: bool) -> str:
    return "HOLDS" if ok else "MISSED"


def report_targets(sizes: list[int], results: dict[int, dict], images: dict[int, dict], speed: dict | None) -> bool:
    lo, hi = sizes[0], sizes[-1]
    ok_all = True
    print(f"\n== targets ({lo:,} -> {hi:,} rows, x{hi / lo:.1f})")
    d = results[hi]["driver_hwm_mb"] / results[lo]["driver_hwm_mb"]
    ok = d <= DRIVER_TARGET
    ok_all &= ok
    print(f"  driver peak RSS: {results[lo]['driver_hwm_mb']:,.0f} MB -> {results[hi]['driver_hwm_mb']:,.0f} MB, "
          f"{d:.2f}x (target <= {DRIVER_TARGET}x): {_verdict(ok)}")
    d = results[hi]["driver_hwm_calls_mb"] / results[lo]["driver_hwm_calls_mb"]
    print(f"    of which until the emit ended (phases, barriers, reduces): {results[lo]['driver_hwm_calls_mb']:,.0f} MB -> "
          f"{results[hi]['driver_hwm_calls_mb']:,.0f} MB, {d:.2f}x")
    a_rows = {r["name"]: r for r in _phase_rows(results[lo])}
    worst = (0.0, "")
    print(f"  largest worker RSS per phase ({lo:,} -> {hi:,}):")
    for r in _phase_rows(results[hi]):
        before = a_rows.get(r["name"])
        if before is None or not before["worker_rss_mb"]:
            continue
        ratio = r["worker_rss_mb"] / before["worker_rss_mb"]
        worst = max(worst, (ratio, r["name"]))
        print(f"    {r['name'][:44]:<44} {before['worker_rss_mb']:7,.0f} -> {r['worker_rss_mb']:7,.0f} MB  {ratio:.2f}x")
    ok = worst[0] <= WORKER_TARGET
    ok_all &= ok
    print(f"  no worker's RSS grows with the pool: worst {worst[0]:.2f}x ({worst[1]}) (target <= {WORKER_TARGET}x): "
          f"{_verdict(ok)}")
    for n in sizes:
        im = images[n]
        ok = im["copies"] <= IMAGE_COPIES_TARGET + 1e-9
        ok_all &= ok
        print(f"  image bytes written at {n:,}: {im['total'] / 1e6:,.1f} MB (work shards {im['work_shards'] / 1e6:,.1f}, "
              f"image store {im['image_store'] / 1e6:,.1f}, training tars {im['tars'] / 1e6:,.1f}) = "
              f"{im['copies']:.2f} copies of the kept images (target {IMAGE_COPIES_TARGET:.0f}): {_verdict(ok)}")
    if speed is not None:
        s = speed[1]["reduce_s"] / speed[2]["reduce_s"]
        ok = s >= SPEEDUP_TARGET
        ok_all &= ok
        print(f"  semdedup pairwise (reduce) on {speed['rows']:,} rows, {speed['clusters']} clusters: "
              f"1 worker {speed[1]['reduce_s']:.1f} s ({speed[1]['tasks']} tasks), 2 workers {speed[2]['reduce_s']:.1f} s "
              f"({speed[2]['tasks']} tasks), {s:.2f}x "
              f"(target >= {SPEEDUP_TARGET}x): {_verdict(ok)}")
        if speed.get("projected"):
            p = speed["projected"]
            print(f"    projected from the tasks' pairwise work alone (sum of n_c^2 per task, in dispatch order): "
                  f"{p['speedup']:.2f}x on 2 workers ({p['tasks']} tasks, the largest {p['largest_share']:.0%} of the work)")
        print(f"    workers' CPU seconds in the reduce: 1 worker {speed[1]['cpu_s']:.1f} ({speed[1]['cpu_s'] / speed[1]['reduce_s']:.2f} "
              f"cores busy), 2 workers {speed[2]['cpu_s']:.1f} ({speed[2]['cpu_s'] / speed[2]['reduce_s']:.2f} cores busy)")
        print(f"    (whole semdedup job: 1 CPU {speed[1]['run_s']:.1f} s, 2 CPUs {speed[2]['run_s']:.1f} s; "
              f"1-min load average before the runs: {speed['load']:.2f} on {os.cpu_count()} cores)")
    return ok_all


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,4000000", help="pool sizes, comma-separated (smallest first)")
    ap.add_argument("--small", action="store_true", help="smoke run: 50k and 200k rows, 100 clusters, 20k sample")
    ap.add_argument("--shard-rows", type=int, default=10000, help="rows per input file (and per emit shard)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=None, help="semdedup and concept_prune clusters (default 1000)")
    ap.add_argument("--kmeans-sample", type=int, default=None, help="k-means sample (default 100000)")
    ap.add_argument("--no-image-share", type=float, default=0.02)
    ap.add_argument("--dup-share", type=float, default=0.05)
    ap.add_argument("--near-dup-share", type=float, default=0.1)
    ap.add_argument("--speedup-size", type=int, default=None, help="rows of the semdedup 1-vs-2 run (default: largest)")
    ap.add_argument("--speedup-clusters", type=int, default=None, help="its clusters (default: one per 4,000 rows)")
    ap.add_argument("--skip-speedup", action="store_true")
    ap.add_argument("--skip-scale", action="store_true", help="only the semdedup 1-vs-2 run")
    ap.add_argument("--workdir", default=None, help="folder for pools and outputs (default: a temp dir); "
                                                    "pools already there are reused")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return run_child(*a.child)

    sizes = [50_000, 200_000] if a.small else sorted(int(s) for s in a.sizes.split(","))
    opts = {"clusters": a.clusters or (100 if a.small else 1000),
            "kmeans_sample": a.kmeans_sample or (20_000 if a.small else 100_000),
            "shard_rows": a.shard_rows}
    speed_rows = a.speedup_size or sizes[-1]
    opts["speedup_clusters"] = a.speedup_clusters or max(1, speed_rows // 4000)
    pool_opts = {"no_image_share": a.no_image_share, "dup_share": a.dup_share, "near_dup_share": a.near_dup_share}
    work = a.workdir or tempfile.mkdtemp(prefix="pairsift-bench-scale-")
    os.makedirs(work, exist_ok=True)
    print(f"sizes {', '.join(f'{n:,}' for n in sizes)}; {a.shard_rows:,} rows a shard; {a.num_cpus} CPUs "
          f"(machine: {os.cpu_count()} cores, 1-min load {os.getloadavg()[0]:.2f}); clusters {opts['clusters']}, "
          f"k-means sample {opts['kmeans_sample']:,}; work folder {work}")
    try:
        pools = {}
        for n in sorted(set(sizes) | ({speed_rows} if not a.skip_speedup else set())):
            t0 = time.perf_counter()
            facts = make_pool(os.path.join(work, f"pool-{n}"), n, a.shard_rows, a.num_cpus, pool_opts)
            pools[n] = os.path.join(work, f"pool-{n}")
            print(f"pool {n:,}: {facts['files']} files, {facts['bytes'] / 1e6:,.0f} MB, {facts['images']:,} images "
                  f"({facts['image_bytes'] / 1e6:,.1f} MB) ({time.perf_counter() - t0:.0f} s)")

        results, images = {}, {}
        if not a.skip_scale:
            for n in sizes:
                out = os.path.join(work, f"out-{n}")
                results[n] = run_job_process(pools[n], out, a.num_cpus, opts, "all", work)
                images[n] = image_bytes_written(out)
                print_job(f"{n:,} rows, {a.num_cpus} CPUs", results[n])
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)

        speed = None
        if not a.skip_speedup:
            speed = {"rows": speed_rows, "clusters": opts["speedup_clusters"], "load": os.getloadavg()[0]}
            for cpus in (1, 2):
                out = os.path.join(work, f"semdedup-{speed_rows}-{cpus}cpu")
                res = run_job_process(pools[speed_rows], out, cpus, opts, "semdedup", work)
                reduce = [c for c in res["calls"] if c["desc"].endswith(": reduce")]
                if cpus == 1:
                    speed["projected"] = projected_speedup(out)
                speed[cpus] = {"reduce_s": sum(c["seconds"] for c in reduce), "run_s": res["run_s"],
                               "cpu_s": sum(c["worker_cpu_s"] for c in reduce), "tasks": sum(c["tasks"] for c in reduce)}
                print_job(f"semdedup only, {speed_rows:,} rows, {cpus} CPU(s)", res)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)

        if results:
            ok = report_targets(sizes, results, images, speed)
        elif speed is not None:
            s = speed[1]["reduce_s"] / speed[2]["reduce_s"]
            ok = s >= SPEEDUP_TARGET
            if speed.get("projected"):
                print(f"\nsemdedup pairwise projected from the tasks' work alone: {speed['projected']['speedup']:.2f}x on 2 "
                      f"workers ({speed['projected']['tasks']} tasks)")
            print(f"\nsemdedup pairwise: 1 worker {speed[1]['reduce_s']:.1f} s ({speed[1]['cpu_s']:.1f} CPU s), 2 workers "
                  f"{speed[2]['reduce_s']:.1f} s ({speed[2]['cpu_s']:.1f} CPU s), {s:.2f}x (target >= {SPEEDUP_TARGET}x): "
                  f"{_verdict(ok)}; 1-min load average before: {speed['load']:.2f} on {os.cpu_count()} cores")
        else:
            ok = True
        print("\nall targets hold" if ok else "\nsome targets are missed (see above)")
        return 0
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
