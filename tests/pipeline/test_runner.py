"""The shard runner: nothing lost, output independent of workers, resume, faults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_job
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.runner import run_job
from pairsift.samplepool import pool_samples, write_pool


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """The sample pool cut into input shards of 8 pairs."""
    folder = tmp_path_factory.mktemp("pool8")
    write_pool(str(folder), shard_size=8)
    return folder


def _files(out: Path) -> dict[str, str]:
    """sha256 of every data file of a job output (not the manifest, which has timings)."""
    res = {}
    for sub in ("shards", "metadata", "rejected"):
        for p in sorted((out / sub).glob("*")):
            res[f"{sub}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


def _uids(out: Path, sub: str) -> list[str]:
    files = sorted((out / sub).glob("*.parquet"))
    return [u for f in files for u in pq.read_table(f, columns=["uid"]).column("uid").to_pylist()]


@pytest.fixture(scope="module")
def clean_run(ray_session, small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    run_job(make_job(small_shards, out, emit={"shard_size": 16}, ray={"num_cpus": 2}))
    return out


def test_every_input_uid_once_in_kept_or_rejected(clean_run):
    kept, rejected = _uids(clean_run, "metadata"), _uids(clean_run, "rejected")
    assert len(kept) + len(rejected) == len(pool_samples())
    assert len(set(kept) | set(rejected)) == len(pool_samples())
    assert not set(kept) & set(rejected)
    rej = pq.read_table(clean_run / "rejected")
    assert "image" not in rej.column_names
    assert sorted(rej.column("drop_reason").to_pylist()) == [
        "bad_aspect", "decode_error", "empty_caption", "exact_dedup", "too_small"]
    meta = pq.read_table(clean_run / "metadata")
    assert meta.column("drop_reason").null_count == meta.num_rows
    for col in ("uid", "key", "source", "caption", "width", "height", "shard"):
        assert col in meta.column_names
    # Re-packed to emit.shard_size, in input order.
    n = meta.num_rows
    assert [len(pq.read_table(p)) for p in sorted((clean_run / "metadata").glob("*.parquet"))] == \
        [16] * (n // 16) + ([n % 16] if n % 16 else [])


def test_output_identical_with_one_cpu(clean_run, small_shards, tmp_path):
    out = tmp_path / "out1"
    run_job(make_job(small_shards, out, emit={"shard_size": 16}, ray={"num_cpus": 1}))
    assert _files(out) == _files(clean_run)


def test_rerun_skips_committed_shards_and_refuses_other_specs(clean_run, small_shards, tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "outage"
    flag.write_text("on")
    faulty = [{"quality": {}}, {"fault_injection": {"fail_shard": "00003.tar", "fail_while_exists": str(flag)}},
              {"exact_dedup": {}}]
    spec = make_job(small_shards, out, stages=faulty, emit={"shard_size": 16}, ray={"num_cpus": 1})
    with pytest.raises(JobError) as e:
        run_job(spec)
    assert "00003.tar" in str(e.value) and "injected failure" in str(e.value)
    assert not (out / "manifest.json").exists()
    committed = sorted(p.name for p in (out / "_work" / "ledger" / "p0").glob("*.json"))
    assert committed == ["000000.json", "000001.json", "000002.json"]

    flag.unlink()  # the outage is over: the same spec resumes
    result = run_job(spec)
    first = result.manifest["timings"]["phases"][0]
    shards = len(list(small_shards.glob("*.tar")))
    assert (first["shards"], first["shards_run"]) == (shards, shards - 3)
    assert _files(out) == _files(clean_run)

    # another job on this output is refused; the same job (name) with another spec is a rerun
    with pytest.raises(ConfigError, match="holds a different job"):
        run_job(make_job(small_shards, out, stages=[{"quality": {"min_side": 10}}], name="other"))
    run_job(make_job(small_shards, out, stages=[{"quality": {"min_side": 10}}]))
    assert len(_uids(out, "rejected")) == 3  # no dedup, and the 40 px thumbnail passes now
    run_job(make_job(small_shards, out, stages=[{"quality": {"min_side": 10}}], name="other"), restart=True)
    assert len(_uids(out, "rejected")) == 3


def test_sample_that_raises_is_dropped_and_the_job_goes_on(ray_session, small_shards, tmp_path):
    out = tmp_path / "out"
    stages = [{"quality": {}}, {"fault_injection": {"raise_on_caption": "cat"}}]
    result = run_job(make_job(small_shards, out, stages=stages))
    rej = pq.read_table(out / "rejected").to_pylist()
    errored = [r for r in rej if r["drop_reason"] == "error:fault_injection"]
    assert errored and all("cat" in r["caption"] for r in errored)
    kept = pq.read_table(out / "metadata").column("caption").to_pylist()
    assert not any("cat" in c for c in kept)
    assert result.manifest["counts"]["kept"] == len(pool_samples()) - 4 - len(errored)


def test_shard_failing_on_every_sample_fails_the_job_naming_it(ray_session, small_shards, tmp_path):
    stages = [{"fault_injection": {"fail_shard": "00005.tar"}}]
    with pytest.raises(JobError) as e:
        run_job(make_job(small_shards, tmp_path / "out", stages=stages))
    assert "00005.tar" in str(e.value) and "RuntimeError" in str(e.value)


def test_worker_killed_mid_shard_is_retried(clean_run, small_shards, tmp_path):
    marker = tmp_path / "killed"
    stages = [{"quality": {}}, {"fault_injection": {"kill_on_caption": "rocket", "kill_marker": str(marker)}},
              {"exact_dedup": {}}]
    out = tmp_path / "out"
    run_job(make_job(small_shards, out, stages=stages, emit={"shard_size": 16}))
    assert marker.exists(), "the worker was not killed"
    assert int(marker.read_text()) != os.getpid()
    assert _files(out) == _files(clean_run)


def test_apply_phase_asks_only_for_its_map_parts():
    """A top-fraction cut (apply) must not hold all CPUs or a GPU per task: only the phases that
    run a stage's map part size their tasks from it."""
    from pairsift.pipeline.plan import plan_phases
    from pairsift.pipeline.runner import _phase_resources
    from pairsift.stages import get_stage_class
    from pairsift.stages.base import StageContext

    spec = make_job("/tmp", "/tmp/o", stages=[
        {"quality": {}}, {"clip_score": {"model": "ViT-B-32", "pretrained": "random", "top_fraction": 0.3}}])
    for cluster, gpus in (({"CPU": 2.0}, 0.0), ({"CPU": 16.0, "GPU": 2.0}, 1.0)):
        stages = [get_stage_class(e.name)(e.config, StageContext(extras={"cluster": cluster})) for e in spec.stages]
        first, narrow, cut = plan_phases(spec.stages)  # score + histogram, the cut bin's pass, apply
        scoring = _phase_resources(stages, first)
        assert scoring["num_gpus"] == gpus and scoring["num_cpus"] >= (2.0 if not gpus else 1.0)
        assert _phase_resources(stages, narrow) == {"num_cpus": 1.0, "num_gpus": 0.0}  # reads stored scores
        assert _phase_resources(stages, cut) == {"num_cpus": 1.0, "num_gpus": 0.0}
