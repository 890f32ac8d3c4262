"""Issue 12, engine: random kill points. Hypothesis picks how the pool is cut into shards and
when the driver's whole process group is killed (``kill -9``) — after the n-th commit of any
step: a phase shard, a reduce task of the global stage's barrier, or an emit task — then the same
`pairsift run` is started again. Invariants: the rerun finishes (exit 0), every input uid is
once in kept ∪ rejected, and every output file is byte-identical to an uninterrupted run's.

CI runs ``PAIRSIFT_KILL_EXAMPLES`` examples (default 2; each is two or three runs of `pairsift`
in a fresh process, about 40 s).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pairsift.samplepool import pool_samples, write_pool

EXAMPLES = int(os.environ.get("PAIRSIFT_KILL_EXAMPLES", "2"))
STAGES = [{"quality": {}}, {"fault_injection": {"delay_s": 0.3}}, {"exact_dedup": {"partitions": 4}}]


def _files(out: Path) -> dict[str, str]:
    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "metadata", "rejected") for p in sorted((out / sub).glob("*"))}


def _commits(out: Path) -> int:
    ledger = out / "_work" / "ledger"
    return len(list(ledger.rglob("*.json"))) if ledger.exists() else 0


def _job(folder: Path, pool: Path) -> Path:
    """The job, in ``folder``, over ``pool`` (the same for both runs: ``source`` holds its path)."""
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "kill", "seed": 0, "input": {"format": "webdataset", "path": str(pool)},
                                   "output": "out", "stages": STAGES, "emit": {"shard_size": 16}}))
    return job


def _run(folder: Path, job: Path, kill_after: int | None = None) -> int:
    env = {**os.environ, "PAIRSIFT_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=folder, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return proc.returncode
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _commits(folder / "out") < kill_after:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate], database=None,
          suppress_health_check=list(HealthCheck))
@given(shard_size=st.sampled_from([6, 10, 13]), fraction=st.floats(0.05, 0.95))
def test_killed_anywhere_resumes_to_identical_output(tmp_path_factory, shard_size, fraction):
    base = tmp_path_factory.mktemp("kill")
    clean, victim, pool = base / "clean", base / "victim", base / "pool"
    write_pool(str(pool), shard_size=shard_size)
    _run(clean, _job(clean, pool))
    total = _commits(clean / "out")
    kill_after = max(1, min(total - 1, int(total * fraction)))
    _run(victim, _job(victim, pool), kill_after=kill_after)
    assert not (victim / "out" / "manifest.json").exists() or _commits(victim / "out") >= total
    _run(victim, _job(victim, pool))
    out = victim / "out"
    kept = [u for p in sorted((out / "metadata").glob("*.parquet")) for u in pq.read_table(p, columns=["uid"])
            .column("uid").to_pylist()]
    rejected = [u for p in sorted((out / "rejected").glob("*.parquet")) for u in pq.read_table(p, columns=["uid"])
                .column("uid").to_pylist()]
    assert len(kept) + len(rejected) == len(set(kept) | set(rejected)) == len(pool_samples())
    assert _files(out) == _files(clean / "out"), f"killed after {kill_after} of {total} commits"
