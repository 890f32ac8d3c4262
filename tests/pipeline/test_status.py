"""`pairsift status`: progress of an interrupted and of a finished job, from the ledger."""

from __future__ import annotations

import pytest

from conftest import make_job
from pairsift.cli import main
from pairsift.pipeline.errors import JobError
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.status import job_status
from pairsift.samplepool import write_pool


def test_status_of_interrupted_then_finished_job(ray_session, tmp_path, capsys):
    write_pool(str(tmp_path / "pool"), shard_size=10)
    flag = tmp_path / "outage"
    flag.write_text("on")
    stages = [{"quality": {}}, {"fault_injection": {"fail_shard": "00004.tar", "fail_while_exists": str(flag)}}]
    spec = make_job(tmp_path / "pool", tmp_path / "out", stages=stages, ray={"num_cpus": 1})
    with pytest.raises(JobError):
        run_job(spec)
    st = job_status(str(tmp_path / "out"))
    assert st["state"] == "running"  # the driver (this process) is still alive
    (p0, emit) = st["steps"]
    assert (p0["done"], p0["total"]) == (4, 8) and emit["done"] == 0
    flag.unlink()
    run_job(spec)
    assert main(["status", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "8 / 8 shards committed" in text and "1 / 1" in text
    assert main(["status", str(tmp_path)]) == 2
