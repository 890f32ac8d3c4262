"""Re-deciding costs a small share of computing (issue 15).

A pool of synthetic 256-px JPEG pairs is curated with quality + exact_dedup + clip_score (a
ViT-B-32 with random weights: the real model's cost, no download) + metaclip; then the same job
is run again with a new ``min_score`` and a new ``t`` (a rerun: every computed column comes from
the cache), and the same change is asked of ``pairsift stats --what-if``. Ray is started once
before and its start-up is not counted. Prints the three wall times and the ratios; the target
is a rerun within 5% of the first run.

    python tests/benchmarks/bench_redecide.py [--pairs 20000] [--model ViT-B-32|tiny] [--cpus 2]

(20,000 pairs with ViT-B-32 take about an hour of the first run on 2 CPU cores; ``--pairs 2000``
gives the same ratio's order in minutes.)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: clip_tiny
os.environ.setdefault("PAIRSIFT_PROGRESS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
WORDS = ("cat", "dog", "red", "car", "house", "tree", "beach", "city", "mountain", "flower", "river", "night",
         "portrait", "street", "snow", "forest", "bridge", "boat", "sky", "garden")


def make_pool(folder: Path, pairs: int, per_tar: int = 1000) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(0, pairs, per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w") as tf:
            for i in range(t, min(t + per_tar, pairs)):
                base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((256, 256), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
                for name, data in ((f"{i:07d}.jpg", buf.getvalue()), (f"{i:07d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def spec(pool: Path, out: Path, model: tuple[str, str], min_score: float, t: int):
    from pairsift.pipeline.spec import parse_job

    return parse_job({
        "name": "redecide", "seed": 0, "input": {"format": "webdataset", "path": str(pool)}, "output": str(out),
        "stages": [{"quality": {"min_side": 32}}, {"exact_dedup": {}},
                   {"clip_score": {"model": model[0], "pretrained": model[1], "min_score": min_score,
                                   "save_embeddings": False}},
                   {"metaclip": {"t": t}}],
        "emit": {"shard_size": 5000}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--model", default="ViT-B-32", help="an open_clip architecture (random weights), or 'tiny'")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    import ray

    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.whatif import what_if

    root = Path(tempfile.mkdtemp(prefix="bench-redecide-"))
    make_pool(root / "pool", args.pairs)
    if args.model == "tiny":
        from clip_tiny import write_tiny_clip

        model = write_tiny_clip(root / "tiny")
    else:
        model = (args.model, "random")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    out = root / "out"

    t0 = time.perf_counter()
    first = run_job(spec(root / "pool", out, model, min_score=-1.0, t=20))
    t_first = time.perf_counter() - t0

    t0 = time.perf_counter()
    predicted = what_if(str(out), ["clip_score.min_score=0.0", "metaclip.t=5"])
    t_whatif = time.perf_counter() - t0

    t0 = time.perf_counter()
    again = run_job(spec(root / "pool", out, model, min_score=0.0, t=5))
    t_rerun = time.perf_counter() - t0
    ray.shutdown()

    cache = again.manifest.get("cache", {})
    print(f"pool: {args.pairs:,} pairs, model {args.model}, {args.cpus} CPUs (Ray start-up excluded)")
    print(f"first run            {t_first:9.1f} s   kept {first.manifest['counts']['kept']:,}")
    print(f"rerun, new decisions {t_rerun:9.1f} s   kept {again.manifest['counts']['kept']:,}   "
          f"ratio {t_rerun / t_first:.3f} (target <= 0.05)")
    print(f"stats --what-if      {t_whatif:9.1f} s   kept {predicted['what_if'][-1]['out']:,}   "
          f"ratio {t_whatif / t_first:.3f}")
    for stage, n in cache.items():
        print(f"  cache {stage:<16} reused {n['reused']:,}  computed {n['computed']:,}")


if __name__ == "__main__":
    main()
