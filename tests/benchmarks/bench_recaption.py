"""Recaption benchmark: does the ``openai`` backend keep a server saturated?

    python tests/benchmarks/bench_recaption.py [--latency-ms 50] [--requests 640] [--sequential 60]

Starts the tests' OpenAI-compatible server (``tests/stages/local_openai_server.py``) in its
own process on 127.0.0.1, answering every request after a fixed ``--latency-ms`` (as a
model server whose batches take that long; the answer echoes the prompt), then measures
requests/s side by side in one run:

* plain: the ``openai`` client in a loop, one request after another (what a simple
  recaptioning script does);
* stage: ``RecaptionStage.process`` (rewrite mode, ``backend: openai``) on a batch of rows, at
  ``concurrency`` 1, 8 and 32; the server reports the most requests it had in flight.

A saturated server with latency L answers ``concurrency / L`` requests/s; the table prints
that bound, the measured rate and the ratio to the plain loop. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))


def _serve(latency_s: float, queue) -> None:
    from local_openai_server import LocalOpenAIServer

    server = LocalOpenAIServer(model="bench", latency_s=latency_s)
    queue.put(server.start())
    while True:
        time.sleep(3600)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def plain_loop(endpoint: str, n: int) -> tuple[float, float]:
    """requests/s of a one-at-a-time loop, and its CPU milliseconds per request."""
    import openai

    client = openai.OpenAI(base_url=endpoint, api_key="EMPTY", max_retries=0, timeout=30)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        resp = client.chat.completions.create(model="bench", max_tokens=16, temperature=0.0,
                                              messages=[{"role": "user", "content": f"plain request {i}"}])
        assert resp.choices[0].message.content
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.close()
    return n / wall, 1000 * cpu / n


def stage_run(endpoint: str, n: int, concurrency: int) -> tuple[float, float]:
    """requests/s of the stage, and the client's CPU milliseconds per request."""
    import pyarrow as pa

    from pairsift.pipeline.table import BASE_SCHEMA
    from pairsift.stages.base import StageContext
    from pairsift.stages.recaption import RecaptionConfig, RecaptionStage

    stage = RecaptionStage(RecaptionConfig(mode="rewrite", backend="openai", model="bench", endpoint=endpoint,
                                           concurrency=concurrency, max_new_tokens=16), StageContext(seed=0))
    stage.preflight()
    stage.setup()
    rows = [{"uid": f"{i:032x}", "key": str(i), "source": "bench", "url": None, "caption": f"alt text number {i}",
             "image": b"-", "drop_reason": None, "drop_stage": None} for i in range(n)]
    batch = pa.Table.from_pylist(rows, schema=BASE_SCHEMA)
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = stage.process(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stage.backend.close()
    errors = out.column("recaption_error").drop_null().to_pylist()
    assert not errors, errors[:3]
    return n / wall, 1000 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--requests", type=int, default=640, help="requests per concurrent stage run")
    ap.add_argument("--sequential", type=int, default=60, help="requests for the plain loop and concurrency 1")
    args = ap.parse_args()
    os.environ.setdefault("PAIRSIFT_PROGRESS", "0")

    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_serve, args=(args.latency_ms / 1000, queue), daemon=True)
    proc.start()
    endpoint = queue.get(timeout=60)
    base = endpoint.rsplit("/v1", 1)[0]
    latency = args.latency_ms / 1000
    try:
        plain_loop(endpoint, 5)  # warm-up: imports, connections
        _get(base + "/reset")
        srv0 = _get(base + "/stats")["cpu_s"]
        plain, plain_cpu = plain_loop(endpoint, args.sequential)
        srv = 1000 * (_get(base + "/stats")["cpu_s"] - srv0) / args.sequential
        print(f"server latency {args.latency_ms:g} ms per request, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; server in its own process")
        print(f"{'client':<24}{'requests':>9}{'req/s':>8}{'bound':>8}{'of bound':>9}{'vs plain':>9}"
              f"{'in flight':>10}{'client ms':>10}{'server ms':>10}  (CPU per request)")
        print(f"{'plain openai loop':<24}{args.sequential:>9}{plain:>8.1f}{1 / latency:>8.1f}{plain * latency:>9.0%}"
              f"{1.0:>8.2f}x{1:>10}{plain_cpu:>10.2f}{srv:>10.2f}")
        for c in (1, 8, 32):
            n = args.sequential if c == 1 else args.requests
            _get(base + "/reset")
            srv0 = _get(base + "/stats")["cpu_s"]
            rate, cpu = stage_run(endpoint, n, c)
            stats = _get(base + "/stats")
            assert stats["requests"] == n, stats
            srv = 1000 * (stats["cpu_s"] - srv0) / n
            bound = c / latency
            print(f"{f'stage, concurrency {c}':<24}{n:>9}{rate:>8.1f}{bound:>8.1f}{rate / bound:>9.0%}"
                  f"{rate / plain:>8.2f}x{stats['max_inflight']:>10}{cpu:>10.2f}{srv:>10.2f}")
    finally:
        proc.terminate()
        proc.join(5)


if __name__ == "__main__":
    main()
