"""GPU benchmark (issue 13), the helper of ``tests/benchmarks/gpu.sh``: CLIP scoring from
JPEG tars on one GPU, in under 5 minutes.

    bash tests/benchmarks/gpu.sh                 # or: python tests/benchmarks/bench_gpu.py
        [--images 40000] [--models ViT-B-32,ViT-L-14] [--batch-size 1024] [--num-cpus N]
        [--budget 270] [--smoke] [--workdir DIR] [--keep]

Makes ``--images`` synthetic 256x256 photo-like JPEGs (512 distinct ones, repeated) with
captions as WebDataset tars of 5,000, then, with random weights in fp16:

1. decode: the images as the model's input, per second — ``cpu``: Pillow + open_clip's
   preprocess in ``--num-cpus`` threads (what ``clip_score`` does by default); ``gpu``:
   ``torchvision.io.decode_jpeg(device="cuda")`` in batches of 256, resized and normalised on
   the GPU (``clip_score.decode: gpu``, :class:`pairsift.stages.clip_models.TensorPreprocess`);
2. bare: each model alone on ready tensors (image and text encoders, ``--batch-size``);
3. pairsift: ``run_job`` (what ``pairsift run`` runs) with only ``clip_score`` on the tars, each
   model with ``decode: cpu`` and ``decode: gpu``: images/s of the scoring phase (model load
   included), of its shards after the first (the workers' own timings: steady state), and of
   the whole job (Ray started once, before the clocks), and the GPU's busy share while the
   scoring phase ran (``nvidia-smi`` every 100 ms, else ``torch.cuda.utilization``).

Target for later: >= 5,000 images/s for ViT-B-32 on one H100/H200 from tars (printed as a
ratio). ``--budget`` seconds bound the whole run: steps that would start after it are
skipped and named. Without a GPU (or with ``--smoke``) it says so and runs the same code on
the CPU with a tiny model and 64 images, so that CI-like checks exercise it
(``tests/benchmarks/test_gpu_smoke.py``).

Not collected by pytest (the file name is ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PAIRSIFT_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_B32 = 5000.0
SIDE = 256
WORDS = ("a the red blue green old small large wooden stone city street river mountain dog cat child woman "
         "man car bicycle house garden tree flowers sunset beach boat market table coffee book window door "
         "bridge field sky clouds snow night lights portrait close up photo of with on in near").split()


# --------------------------------------------------------------------------- data


def _photo(seed: int) -> bytes:
    """A 256x256 photo-like JPEG: smooth gradients and soft blobs plus sensor noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    s = SIDE // 8 + 2
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    small = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-120, 120, 3) + yy[..., None] * rng.uniform(-120, 120, 3)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        small += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-140, 140, 3)
    img = np.asarray(Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((SIDE, SIDE), Image.BICUBIC),
                     dtype=np.int16)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tars(folder: str, images: int, shard: int, processes: int, distinct: int = 512) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    with ProcessPoolExecutor(max(1, processes)) as pool:
        photos = list(pool.map(_photo, range(min(distinct, images))))
    rng = np.random.default_rng(0)
    paths = []
    for index, start in enumerate(range(0, images, shard)):
        path = os.path.join(folder, f"{index:05d}.tar")
        with tarfile.open(path, "w") as tf:
            for k in range(start, min(start + shard, images)):
                caption = " ".join(rng.choice(WORDS, int(rng.integers(4, 17)))).encode()
                for name, payload in ((f"{k:09d}.jpg", photos[k % len(photos)]), (f"{k:09d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- GPU busy share


class BusySampler:
    """The GPU's utilisation (% of time a kernel ran) every 100 ms: ``nvidia-smi -lms``, or
    ``torch.cuda.utilization()`` (NVML) where nvidia-smi is missing."""

    def __init__(self, device_index: int = 0):
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.index = device_index
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        try:
            proc = subprocess.Popen(["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                                     "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            proc = None
        if proc is None:
            import torch

            while not self.stop.is_set():
                try:
                    self.samples.append((time.perf_counter(), float(torch.cuda.utilization(self.index))))
                except Exception:  # noqa: BLE001 - no NVML: no figure
                    return
                self.stop.wait(0.1)
            return
        try:
            while not self.stop.is_set():
                line = proc.stdout.readline()
                if not line:
                    break
                try:
                    self.samples.append((time.perf_counter(), float(line.strip())))
                except ValueError:
                    pass
        finally:
            proc.terminate()

    def share(self, t0: float | None = None, t1: float | None = None) -> float | None:
        vals = [u for t, u in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return float(np.mean(vals)) / 100 if vals else None


# --------------------------------------------------------------------------- the measurements


def bench_decode(datas: list[bytes], model: str, pretrained: str, device: str, threads: int) -> dict:
    """Images/s of each decode way, to the model's input tensor (on the device for ``gpu``)."""
    import torch
    from PIL import Image

    from pairsift.stages import clip_models

    loaded = clip_models.load(model, pretrained, device="cpu")
    out = {}
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda d: loaded.image_tensor(Image.open(io.BytesIO(d))), datas[:threads * 4]))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(lambda d: loaded.image_tensor(Image.open(io.BytesIO(d))), datas))
        out["cpu"] = len(datas) / (time.perf_counter() - t0)
    tp = clip_models.TensorPreprocess(loaded.preprocess, torch.device(device))
    batch = 256
    tp.decode(datas[:batch])  # warm-up (nvJPEG handles, kernels)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(datas), batch):
        got = tp.decode(datas[i:i + batch])
        assert all(x is not None for x in got)
    sync()
    out["gpu"] = len(datas) / (time.perf_counter() - t0)
    return out


def bench_bare(model: str, pretrained: str, device: str, precision: str, batch: int, seconds: float) -> float:
    """Pairs/s of the model alone (image + text encoders) on ready tensors."""
    import torch

    from pairsift.stages import clip_models

    m = clip_models.load(model, pretrained, device=device, precision=precision)
    size = m.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(batch, 3, *size, device=device).to(m.input_dtype or torch.float32)
    tokens = m.tokenizer([" ".join(WORDS[i % 40:i % 40 + 10]) for i in range(batch)]).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        m.model.encode_image(x)
        m.model.encode_text(tokens)
        sync()
        n, t0 = 0, time.perf_counter()
        while n < 2 * batch or time.perf_counter() - t0 < seconds:
            m.model.encode_image(x)
            m.model.encode_text(tokens)
            sync()
            n += batch
    rate = n / (time.perf_counter() - t0)
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def bench_job(input_dir: str, output: str, model: str, pretrained: str, device: str, precision: str, batch: int,
              decode: str, num_cpus: int, sampler: BusySampler | None) -> dict:
    """One clip_score job through the engine (``run_job``, as ``pairsift run``)."""
    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.spec import parse_job

    shutil.rmtree(output, ignore_errors=True)
    spec = parse_job({
        "name": "bench-gpu", "seed": 0, "input": {"format": "webdataset", "path": input_dir}, "output": output,
        "ray": {"num_cpus": num_cpus},
        "stages": [{"clip_score": {"model": model, "pretrained": pretrained, "batch_size": batch, "device": device,
                                   "precision": precision, "decode": decode, "save_embeddings": True}}],
        "emit": {"shard_size": 10000},
    })
    t0 = time.perf_counter()
    res = run_job(spec)
    t1 = time.perf_counter()
    phases = res.manifest["timings"]["phases"]
    score = next(p for p in phases if "clip_score" in p["phase"])
    # the scoring phase ran first: from the job's start (less preflight) for its seconds
    busy = sampler.share(t1 - res.run_s, t1 - res.run_s + score["seconds"] + 1.0) if sampler else None
    counts = res.manifest["counts"]
    # steady state: the shards after the first (the model is loaded; one GPU task at a time)
    shards = res.phase_summaries.get(0, [])[1:]
    busy_s = sum(sum(v for k, v in s.get("timings", {}).items() if "." not in k) for s in shards)
    steady = sum(s["rows"] for s in shards) / busy_s if busy_s else None
    return {"samples": score["samples"], "phase_s": score["seconds"], "job_s": res.run_s - res.ray_init_s, "steady": steady,
            "kept": counts.get("kept", 0), "busy": busy, "worker_seconds": score.get("worker_seconds", {}),
            "rate": score["samples"] / score["seconds"], "job_rate": counts.get("input", 0) / (res.run_s - res.ray_init_s)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the job (default: all)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; later steps are skipped")
    ap.add_argument("--bare-seconds", type=float, default=8.0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64 images, on the CPU")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    start = time.perf_counter()

    import torch

    cuda = torch.cuda.is_available() and not a.smoke
    cpus = a.num_cpus or os.cpu_count() or 1
    work = a.workdir or tempfile.mkdtemp(prefix="pairsift-bench-gpu-")
    os.makedirs(work, exist_ok=True)
    if cuda:
        device, precision = "cuda", "fp16"
        models = [(m, "random") for m in a.models.split(",")]
        images, shard, batch = a.images, 5000, a.batch_size
        print(f"GPU: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible); torch {torch.__version__}; "
              f"{cpus} CPUs for the job (machine: {os.cpu_count()})")
    else:
        print("no GPU present (torch.cuda.is_available() is False)" if not a.smoke else "--smoke",
              "-> a CPU smoke run of the same code paths: a tiny model, 64 images; the figures mean nothing")
        sys.path.insert(0, os.path.join(HERE, ".."))
        from clip_tiny import write_tiny_clip

        config, weights = write_tiny_clip(os.path.join(work, "tiny"))
        device, precision = "cpu", "fp32"
        models = [(config, weights)]
        images, shard, batch = 64, 32, 16
        cpus = min(cpus, 2)

    skipped: list[str] = []

    def budget_left(step: str) -> bool:
        if time.perf_counter() - start > a.budget:
            skipped.append(step)
            return False
        return True

    try:
        t0 = time.perf_counter()
        input_dir = os.path.join(work, "tars")
        paths = make_tars(input_dir, images, shard, cpus)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"made {images:,} JPEGs of {SIDE}x{SIDE} in {len(paths)} tars ({size / 1e6:,.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
        with tarfile.open(paths[0]) as tf:
            datas = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
        datas = (datas * (4096 // max(1, len(datas)) + 1))[:4096 if cuda else 64]

        decode = None
        if budget_left("decode"):
            decode = bench_decode(datas, *models[0], device, cpus)
            print(f"\ndecode to the model's input ({len(datas):,} images): cpu (Pillow + preprocess, {cpus} threads) "
                  f"{decode['cpu']:,.0f}/s; gpu (torchvision decode_jpeg on {device}, batches of 256) "
                  f"{decode['gpu']:,.0f}/s ({decode['gpu'] / decode['cpu']:.1f}x)")

        bare = {}
        for model, pretrained in models:
            if budget_left(f"bare {model}"):
                bare[model] = bench_bare(model, pretrained, device, precision, batch, a.bare_seconds if cuda else 0.5)
                print(f"bare {os.path.basename(model)} ({precision}, batch {batch}): {bare[model]:,.0f} pairs/s")

        import ray

        ray.init(num_cpus=cpus, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
        jobs: dict[tuple[str, str], dict] = {}
        try:
            with (BusySampler() if cuda else _Null()) as sampler:
                for model, pretrained in models:
                    for way in ("cpu", "gpu"):
                        if not budget_left(f"job {model} decode {way}"):
                            continue
                        r = bench_job(input_dir, os.path.join(work, "out"), model, pretrained, device, precision,
                                      batch, way, cpus, sampler if cuda else None)
                        jobs[(model, way)] = r
                        busy = f"{r['busy']:.0%}" if r["busy"] is not None else "n/a"
                        steady = f"{r['steady']:,.0f}" if r["steady"] else "n/a"
                        print(f"pairsift {os.path.basename(model)} decode {way}: scoring phase {r['rate']:,.0f} images/s "
                              f"({r['samples']:,} in {r['phase_s']:.1f} s, model load included; {steady}/s on the shards "
                              f"after the first; GPU busy {busy}); whole job "
                              f"{r['job_rate']:,.0f} images/s; worker seconds {r['worker_seconds']}")
        finally:
            ray.shutdown()

        print()
        if cuda and any(k[0] == "ViT-B-32" for k in jobs):
            best = max(max(jobs[k]["rate"], jobs[k]["steady"] or 0) for k in jobs if k[0] == "ViT-B-32")
            print(f"target for later: ViT-B-32 from tars >= {TARGET_B32:,.0f} images/s: best scoring rate "
                  f"{best:,.0f} images/s = {best / TARGET_B32:.2f}x -> {'MET' if best >= TARGET_B32 else 'MISSED'}")
        if not cuda:
            ok = decode is not None and len(jobs) == 2 * len(models) and all(j["kept"] == images for j in jobs.values())
            print(f"smoke: decode, bare model and {len(jobs)} clip_score jobs ran ({'ok' if ok else 'INCOMPLETE'})")
            if not ok:
                return 1
        if skipped:
            print(f"skipped past the {a.budget:.0f} s budget: {', '.join(skipped)}")
        print(f"total {time.perf_counter() - start:.0f} s")
        return 0
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
