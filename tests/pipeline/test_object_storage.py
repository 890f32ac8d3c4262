"""s3:// input and output end to end, against moto's S3-compatible server on 127.0.0.1.

The job runs in a subprocess (`python -m pairsift.cli run`) that starts its own local Ray:
credentials and the endpoint reach every Ray worker through the environment it inherits
(botocore and s3fs read ``AWS_ENDPOINT_URL_S3``). The session's in-process Ray
(``ray_session``) would not see them: its workers started before this test set them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml

from pairsift.samplepool import pool_samples

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "pairsift-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server in a thread, a bucket, and the environment that points at them."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for boto3 / s3fs in this process (the assertions)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _input_uids(folder) -> list[str]:
    """The uids ingest gives the local pool: an s3:// copy must give the same ones."""
    from pairsift.pipeline.spec import InputSpec
    from pairsift.pipeline.ingest import discover, read_shard

    spec = InputSpec(format="webdataset", path=str(folder))
    return [u for sh in discover(spec) for t in read_shard(sh, spec, 256, []) for u in t.column("uid").to_pylist()]


def test_s3_input_and_output_end_to_end(s3_env, sample_pool, tmp_path):
    import s3fs

    client = boto3.client("s3")
    tars = sorted(sample_pool.glob("*.tar"))
    assert tars
    for p in tars:
        client.upload_file(str(p), BUCKET, f"pool/{p.name}")

    out = f"s3://{BUCKET}/out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "s3", "seed": 0,
                                   "input": {"format": "webdataset", "path": f"s3://{BUCKET}/pool"},
                                   "output": out, "stages": [{"quality": {}}, {"exact_dedup": {}}]}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    env.update(s3_env, PAIRSIFT_PROGRESS="0", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "pairsift.cli", "run", str(job), "--num-cpus", "2"]

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "78 pairs in, 73 kept, 5 rejected" in r.stdout
    assert list(tmp_path.iterdir()) == [job], "nothing is written locally"

    fs = s3fs.S3FileSystem()  # reads the same environment
    root = f"{BUCKET}/out"
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    assert manifest["counts"]["input"] == len(pool_samples()) == 78
    assert (manifest["counts"]["kept"], manifest["counts"]["rejected"]) == (73, 5)
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://{BUCKET}/pool/{p.name}" for p in tars]

    shards = fs.glob(f"{root}/shards/*.tar")
    metadata = fs.glob(f"{root}/metadata/*.parquet")
    rejected = fs.glob(f"{root}/rejected/*.parquet")
    assert shards and metadata and len(rejected) == len(tars)
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(p.rsplit("/", 1)[1] for p in shards)

    kept = [u for p in metadata for u in pq.read_table(p, filesystem=fs).column("uid").to_pylist()]
    rej_table = [pq.read_table(p, filesystem=fs) for p in rejected]
    dropped = [u for t in rej_table for u in t.column("uid").to_pylist()]
    assert sorted(r for t in rej_table for r in t.column("drop_reason").to_pylist()) == [
        "bad_aspect", "decode_error", "empty_caption", "exact_dedup", "too_small"]
    # Every input uid exactly once in kept ∪ rejected, and the same uids as the local pool
    # (uids hash the path relative to the input root, not the URL).
    assert len(kept) == 73 and len(dropped) == 5 and not set(kept) & set(dropped)
    assert sorted(kept + dropped) == sorted(_input_uids(sample_pool))

    in_tars = set()
    for p in shards:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(p))) as tf:
            in_tars |= {m.name.rsplit(".", 1)[0] for m in tf.getmembers()}
    assert in_tars == set(kept)

    everything = fs.find(root)
    assert not [p for p in everything if ".tmp-" in p], "temporary objects left behind"
    assert not fs.exists(f"{root}/report.html")  # the report is local-only

    # A rerun commits nothing new: every phase and emit were committed.
    # (Objects are compared by LastModified: a rewrite, even of the same bytes, changes it.)
    before = {p: fs.info(p)["LastModified"] for p in everything if "/_work/" not in p}
    # (--output with a URL: the CLI must not make it an absolute local path.)
    r2 = subprocess.run(cmd + ["--output", out], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    fs.invalidate_cache()
    skipped = [line for line in r2.stdout.splitlines() if "committed earlier, skipped" in line]
    assert len(skipped) == len(manifest["timings"]["phases"]) == 3, r2.stdout  # 2 phases + emit
    after = {p: fs.info(p)["LastModified"] for p in fs.find(root) if "/_work/" not in p}
    assert after.keys() == before.keys()
    assert {p: e for p, e in after.items() if not p.endswith("manifest.json")} == \
        {p: e for p, e in before.items() if not p.endswith("manifest.json")}

    # Local-only commands say so instead of failing on a path.
    r3 = subprocess.run([sys.executable, "-m", "pairsift.cli", "stats", out], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert r3.returncode == 2 and "reads a local output folder" in r3.stderr, r3.stderr
