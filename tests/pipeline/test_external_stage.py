"""Issue 14: a stage from a module outside pairsift is a first-class citizen. Its score shows in
`pairsift stats`, its artifact is written (and removed by --restart), its report section is in
report.html, and its GPU request is honoured by Ray — with nothing under pipeline/ naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pairsift.samplepool import pool_samples, write_pool

EXT = Path(__file__).resolve().parents[1] / "ext"
PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def test_the_engine_names_no_stage():
    """No module of the engine mentions a built-in stage's name or its columns."""
    from pairsift.stages import stage_names

    # ("recaption" stays a value of emit.caption_policy: the policy that takes the caption column a
    # stage declares, whichever stage that is.)
    words = set(stage_names()) - {"language", "recaption"} | {"clip_score", "metaclip_p", "cotr", "entry_counts",
                                                              "output_column"}
    for path in PIPELINE.glob("*.py"):
        text = path.read_text()
        found = [w for w in words if f'"{w}"' in text or f"'{w}'" in text or f"/{w}/" in text]
        assert not found, f"{path.name} names {found}"


def test_external_stage_scores_artifact_report_and_gpu(tmp_path):
    write_pool(str(tmp_path / "pool"), shard_size=16)
    stages = [{"quality": {}}, {"pairsift_ext_demo.stages:BrightnessStage": {"min_brightness": 40, "gpus": 1}}]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "ext", "input": {"format": "webdataset", "path": "pool"}, "output": "out",
                                   "ray": {"num_cpus": 2, "num_gpus": 1}, "stages": stages}))
    env = {**os.environ, "PAIRSIFT_PROGRESS": "0", "PYTHONPATH": os.pathsep.join([str(EXT), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "pairsift.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    cli("run", str(job))
    out = tmp_path / "out"
    meta = pq.read_table(out / "metadata")
    assert set(meta.column("brightness_gpu").to_pylist()) == {"0"}, "the worker was not given the GPU it asked for"
    assert min(meta.column("brightness").to_pylist()) >= 40
    rej = pq.read_table(out / "rejected").to_pylist()
    dark = [r for r in rej if r["drop_reason"] == "too_dark"]
    assert dark and all(r["drop_stage"] == "brightness" for r in dark)
    assert len(meta) + len(rej) == len(pool_samples())

    manifest = json.loads((out / "manifest.json").read_text())
    cols = {c["name"]: c for c in manifest["columns"]}
    assert cols["brightness"]["score"] and cols["brightness"]["stage"] == "brightness"
    assert not cols["brightness_gpu"]["score"]
    assert cols["width"]["score"]  # quality declares nothing: its numeric columns are scores

    stats = cli("stats", str(out))
    assert "brightness" in stats.split("score summaries")[1]
    assert "brightness_gpu" not in stats.split("score summaries")[1]
    assert (out / "brightness" / "histogram.parquet").exists()
    html = (out / "report.html").read_text()
    assert '<section id="brightness"><h2>Brightness histogram</h2>' in html

    job_record = json.loads((out / "_work" / "job.json").read_text())
    assert job_record["artifacts"] == ["brightness"]
    job.write_text(yaml.safe_dump({"name": "ext2", "input": {"format": "webdataset", "path": "pool"}, "output": "out",
                                   "stages": [{"quality": {}}]}))
    cli("run", str(job), "--restart")
    assert not (out / "brightness").exists()  # --restart removed the old job's artifact


def test_stage_registers_itself_by_name_and_config_from_generic(tmp_path):
    sys.path.insert(0, str(EXT))
    try:
        from pairsift.stages import get_stage_class, stage_names

        from pairsift_ext_demo.stages import BrightnessConfig, BrightnessStage
        assert get_stage_class("brightness") is BrightnessStage
        assert "brightness" in stage_names()
        assert BrightnessStage.Config is BrightnessConfig
    finally:
        sys.path.remove(str(EXT))
