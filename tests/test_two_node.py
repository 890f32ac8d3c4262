"""Issue 13, "Downloads run on the head node only": a two-node Ray cluster on this machine (`ray
start --head --num-cpus 1` plus `ray start --address ... --num-cpus 1`, each with its own temp
folder and ports, token authentication as a real cluster runs), a URL-list job with a download
and global stages against a local HTTP server: the output is byte-identical to the single-node
run, and both nodes ran tasks of every phase — so both downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pairsift.pipeline.runner import run_job
from pairsift.pipeline.spec import load_job
from test_cluster import _free_port
from url_server import requested, serve

pytestmark = pytest.mark.slow

#: Output files that must not depend on where tasks ran (the manifest and report hold timings).
COMPARED = ("shards", "metadata", "rejected", "metaclip")

_DRIVER = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.time() > deadline:
        sys.exit("the second node never joined")
    time.sleep(1)

from pairsift.pipeline.runner import run_job
from pairsift.pipeline.spec import load_job
result = run_job(load_job(sys.argv[2]))
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
print("RESULT " + json.dumps({"nodes": nodes, "phases": result.manifest["timings"]["phases"]}))
"""


def _ports() -> list[str]:
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a worker node of one CPU each, every process in its own process group (so that
    stopping them never touches another Ray on the machine)."""
    ray_bin = shutil.which("ray") or pytest.skip("the `ray` command is not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port = _free_port()
    temps = [f"/tmp/rtn{os.getpid()}{k}" for k in "hw"]  # Ray's socket paths must stay short
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--ray-client-server-port={_free_port()}", f"--temp-dir={temps[0]}", *common, *_ports()]
    worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={temps[1]}", *common, *_ports()]
    procs = []
    try:
        for name, cmd in (("head", head), ("worker", worker)):
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.STDOUT,
                                          stdout=open(tmp_path / f"{name}.log", "w")))
            time.sleep(3)
            if procs[-1].poll() is not None:
                pytest.fail(f"ray start ({name}) exited: " + (tmp_path / f"{name}.log").read_text()[-2000:])
        yield f"127.0.0.1:{port}", env
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in COMPARED for p in sorted((out / d).rglob("*")) if p.is_file()}


def test_two_node_cluster_downloads_on_both_nodes_byte_identical_output(two_nodes, tmp_path, ray_session):
    address, env = two_nodes
    www = tmp_path / "www"
    www.mkdir()
    n = 36  # 9 shards of 4 rows
    for i in range(n):
        Image.new("RGB", (24 + i, 20), (i * 7 % 256, 60, 120)).save(www / f"{i}.png")
    with serve(www) as (base, log):
        lists = tmp_path / "lists"
        lists.mkdir()
        # Every 7th caption matches no metadata entry (MetaCLIP drops it, unfetched), every 9th row
        # links the picture of the row before (exact_dedup drops one), every 11th a missing one.
        caps = [f"{['a dog', 'a cat', 'a tree'][i % 3]} picture number {i}" if i % 7 else f"nothing {i}"
                for i in range(n)]
        urls = [f"{base}{i - 1 if i % 9 == 8 else i}.png?row={i}" if i % 11 != 10 else f"{base}gone-{i}.png"
                for i in range(n)]
        pq.write_table(pa.table({"url": urls, "caption": caps}), lists / "pool.parquet", row_group_size=4)
        (tmp_path / "metadata.json").write_text(json.dumps(["dog", "cat", "tree"]))
        stages = [{"metaclip": {"metadata": str(tmp_path / "metadata.json"), "t": 8}},
                  {"quality": {"min_side": 16}}, {"exact_dedup": {}}]

        def job(name: str) -> Path:
            spec = {"name": "two-node", "input": {"format": "urls", "path": str(lists), "shard_size": 4,
                                                  "download_timeout": 10, "download_threads": 4},
                    "output": str(tmp_path / name), "stages": stages, "emit": {"shard_size": 4}}
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            return path

        # One node: this session's local Ray.
        single = run_job(load_job(job("single")))
        one_node = len(log)
        assert one_node > 0
        # Two nodes: a driver joins the cluster, as `ray job submit` would run one.
        r = subprocess.run([sys.executable, "-c", _DRIVER, address, str(job("cluster"))], cwd=tmp_path, timeout=600,
                           env={**env, "PAIRSIFT_PROGRESS": "0"}, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert len(got["nodes"]) == 2

    # The same output, byte for byte, whichever node ran what.
    assert _digests(tmp_path / "cluster") == _digests(tmp_path / "single")
    assert any(k.startswith("shards/") for k in _digests(tmp_path / "single"))
    # The cluster run fetched what the single-node run fetched: the same URLs, once each.
    assert sorted(requested(log[one_node:])) == sorted(requested(log[:one_node]))
    # Every phase (the download's included) ran tasks on both nodes.
    labels = [p["phase"] for p in got["phases"]]
    assert labels == [p["phase"] for p in single.manifest["timings"]["phases"]]
    assert "metaclip+download+quality+exact_dedup+scan" in labels and labels[-1] == "emit"
    for phase in got["phases"]:
        assert sorted(phase["nodes"]) == got["nodes"], phase
        assert sum(phase["nodes"].values()) == phase["shards_run"] == phase["shards"], phase
