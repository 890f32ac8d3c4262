"""``emit.caption_policy``: which text each training sample's ``.txt`` holds (original alt
text, recaption, or a per-sample Recap-DataComp-style mix), with both in the ``.json``."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairsift.pipeline.emit import CaptionPolicy, EmitTask, Slice, write_emit_shard
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.spec import parse_job

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16  # emit passes JPEG bytes through without decoding


def test_policies_pick_per_sample_and_fall_back_to_the_original():
    uids = [f"{i:032x}" for i in range(4000)]
    assert CaptionPolicy().choose(uids[0], "alt", "recap") == ("alt", "original")
    assert CaptionPolicy("recaption").choose(uids[0], "alt", "recap") == ("recap", "recaption")
    assert CaptionPolicy("recaption").choose(uids[0], "alt", None) == ("alt", "original")  # generation failed
    mix = CaptionPolicy("mix", p_original=0.2, seed=0)
    picks = [mix.choose(u, "alt", "recap")[1] for u in uids]
    share = picks.count("original") / len(picks)
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / len(uids)) ** 0.5  # within 4 sigma of p
    assert picks == [mix.choose(u, "alt", "recap")[1] for u in uids]  # deterministic
    other_seed = [CaptionPolicy("mix", 0.2, seed=1).choose(u, "alt", "recap")[1] for u in uids]
    assert other_seed != picks
    assert {CaptionPolicy("mix", 0.0).choose(u, "a", "r")[1] for u in uids[:100]} == {"recaption"}
    assert {CaptionPolicy("mix", 1.0).choose(u, "a", "r")[1] for u in uids[:100]} == {"original"}
    # Several rewrites (LaCLIP): one of them per sample, chosen by hash, failed ones skipped.
    chosen = Counter(CaptionPolicy("recaption").choose(u, "alt", ["r0", None, "r2", "r3"])[0] for u in uids)
    assert set(chosen) == {"r0", "r2", "r3"} and min(chosen.values()) > 1200


def _work_shard(path, recaption_type=pa.string(), recaptions=None) -> int:
    n = 6
    recaptions = recaptions or [f"recaption {i}" if i != 4 else None for i in range(n)]
    table = pa.table({
        "uid": [f"{i:032x}" for i in range(n)],
        "caption": [f"alt text {i}" for i in range(n)],
        "image": [JPEG] * n,
        "drop_reason": pa.nulls(n, pa.string()),
        "recaption": pa.array(recaptions, recaption_type),
        "recaption_error": [None if r else "timeout: no answer" for r in recaptions],
    })
    pq.write_table(table, path)
    return n


def _read_tar(path) -> dict[str, dict]:
    with tarfile.open(path) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    return {name[:-4]: {"txt": data.decode(), "json": json.loads(members[name[:-4] + ".json"])}
            for name, data in members.items() if name.endswith(".txt")}


@pytest.mark.parametrize("policy", ["original", "recaption", "mix"])
def test_write_emit_shard_puts_the_chosen_text_in_txt_and_both_in_json(tmp_path, policy):
    n = _work_shard(tmp_path / "work.parquet")
    choice = CaptionPolicy(policy, p_original=0.5, seed=3)
    write_emit_shard(str(tmp_path / "out"), EmitTask(0, (Slice(str(tmp_path / "work.parquet"), 0, n),)), choice)
    samples = _read_tar(tmp_path / "out" / "shards" / "000000.tar")
    meta = pq.read_table(tmp_path / "out" / "metadata" / "000000.parquet").to_pylist()
    assert len(samples) == len(meta) == n
    for row in meta:
        s = samples[row["uid"]]
        assert s["json"]["caption"] == row["caption"] and s["json"]["recaption"] == row["recaption"]
        expect, source = choice.choose(row["uid"], row["caption"], row["recaption"])
        assert s["txt"] == expect
        if policy == "original":
            assert "text_source" not in row and "text_source" not in s["json"]  # as before the policy
        else:
            assert row["text_source"] == s["json"]["text_source"] == source
    if policy == "recaption":
        assert [samples[r["uid"]]["txt"] for r in meta] == [f"recaption {i}" if i != 4 else "alt text 4"
                                                          for i in range(n)]


def test_list_recaptions_emit_one_rewrite(tmp_path):
    rewrites = [[f"rewrite {i}.{k}" for k in range(3)] for i in range(6)]
    n = _work_shard(tmp_path / "work.parquet", pa.list_(pa.string()), rewrites)
    write_emit_shard(str(tmp_path / "out"), EmitTask(0, (Slice(str(tmp_path / "work.parquet"), 0, n),)),
                     CaptionPolicy("recaption"))
    samples = _read_tar(tmp_path / "out" / "shards" / "000000.tar")
    for s in samples.values():
        assert s["txt"] in s["json"]["recaption"] and len(s["json"]["recaption"]) == 3


def test_spec_refuses_a_policy_without_recaptions_and_keeps_old_fingerprints(tmp_path):
    raw = {"name": "t", "input": {"format": "webdataset", "path": str(tmp_path)}, "output": str(tmp_path / "o"),
           "stages": [{"quality": {}}]}
    with pytest.raises(ConfigError, match="emit.caption_policy: 'mix' needs a stage writing the 'recaption'"):
        parse_job({**raw, "emit": {"caption_policy": "mix"}})
    with pytest.raises(ConfigError, match="emit.caption_policy"):
        parse_job({**raw, "emit": {"caption_policy": "everything"}})
    with pytest.raises(ConfigError, match="emit.p_original"):
        parse_job({**raw, "emit": {"p_original": 1.5}})
    plain = parse_job(raw)
    explicit = parse_job({**raw, "emit": {"caption_policy": "original", "p_original": 0.3}})
    assert plain.fingerprint() == explicit.fingerprint()  # specs written before the policy still resume
    recap = [{"recaption": {"mode": "rewrite", "backend": "openai", "model": "m", "endpoint": "http://h/v1"}}]
    a = parse_job({**raw, "stages": recap, "emit": {"caption_policy": "mix", "p_original": 0.3}})
    b = parse_job({**raw, "stages": recap, "emit": {"caption_policy": "mix", "p_original": 0.4}})
    assert a.fingerprint() != b.fingerprint()
