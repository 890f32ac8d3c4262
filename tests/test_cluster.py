"""A real Ray cluster: `ray start --head` on 127.0.0.1, `ray job submit -- pairsift run`,
wait, check the output, stop the cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A head node in its own process group (so stopping it never touches other Rays)."""
    ray_bin = shutil.which("ray") or pytest.skip("the `ray` command is not on PATH")
    port, dash, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token authentication, as a real cluster should run: head, submitter and job share the token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    temp = f"/tmp/rayc{os.getpid()}"  # Ray's socket paths must stay short
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--temp-dir={temp}", "--disable-usage-stats"]  # own ports: another Ray may hold the defaults
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([ray_bin, "job", "list", "--address", url], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail("ray start exited: " + (tmp_path / "head.log").read_text()[-2000:])
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the dashboard never answered: " + (tmp_path / "head.log").read_text()[-2000:])
    yield ray_bin, url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_job_submitted_to_a_cluster(cluster, tmp_path):
    ray_bin, url, env = cluster
    from pairsift.samplepool import write_pool

    write_pool(str(tmp_path / "pool"))
    spec = {"name": "cluster", "input": {"format": "webdataset", "path": str(tmp_path / "pool")},
            "output": str(tmp_path / "out"), "stages": [{"quality": {}}, {"exact_dedup": {}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cmd = [ray_bin, "job", "submit", "--address", url, "--", sys.executable, "-m", "pairsift.cli", "run",
           str(tmp_path / "job.yaml")]
    deadline = time.time() + 180
    while True:
        r = subprocess.run(cmd, env={**env, "PAIRSIFT_PROGRESS": "0"}, capture_output=True, text=True, timeout=600)
        # The head answers before its job agent is up; a busy machine can take a minute.
        if r.returncode == 0 or "No available agent" not in r.stderr + r.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 73 and manifest["counts"]["rejected"] == 5
    # The job joined the cluster instead of starting its own Ray: its start-up is a connect.
    assert "Started a local Ray instance" not in r.stdout + r.stderr
