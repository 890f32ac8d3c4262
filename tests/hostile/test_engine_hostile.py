"""Issue 12, engine side: a hostile user's outputs, restarts, resumes, concurrent runs and
configurations. Every test here failed before the fix it names, on generated inputs.

Each asserts the exit code (or the exception the CLI maps to it), that nothing of the user's
was removed, and where a job runs, that every input uid ends exactly once in kept ∪ rejected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import make_job
from pairsift.cli import main as cli_main
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.runner import run_job
from pairsift.samplepool import write_pool

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def _jpeg(seed: int, size=(80, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: ``samples`` is [(key, {ext: bytes})]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def good_samples(prefix: str, n: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{prefix}{i:04d}", {"jpg": _jpeg(seed * 1000 + i), "txt": f"a photo number {i} of {prefix}".encode()})
            for i in range(n)]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def uids(out: Path, sub: str) -> list[str]:
    files = sorted((out / sub).glob("*.parquet"))
    return [u for f in files for u in pq.read_table(f, columns=["uid"]).column("uid").to_pylist()]


def assert_nothing_lost(out: Path, expected: int) -> None:
    kept, rejected = uids(out, "metadata"), uids(out, "rejected")
    assert len(kept) + len(rejected) == expected
    assert len(set(kept) | set(rejected)) == expected


def write_spec(path: Path, **raw) -> Path:
    base = {"name": "hostile", "seed": 0, "stages": [{"quality": {}}, {"exact_dedup": {}}]}
    base.update(raw)
    path.write_text(yaml.safe_dump(base))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``pairsift`` in a fresh process (its own Ray), as a user runs it."""
    full_env = {**os.environ, "PAIRSIFT_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pairsift.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hpool")
    write_pool(str(folder), shard_size=16)
    return folder


# --------------------------------------------------------------------------- data lost or destroyed


def test_restart_never_removes_the_input_of_a_chained_job(ray_session, pool, tmp_path):
    """Item 1: job 2 reads job 1's OUT/shards and writes to job 1's output with --restart."""
    out = tmp_path / "out"
    run_job(make_job(pool, out))
    before = tree_digest(out / "shards")
    assert before
    spec = make_job(out / "shards", out)
    with pytest.raises(ConfigError, match="contains the input|lies inside|is the input"):
        run_job(spec, restart=True)
    assert tree_digest(out / "shards") == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_the_input_is_refused_and_nothing_is_written(ray_session, pool, tmp_path, where):
    """Item 2: the output equal to the input folder, or inside it."""
    inp = tmp_path / "in"
    inp.mkdir()
    for p in pool.glob("*.tar"):
        (inp / p.name).write_bytes(p.read_bytes())
    before = tree_digest(inp)
    out = inp if where == "same" else inp / "curated"
    with pytest.raises(ConfigError, match="must not write where it reads"):
        run_job(make_job(inp, out))
    assert tree_digest(inp) == before
    assert not out.exists() or out == inp


def test_resume_over_a_changed_input_set_is_refused(ray_session, tmp_path):
    """Item 3: a tar added to the input between a failed run and its rerun."""
    inp = tmp_path / "in"
    for i in range(3):
        write_tar(inp / f"{i:05d}.tar", good_samples(f"s{i}_", 4, seed=i))
    flag = tmp_path / "outage"
    flag.write_text("on")
    stages = [{"quality": {}}, {"fault_injection": {"fail_shard": "00002.tar", "fail_while_exists": str(flag)}}]
    out = tmp_path / "out"
    with pytest.raises(JobError):
        run_job(make_job(inp, out, stages=stages))
    write_tar(inp / "00001b.tar", good_samples("new_", 4, seed=9))  # sorts between committed shards
    flag.unlink()
    with pytest.raises(ConfigError, match="input .* changed"):
        run_job(make_job(inp, out, stages=stages))
    run_job(make_job(inp, out, stages=stages), restart=True)
    assert_nothing_lost(out, 16)
    assert len(uids(out, "metadata")) == 16


def test_two_runs_on_one_output_the_second_is_refused(tmp_path):
    """Item 5: two `pairsift run` at once on the same output."""
    write_pool(str(tmp_path / "pool"), shard_size=4)
    stages = [{"quality": {}}, {"fault_injection": {"delay_s": 2.0}}, {"exact_dedup": {}}]
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": "pool"}, output="out",
                     stages=stages)
    env = {**os.environ, "PAIRSIFT_PROGRESS": "0"}
    first = subprocess.Popen([sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "1"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        ledger = tmp_path / "out" / "_work" / "ledger" / "p0"
        deadline = time.time() + 180
        while time.time() < deadline and not list(ledger.glob("*.json")):
            time.sleep(0.2)
        assert list(ledger.glob("*.json")), "the first run did not start"
        second = run_cli(["run", str(job), "--num-cpus", "1"], cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert "in use by another pairsift run" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert (tmp_path / "out" / "manifest.json").exists()


def test_object_store_lock_refuses_a_live_holder_and_takes_a_stale_one():
    """Item 5 on object storage: a heartbeat lock object (here on fsspec's memory store)."""
    from pairsift.pipeline import storage
    from pairsift.pipeline.safety import JobLock

    out = "memory://bucket/out-lock"
    first = JobLock(out, beat=0.2, stale=2.0).acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another pairsift run"):
            JobLock(out, beat=0.2, stale=2.0).acquire()
    finally:
        first.release()
    assert not storage.exists(first.path)
    storage.write_json(first.path, {"pid": 1, "host": "gone", "token": "x", "beat": time.time() - 600})
    JobLock(out, beat=0.2, stale=2.0).acquire().release()  # a dead holder's lock is taken over


# --------------------------------------------------------------------------- crashes from data


def test_undecodable_gif_without_quality_is_a_drop_not_an_emit_crash(ray_session, tmp_path):
    """Item 10: no quality stage; a 'GIF' Pillow cannot re-open must not crash emit."""
    samples = good_samples("ok", 3) + [("badgif", {"gif": b"GIF89a" + os.urandom(64), "txt": b"a gif"}),
                                       ("bmp", {"bmp": _bmp(), "txt": b"a bitmap"})]
    write_tar(tmp_path / "in" / "00000.tar", samples)
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "in", out, stages=[{"exact_dedup": {}}]))
    assert_nothing_lost(out, 5)
    rej = pq.read_table(out / "rejected").to_pylist()
    assert [(r["key"], r["drop_stage"], r["drop_reason"]) for r in rej] == [("badgif", "emit", "decode_error")]
    meta = pq.read_table(out / "metadata").to_pylist()
    bmp = [m for m in meta if m["key"] == "bmp"][0]
    assert bmp["transcoded"] and bmp["image_ext"] == "png"


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (70, 70), (10, 200, 30)).save(buf, "BMP")
    return buf.getvalue()


def test_one_hostile_sample_alone_in_a_shard_is_dropped(ray_session, tmp_path):
    """Item 11: a shard whose only live sample makes a stage raise is not a broken stage."""
    write_tar(tmp_path / "in" / "00000.tar", good_samples("ok", 5))
    write_tar(tmp_path / "in" / "00001.tar", [("evil", {"jpg": _jpeg(99), "txt": b"boom goes the caption"})])
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "in", out, stages=[{"quality": {}}, {"fault_injection": {"raise_on_caption": "boom"}}]))
    assert_nothing_lost(out, 6)
    rej = pq.read_table(out / "rejected").to_pylist()
    assert [(r["key"], r["drop_reason"]) for r in rej] == [("evil", "error:fault_injection")]


def test_a_stage_broken_on_every_row_still_fails_the_job(ray_session, tmp_path):
    """The other side of item 11: failing on good rows too is a broken stage."""
    write_tar(tmp_path / "in" / "00000.tar", good_samples("ok", 6))
    with pytest.raises(JobError, match="fault_injection failed on every one of the 6 samples"):
        run_job(make_job(tmp_path / "in", tmp_path / "out", stages=[{"fault_injection": {"fail_shard": "00000"}}]))


# --------------------------------------------------------------------------- configuration errors


def test_binary_yaml_is_exit_2(tmp_path):
    """Item 14."""
    job = tmp_path / "job.yaml"
    job.write_bytes(os.urandom(256) + b"\xff\xfe\x00")
    assert cli_main(["run", str(job)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["job.yaml"]


@pytest.mark.parametrize("case", ["file", "proc"])
def test_unwritable_outputs_are_exit_2_with_nothing_written(pool, tmp_path, case):
    """Item 14: an output that is a file, an output under /proc."""
    target = tmp_path / "taken"
    target.write_text("mine")
    output = str(target) if case == "file" else "/proc/pairsift-out"
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": str(pool)}, output=output)
    before = tree_digest(tmp_path)
    assert cli_main(["run", str(job)]) == 2
    assert tree_digest(tmp_path) == before
    assert target.read_text() == "mine"


def test_foreign_folder_is_not_written_over(pool, tmp_path):
    """An output folder with a `shards/` pairsift never recorded writing is somebody else's."""
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "precious.tar").write_bytes(b"data")
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": str(pool)}, output=str(out))
    assert cli_main(["run", str(job), "--restart"]) == 2
    assert (out / "shards" / "precious.tar").read_bytes() == b"data"
    assert sorted(os.listdir(out)) == ["shards"]


def test_ray_address_nobody_listens_on_is_exit_2_fast_with_nothing_written(pool, tmp_path):
    """Item 15."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nothing listens on
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": str(pool)}, output="out",
                     ray={"address": f"127.0.0.1:{port}"})
    t0 = time.time()
    res = run_cli(["run", str(job)], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "nothing accepts connections" in res.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "out").exists()


def test_stale_ray_cluster_file_does_not_stop_a_local_run(pool, tmp_path):
    """Item 16: an earlier local Ray's address file points at nothing."""
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": str(pool)}, output="out")
    env = {"RAY_TMPDIR": str(ray_tmp)}
    env_clean = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "1"], cwd=tmp_path,
                         env={**env_clean, "PAIRSIFT_PROGRESS": "0", **env}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "manifest.json").exists()


def test_stage_resources_are_checked_before_any_phase_runs(ray_session, pool, tmp_path):
    """Item 17: a stage asking for a GPU the cluster lacks, after stages that would have run."""
    out = tmp_path / "out"
    stages = [{"quality": {}}, {"exact_dedup": {}}, {"fault_injection": {"num_gpus": 1.0}}]
    with pytest.raises(ConfigError, match=r"stages\[2\].fault_injection: each worker asks for 1 GPU"):
        run_job(make_job(pool, out, stages=stages))
    assert not out.exists()


def test_stage_failing_its_schema_probe_is_a_configuration_error(ray_session, pool, tmp_path):
    """Item 18: the worker's empty-batch probe must not swallow a stage's exception."""
    stages = [{"quality": {}}, {"fault_injection": {"fail_on_empty_batch": True}}]
    with pytest.raises(ConfigError, match="fault_injection .* fails on an empty batch"):
        run_job(make_job(pool, tmp_path / "out", stages=stages))


# --------------------------------------------------------------------------- smaller


def test_restart_removes_the_old_jobs_artifacts_and_only_those(ray_session, tmp_path):
    """--restart over a job with a stage artifact (semdedup/) removes it; a user's file stays."""
    from pairsift.pipeline.safety import owned_to_remove

    out = tmp_path / "out"
    out.mkdir()
    (out / "_work").mkdir()
    (out / "_work" / "job.json").write_text(json.dumps({"name": "old", "fingerprint": "x",
                                                        "artifacts": ["metaclip", "../escape", "a/b"]}))
    for name in ("metaclip", "shards", "notes"):
        (out / name).mkdir()
        (out / name / "f").write_text("x")
    removed = sorted(Path(p).name for p in owned_to_remove(str(out)))
    assert removed == ["_work", "metaclip", "shards"]
    write_pool(str(tmp_path / "pool"), shard_size=16)
    run_job(make_job(tmp_path / "pool", out), restart=True)
    assert not (out / "metaclip").exists()
    assert (out / "notes" / "f").read_text() == "x"
    job = json.loads((out / "_work" / "job.json").read_text())
    assert job["artifacts"] == [] and job["inputs"]["files"] >= 1


def test_first_phase_read_errors_reach_the_manifest_with_a_global_stage(ray_session, tmp_path):
    """A truncated tar's read error must be in manifest inputs[].source_errors even when a
    global stage (a later phase) follows."""
    tar = write_tar(tmp_path / "in" / "00000.tar", good_samples("ok", 6))
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = run_job(make_job(tmp_path / "in", out, stages=[{"quality": {}}, {"exact_dedup": {}}]))
    errs = result.manifest["inputs"][0]["source_errors"]
    assert errs and "00000.tar" in errs[0]


def test_a_stage_listed_twice_is_counted_once_in_the_funnel(ray_session, pool, tmp_path):
    result = run_job(make_job(pool, tmp_path / "out", stages=[{"quality": {}}, {"quality": {"min_side": 100}}]))
    counts = result.manifest["counts"]
    rows = counts["stages"]
    assert [r["stage"] for r in rows] == ["ingest", "quality"]
    assert rows[-1]["out"] == counts["kept"]
    assert sum(r["dropped"] for r in rows) == counts["rejected"]


def test_stats_sql_cannot_touch_files_outside_the_output(ray_session, pool, tmp_path):
    out = tmp_path / "out"
    run_job(make_job(pool, out))
    assert cli_main(["stats", str(out), "--sql", "SELECT count(*) FROM samples"]) == 0
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"COPY samples TO '{tmp_path}/leak.csv'",
                f"ATTACH '{tmp_path}/x.duckdb'", "SET enable_external_access=true"):
        assert cli_main(["stats", str(out), "--sql", sql]) == 2, sql
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_a_killed_driver_leaves_no_ray_processes_behind(tmp_path):
    """Smaller item: `kill -9` of the driver alone (not its process group) used to leave Ray's
    DashboardAgent and RuntimeEnvAgent running; the reaper kills them."""
    from pairsift.pipeline.reaper import descendants

    write_pool(str(tmp_path / "pool"), shard_size=6)
    stages = [{"quality": {}}, {"fault_injection": {"delay_s": 1.0}}]
    job = write_spec(tmp_path / "job.yaml", input={"format": "webdataset", "path": "pool"}, output="out",
                     stages=stages)
    proc = subprocess.Popen([sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "1"], cwd=tmp_path,
                            env={**os.environ, "PAIRSIFT_PROGRESS": "0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ledger = tmp_path / "out" / "_work" / "ledger" / "p0"
    deadline = time.time() + 180
    while time.time() < deadline and not list(ledger.glob("*.json")):
        time.sleep(0.2)
    time.sleep(1.0)
    ray_procs = descendants(proc.pid)
    assert len(ray_procs) >= 3, "Ray did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 45
    alive = ray_procs
    while time.time() < deadline:
        alive = {p: s for p, s in ray_procs.items() if _alive(p, s)}
        if not alive:
            break
        time.sleep(1)
    assert not alive, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive}


def _alive(pid: int, started: str) -> bool:
    from pairsift.pipeline.reaper import _stat

    st = _stat(pid)
    return st is not None and st[1] == started
