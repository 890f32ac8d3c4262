"""The driver killed mid-job: every committed file is complete, `pairsift run` again resumes
and the final output is identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import yaml

from conftest import make_job
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.status import job_status
from pairsift.samplepool import write_pool

STAGES = [{"quality": {}}, {"fault_injection": {"delay_s": 1.0}}, {"exact_dedup": {}}]


def _files(out):
    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "metadata", "rejected") for p in sorted((out / sub).glob("*"))}


def test_driver_killed_mid_job_resumes_to_identical_output(ray_session, tmp_path):
    write_pool(str(tmp_path / "pool"), shard_size=6)  # 13 input shards
    clean = tmp_path / "clean"
    run_job(make_job(tmp_path / "pool", clean, stages=STAGES, emit={"shard_size": 20}))

    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "test", "seed": 0, "input": {"format": "webdataset", "path": "pool"},
                                   "output": "out", "stages": STAGES, "emit": {"shard_size": 20}}))
    env = {**os.environ, "PAIRSIFT_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / "_work" / "ledger" / "p0"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(ledger.glob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(ledger.glob("*.json")))
    assert 3 <= committed < 13, "the kill must land mid-phase"
    assert not (out / "manifest.json").exists()
    assert job_status(str(out))["state"] == "interrupted"
    # Nothing half-written under a final name: every Parquet file there reads in full.
    for p in (out / "_work").rglob("*.parquet"):
        pq.read_table(p)
    for p in (out / "rejected").glob("*.parquet") if (out / "rejected").exists() else []:
        pq.read_table(p)

    time.sleep(3)  # a worker of the dead driver may still finish (and atomically commit) its shard
    committed = len(list(ledger.glob("*.json")))
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"({13 - committed}/13 shards run)" in r.stdout, r.stdout
    assert _files(out) == _files(clean)
    for p in (out / "shards").glob("*.tar"):
        with tarfile.open(p) as tf:
            assert all(tf.extractfile(m).read() is not None for m in tf.getmembers())
    assert not list(out.rglob("*.tmp-*")), "temporary files left behind"
