"""The README's first command, as a newcomer runs it: make the pool, run the job, query it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import REPO


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pairsift.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_quickstart_job_end_to_end(tmp_path):
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "quickstart.yaml", tmp_path / "jobs")
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
    r = _cli("stats", str(out), cwd=tmp_path)
    assert r.returncode == 0 and "exact_dedup" in r.stdout and "(kept)" in r.stdout
    # A rerun finds everything committed and changes nothing.
    before = (out / "shards" / "000000.tar").read_bytes()
    r = _cli("run", "jobs/quickstart.yaml", cwd=tmp_path)
    assert r.returncode == 0 and "committed earlier, skipped" in r.stdout
    assert (out / "shards" / "000000.tar").read_bytes() == before
