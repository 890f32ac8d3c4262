"""tests/benchmarks/gpu.sh without a GPU: it says so and runs its CPU smoke of the same code
paths (decode both ways, the bare model, clip_score jobs with decode: cpu and gpu) to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_gpu_benchmark_runs_its_cpu_smoke_without_a_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "PAIRSIFT_PROGRESS": "0"}
    proc = subprocess.run(["bash", str(HERE / "gpu.sh"), "--workdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "no GPU present" in out
    assert "decode to the model's input (64 images)" in out
    assert "bare pairsift-tiny-clip.json" in out
    assert "decode cpu: scoring phase" in out and "decode gpu: scoring phase" in out
    assert "smoke: decode, bare model and 2 clip_score jobs ran (ok)" in out
