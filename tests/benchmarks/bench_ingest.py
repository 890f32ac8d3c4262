"""Ingest benchmark: pairsift's tar reader against a plain ``tarfile`` loop, on the same shards.

    python tests/benchmarks/bench_ingest.py [--samples 4000] [--image-kb 40]

Writes one WebDataset shard of ``--samples`` JPEGs (noise, about ``--image-kb`` KB each, so
they do not compress) with captions and ``.json``, plain (``.tar``) and gzip'd (``.tgz``), then
times, in this process:

* plain: ``tarfile.open(mode="r|*")``, every member read into memory (what the reader did
  before the hostile-input rules);
* pairsift: ``read_shard`` to Arrow batches: size caps checked before reading, unused members
  skipped, names made valid UTF-8, and for ``.tgz`` the CRC-32 check, which decompresses the
  stream a second time ahead of the read.

Prints seconds and the ratio pairsift / plain for each. Target: at most 1.5x for ``.tar`` and
2.2x for ``.tgz`` (the CRC pass is a second decompression; for stored JPEGs it is cheap).
Not collected by pytest (the file name is ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_job  # noqa: E402
from pairsift.pipeline.ingest import discover, read_shard  # noqa: E402


def _shard(samples: int, image_kb: int) -> bytes:
    rng = np.random.default_rng(0)
    side = int((image_kb * 1024 / 1.1) ** 0.5)
    jpegs = []
    for _ in range(64):  # distinct noise, each longer than gzip's 32 KB window: it does not compress
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for i in range(samples):
            jpeg = jpegs[i % len(jpegs)]
            for ext, data in (("jpg", jpeg[:-2] + i.to_bytes(4, "big") + jpeg[-2:]),
                              ("txt", f"a noise picture number {i}".encode()),
                              ("json", json.dumps({"url": f"http://example.com/{i}.jpg", "key": f"{i:06d}"}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _plain(path: Path) -> int:
    n = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for info in tf:
            if info.isfile():
                n += len(tf.extractfile(info).read())
    return n


def _pairsift(path: Path) -> int:
    job = make_job(path, path.parent / "out")
    errors: list[str] = []
    rows = sum(t.num_rows for sh in discover(job.input) for t in read_shard(sh, job.input, 256, errors))
    assert not errors, errors
    return rows


def _best(fn, path: Path, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--image-kb", type=int, default=40)
    args = ap.parse_args()
    raw = _shard(args.samples, args.image_kb)
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "s.tar"
        tar.write_bytes(raw)
        tgz = Path(tmp) / "s.tgz"
        tgz.write_bytes(gzip.compress(raw, compresslevel=6))
        print(f"{args.samples} samples, {len(raw) / 1e6:.0f} MB tar, {tgz.stat().st_size / 1e6:.0f} MB tgz")
        for path, target in ((tar, 1.5), (tgz, 2.2)):
            plain, ours = _best(_plain, path), _best(_pairsift, path)
            ratio = ours / plain
            print(f"{path.name}: plain tarfile {plain:.2f} s, pairsift read_shard {ours:.2f} s, ratio {ratio:.2f}x "
                  f"(target <= {target}x){'' if ratio <= target else '  MISSED'}")


if __name__ == "__main__":
    main()
