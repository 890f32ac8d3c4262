#!/usr/bin/env bash
# GPU benchmark (issue 13): CLIP scoring from JPEG tars on one GPU, in under 5 minutes.
#
#   bash tests/benchmarks/gpu.sh [bench_gpu.py options, e.g. --images 40000 --models ViT-B-32,ViT-L-14]
#
# Random-weight ViT-B-32 and ViT-L-14 in fp16 on synthetic 256-px JPEG tars: CPU decode (Pillow +
# open_clip's preprocess) vs torchvision.io.decode_jpeg(device="cuda") batch decode, each model bare,
# and the real clip_score stage through run_job with decode: cpu and decode: gpu, with images/s and
# the GPU's busy share (see tests/benchmarks/bench_gpu.py). Target for later: >= 5,000 images/s for
# ViT-B-32 on one H100/H200 from tars.
#
# Without a GPU it says so and runs a tiny CPU smoke of the same code paths (exit 0 when they work),
# which tests/benchmarks/test_gpu_smoke.py runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_USAGE_STATS_ENABLED=0 PAIRSIFT_PROGRESS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
   && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  exec timeout 295 "$PY" tests/benchmarks/bench_gpu.py "$@"
fi
echo "no GPU present (nvidia-smi or torch.cuda sees none): CPU smoke run of the same code paths"
exec timeout 600 "$PY" tests/benchmarks/bench_gpu.py --smoke "$@"
