"""Download benchmark: pairsift's ``download`` stage (img2dataset's per-shard downloader inside
the Ray tasks) against img2dataset run on its own, on the same URL list and the same server.

    python tests/benchmarks/bench_download.py [--urls 2000] [--latency-ms 20] [--num-cpus 2]

A local HTTP server in its own process answers every request after ``--latency-ms`` (a stand-in
for the network), with ~``--image-kb`` KB JPEGs. The list is one Parquet file of ``--urls`` rows;
a quarter of the captions match the metadata list ``["dog"]``. Three runs:

* img2dataset: ``img2dataset.download`` (parquet in, webdataset out, ``resize_mode no``,
  ``disable_all_reencoding``, ``--num-cpus`` processes, ``thread_count`` 16, shards of 1000) in a
  child process, as pairsift used to run it on the driver;
* pairsift download: a job ``[download]`` on a local Ray of ``--num-cpus`` CPUs (same threads,
  shards of 1000 rows), emit included;
* pairsift metaclip first: ``[metaclip (metadata ["dog"], t large), download]``: MetaCLIP keeps the
  captions that match and only those are fetched.

Prints wall seconds, requests the server answered and the ratios to img2dataset. Target: the
download job within 1.3x of img2dataset's wall time (it also ingests, commits and emits); the
metaclip-first job fetches exactly the matching quarter. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_job  # noqa: E402


def _server(root: str, latency: float, port_q, count) -> None:
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency)
            with count.get_lock():
                count.value += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    httpd.daemon_threads = True
    port_q.put(httpd.server_address[1])
    httpd.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--image-kb", type=int, default=20)
    ap.add_argument("--num-cpus", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("PAIRSIFT_PROGRESS", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="bench_download_"))
    www = work / "www"
    www.mkdir()
    rng = np.random.default_rng(0)
    side = int((a.image_kb * 1024 / 1.5) ** 0.5)
    for i in range(64):  # 64 distinct files behind --urls distinct URLs
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(www / f"{i}.jpg", quality=90)
    count = mp.Value("i", 0)
    port_q: mp.Queue = mp.Queue()
    server = mp.Process(target=_server, args=(str(www), a.latency_ms / 1000, port_q, count), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port_q.get(timeout=30)}/"
    lists = work / "lists"
    lists.mkdir()
    urls = [f"{base}{i % 64}.jpg?row={i}" for i in range(a.urls)]
    caps = [f"a dog number {i}" if i % 4 == 0 else f"a picture number {i}" for i in range(a.urls)]
    pq.write_table(pa.table({"url": urls, "caption": caps}), lists / "list.parquet", row_group_size=1000)
    (work / "meta.json").write_text(json.dumps(["dog"]))

    def served() -> int:
        with count.get_lock():
            n, count.value = count.value, 0
        return n

    rows = []
    # img2dataset on its own (what pairsift ran on the driver before)
    kwargs = dict(url_list=str(lists), output_folder=str(work / "i2d"), input_format="parquet", url_col="url",
                  caption_col="caption", output_format="webdataset", resize_mode="no", disable_all_reencoding=True,
                  number_sample_per_shard=1000, processes_count=a.num_cpus, thread_count=16, timeout=10, retries=0,
                  enable_wandb=False, distributor="multiprocessing", extract_exif=False, compute_hash=None)
    code = ("import json, sys; sys.modules['torch'] = None; import img2dataset; "
            "img2dataset.download(**json.loads(sys.argv[1]))")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, capture_output=True)
    rows.append(("img2dataset (1 process tree, driver)", time.perf_counter() - t0, served()))

    import ray

    from pairsift.pipeline.runner import run_job

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    for label, stages in [("pairsift [download]", []),
                          ("pairsift [metaclip, download]", [{"metaclip": {"metadata": str(work / "meta.json"),
                                                                          "t": 10**9}}])]:
        spec = make_job(lists, work / label.split()[1].strip("[],"), stages=stages, fmt="urls",
                        input={"shard_size": 1000, "download_threads": 16}, ray={"num_cpus": a.num_cpus})
        t0 = time.perf_counter()
        run_job(spec)
        rows.append((label, time.perf_counter() - t0, served()))
    ray.shutdown()
    server.terminate()

    ref = rows[0][1]
    print(f"{a.urls:,} URLs, {a.latency_ms:g} ms latency, {a.num_cpus} CPUs")
    print(f"{'run':<34}{'wall s':>9}{'requests':>10}{'x img2dataset':>15}")
    for label, wall, n in rows:
        print(f"{label:<34}{wall:>9.1f}{n:>10,}{wall / ref:>15.2f}")
    expect = sum(1 for c in caps if "dog" in c)
    print(f"metaclip first fetched {rows[2][2]:,} URLs; the captions that match: {expect:,}")
    print(f"(starting the local Ray took {ray_start:.1f} s, outside the pairsift timings; img2dataset's start-up "
          f"is inside its own)")


if __name__ == "__main__":
    main()
