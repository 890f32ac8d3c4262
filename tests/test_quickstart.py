"""The README's first command, as a newcomer runs it: make the pool, run the job, query it.

The quickstart scores with ViT-B-32 and real weights, downloaded on first run; here (no network)
the spec's copy points ``clip_score`` at a tiny open_clip model made on the spot instead.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

from clip_tiny import write_tiny_clip
from conftest import REPO


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pairsift.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_quickstart_job_end_to_end(tmp_path):
    (tmp_path / "jobs").mkdir()
    spec = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    (clip,) = [s["clip_score"] for s in spec["stages"] if "clip_score" in s]
    assert (clip["model"], clip["pretrained"]) == ("ViT-B-32", "laion2b_s34b_b79k")
    clip["model"], clip["pretrained"] = write_tiny_clip(tmp_path / "models")
    (tmp_path / "jobs" / "quickstart.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert _cli("sample-pool", "data/quickstart", cwd=tmp_path).returncode == 0
    r = _cli("run", "jobs/quickstart.yaml", "--num-cpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "55 pairs in, 50 kept, 5 rejected" in r.stdout
    out = tmp_path / "out" / "quickstart"
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["stage"]: s for s in manifest["counts"]["stages"]}
    assert stages["quality"]["reasons"] == {"bad_aspect": 1, "decode_error": 1, "empty_caption": 1, "too_small": 1}
    assert stages["exact_dedup"]["dropped"] == 1
    assert manifest["shards"][0]["samples"] == 50 and manifest["versions"]["pairsift"]
    assert stages["clip_score"]["dropped"] == 0  # score only
    meta = pq.read_table(out / "metadata")
    assert meta.column("clip_score").null_count == 0 and meta.column("image_emb").null_count == 0
    r = _cli("stats", str(out), cwd=tmp_path)
    assert r.returncode == 0 and "exact_dedup" in r.stdout and "(kept)" in r.stdout
    assert "clip_score" in r.stdout.split("score summaries")[1]
    # A rerun finds everything committed and changes nothing.
    before = (out / "shards" / "000000.tar").read_bytes()
    r = _cli("run", "jobs/quickstart.yaml", cwd=tmp_path)
    assert r.returncode == 0 and "committed earlier, skipped" in r.stdout
    assert (out / "shards" / "000000.tar").read_bytes() == before
