"""Training hand-off: open_clip's own training script trains a tiny model on a job's shards."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

from clip_tiny import NAME, write_tiny_clip
from conftest import make_job
from pairsift.pipeline.runner import run_job

TRAIN = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
sys.exit(main(sys.argv[2:]) or 0)
"""


def test_open_clip_train_runs_on_emitted_shards(ray_session, sample_pool, tmp_path):
    out = tmp_path / "out"
    run_job(make_job(sample_pool, out, emit={"shard_size": 20}))
    manifest = json.loads((out / "manifest.json").read_text())
    n_shards, kept = len(manifest["shards"]), manifest["counts"]["kept"]
    assert n_shards == 4 and kept == 73
    config, _ = write_tiny_clip(tmp_path / "model")
    args = [
        "--train-data", str(out / "shards" / f"{{000000..{n_shards - 1:06d}}}.tar"),
        "--train-num-samples", str(kept), "--dataset-type", "webdataset",
        "--model", NAME, "--batch-size", "8", "--epochs", "1", "--workers", "1",
        "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--device", "cpu",
        "--logs", str(tmp_path / "logs"), "--name", "handoff", "--save-frequency", "0",
        "--report-to", "", "--log-every-n-steps", "1", "--seed", "0",
    ]
    r = subprocess.run([sys.executable, "-c", TRAIN, config, *args], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    log = (tmp_path / "logs" / "handoff" / "out.log").read_text()
    assert r.returncode == 0, r.stderr[-3000:] + log[-2000:]
    losses = [float(x) for x in re.findall(r"Loss: ([-\d.eE+]+)", log)]
    assert len(losses) >= 3, log[-2000:]
    assert all(math.isfinite(v) for v in losses)
