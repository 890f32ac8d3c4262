"""Issue 12, readers: hostile input data through ingest. Every test here failed before the
fix its item names (4, 6, 7, 8, 9, 12, 13 and the ``br[1]`` folder), on inputs generated in
``hostile_inputs.py``.

Each runs a real job (or the CLI, for exit codes) and asserts the exit code, that every input
sample ends exactly once in kept ∪ rejected, and the drop reasons.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_job
from hostile_inputs import (Member, altered_stored_gzip, bad_crc, corrupt_row_group, expected_groups, gzipped,
                            invalid_utf8_strings, jpeg, write_tar)
from pairsift.cli import main as cli_main
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.spec import load_job
from pairsift.pipeline.table import make_uid
from pairsift.pipeline.ingest import discover, read_shard

QUALITY = [{"quality": {"min_side": 16}}]


def _pair(key: str, seed: int, caption: str | None = None, **extra: bytes) -> list[Member]:
    members = [Member(f"{key}.jpg", jpeg(seed)), Member(f"{key}.txt", (caption or f"photo {seed}").encode())]
    return members + [Member(f"{key}.{ext}", data) for ext, data in extra.items()]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rows(out: Path) -> list[dict]:
    """kept ∪ rejected, asserting that no uid is in both or twice."""
    rows = []
    for sub in ("metadata", "rejected"):
        for f in sorted((out / sub).glob("*.parquet")):
            rows += pq.read_table(f).to_pylist()
    uids = [r["uid"] for r in rows]
    assert len(uids) == len(set(uids)), "a uid appears twice in kept ∪ rejected"
    return rows


def _source_errors(result) -> list[str]:
    return [e for i in result.manifest["inputs"] for e in i["source_errors"]]


def _shard_members(out: Path) -> list[str]:
    names = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
    return names


def _spec_file(tmp_path: Path, inp: Path, out: Path, fmt: str = "webdataset", stages=None, **input_opts) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "hostile", "input": {"format": fmt, "path": os.fsdecode(inp), **input_opts},
                                    "output": str(out), "stages": stages or QUALITY}))
    return spec


def _read(inp: Path, fmt: str = "webdataset", **input_opts) -> tuple[list[dict], list[str]]:
    job = make_job(inp, inp.parent / "unused", fmt=fmt, input=input_opts)
    rows, errors = [], []
    for shard in discover(job.input):
        for t in read_shard(shard, job.input, 8, errors):
            rows += t.to_pylist()
    return rows, errors


# --------------------------------------------------------------------------- item 4


def test_item4_uids_unique_by_construction(ray_session, tmp_path):
    """Keys ``a``, ``a#1``, ``a``: the repeat of ``a`` used to become ``a#1`` and collide
    with the real ``a#1`` (2 uids for 3 samples, duplicate members in the training tar)."""
    members = _pair("a", 1) + _pair("a#1", 2) + _pair("a", 3)
    _write(tmp_path / "in" / "s.tar", write_tar(members).data)
    out = tmp_path / "out"
    run_job(make_job(tmp_path / "in", out, stages=QUALITY))
    rows = _rows(out)
    assert sorted(r["key"] for r in rows) == ["a", "a", "a#1"]
    assert all(r["drop_reason"] is None for r in rows)
    uids = {r["uid"] for r in rows}
    assert uids == {make_uid("s.tar", "a"), make_uid("s.tar", "a#1"), make_uid("s.tar", "a", 1)}
    members = _shard_members(out)
    assert len(members) == len(set(members)) == 9  # jpg, txt, json of 3 samples
    # The repeat domain is separate from every spelling of a key, and from a NUL in the path.
    assert make_uid("s.tar", "a", 1) not in {make_uid("s.tar", k) for k in ("a#1", "a\x001", "a1", "a")}
    assert make_uid("x\x00y", "z") != make_uid("x", "y\x00z")


def test_item4_folder_and_parquet_uids_unique(ray_session, tmp_path):
    photos = tmp_path / "photos"
    for name, seed in (("x.jpg", 1), ("x.png", 2), ("x#1.jpg", 3)):
        _write(photos / name, jpeg(seed))
    (photos / "x.txt").write_text("the x caption")
    (photos / "x#1.txt").write_text("the x#1 caption")
    out = tmp_path / "out"
    run_job(make_job(photos, out, fmt="folder", stages=QUALITY))
    rows = _rows(out)
    assert sorted(r["key"] for r in rows) == ["x", "x", "x#1"]
    assert {r["uid"] for r in rows} == {make_uid("x.jpg", "x"), make_uid("x.png", "x"), make_uid("x#1.jpg", "x#1")}


# --------------------------------------------------------------------------- item 6


def test_item6_json_url_of_any_type_is_no_crash(ray_session, tmp_path):
    jsons = {
        "n": b'{"url": 5}',
        "o": b'{"url": {"a": 1}}',
        "l": b'{"url": [1, 2]}',
        "s": b'{"url": "http://x/\\ud800.jpg"}',  # a lone surrogate, as JSON allows
        "i": b'{"url": "http://x/ok.jpg"',  # invalid JSON
        "d": b"[" * 100000,  # nesting deeper than Python's recursion limit
        "g": b'{"url": "http://x/good.jpg"}',
    }
    members = [m for i, (k, j) in enumerate(jsons.items()) for m in _pair(k, i, json=j)]
    _write(tmp_path / "in" / "s.tar", write_tar(members).data)
    out = tmp_path / "out"
    result = run_job(make_job(tmp_path / "in", out, stages=QUALITY))
    rows = {r["key"]: r for r in _rows(out)}
    assert set(rows) == set(jsons)
    assert all(r["drop_reason"] is None for r in rows.values()), "the url is metadata: the pair is kept"
    assert {k: r["url"] for k, r in rows.items()} == {
        "n": None, "o": None, "l": None, "s": "http://x/\\ud800.jpg", "i": None, "d": None, "g": "http://x/good.jpg"}
    errors = _source_errors(result)
    assert any("1 sample(s): .json url is a int" in e for e in errors), errors
    assert any(".json url is a dict" in e for e in errors) and any(".json url is a list" in e for e in errors)
    # The training tar's .json carries the url as stored.
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tf:
        records = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert sorted(r["url"] or "" for r in records) == sorted(r["url"] or "" for r in rows.values())


# --------------------------------------------------------------------------- item 7


def test_item7_non_utf8_names_are_kept_escaped(ray_session, tmp_path):
    """A tar file name, tar member names and an image file name that are not UTF-8: uids hash
    the raw names; key and source hold them with \\xNN escapes; the job exits 0."""
    inp = tmp_path / "in"
    tar_name = os.fsdecode(b"s\xff.tar")
    members = _pair(os.fsdecode(b"caf\xe9"), 1) + _pair(os.fsdecode(b"sub/\xc3\x28"), 2) + _pair("plain", 3)
    _write(inp / tar_name, write_tar(members).data)
    out = tmp_path / "out"
    assert cli_main(["run", str(_spec_file(tmp_path, inp, out))]) == 0
    rows = {r["key"]: r for r in _rows(out)}
    assert set(rows) == {"caf\\xe9", "sub/\\xc3(", "plain"}
    assert all(r["drop_reason"] is None for r in rows.values())
    assert rows["caf\\xe9"]["uid"] == make_uid(tar_name, os.fsdecode(b"caf\xe9"))
    assert rows["plain"]["source"].endswith("/s\\xff.tar")
    for r in rows.values():  # valid UTF-8 all the way to the training tar's .json
        r["source"].encode("utf-8")
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tf:
        keys = sorted(json.loads(tf.extractfile(m).read())["key"] for m in tf.getmembers() if m.name.endswith(".json"))
    assert keys == sorted(rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 3

    photos = tmp_path / "photos"
    _write(photos / os.fsdecode(b"im\xff.jpg"), jpeg(4))
    _write(photos / os.fsdecode(b"im\xff.txt"), b"a picture with a latin-1 name")
    out2 = tmp_path / "out2"
    assert cli_main(["run", str(_spec_file(tmp_path, photos, out2, fmt="folder"))]) == 0
    (row,) = _rows(out2)
    assert (row["key"], row["drop_reason"]) == ("im\\xff", None)
    assert row["uid"] == make_uid(os.fsdecode(b"im\xff.jpg"), os.fsdecode(b"im\xff"))


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("columns,bad", [
    ({"image": pa.array([jpeg(1)]), "caption": pa.array([7])}, "caption"),
    ({"image": pa.array([jpeg(1)]), "caption": pa.array([["a", "list"]])}, "caption"),
    ({"image": pa.array([12]), "caption": pa.array(["c"])}, "image"),
    ({"image": pa.array([list(jpeg(1))], pa.list_(pa.uint8())), "caption": pa.array(["c"])}, "image"),
    ({"image": pa.array([jpeg(1)]), "caption": pa.array(["c"]), "url": pa.array([3])}, "url"),
])
def test_item8_parquet_column_of_wrong_type_is_exit_2_naming_it(tmp_path, capsys, columns, bad):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"image": pa.array([jpeg(2)]), "caption": pa.array(["fine"])}), inp / "a.parquet")
    pq.write_table(pa.table(columns), inp / "b.parquet")
    out = tmp_path / "out"
    assert cli_main(["run", str(_spec_file(tmp_path, inp, out, fmt="parquet"))]) == 2
    err = capsys.readouterr().err
    assert f"column {bad!r} of" in err and "b.parquet" in err, err
    assert not out.exists(), "nothing written"


def test_item8_parquet_with_a_column_twice_is_exit_2(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.Table.from_arrays([pa.array([jpeg(1)]), pa.array(["a"]), pa.array(["b"])],
                                        names=["image", "caption", "caption"]), inp / "a.parquet")
    out = tmp_path / "out"
    assert cli_main(["run", str(_spec_file(tmp_path, inp, out, fmt="parquet"))]) == 2
    assert "more than one column named 'caption'" in capsys.readouterr().err
    assert not out.exists()


def test_item8_keep_column_with_two_types_is_exit_2(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"image": [jpeg(1)], "caption": ["a"], "score": pa.array([0.5])}), inp / "a.parquet")
    pq.write_table(pa.table({"image": [jpeg(2)], "caption": ["b"], "score": pa.array(["high"])}), inp / "b.parquet")
    with pytest.raises(ConfigError, match=r"column 'score' is double in .*a\.parquet but string in .*b\.parquet"):
        discover(make_job(inp, tmp_path / "out", fmt="parquet", input={"keep_columns": ["score"]}).input)


def test_item8_parquet_text_that_is_not_utf8_is_a_per_sample_drop(ray_session, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({
        "image": [jpeg(1), jpeg(2), jpeg(3), jpeg(4)],
        "caption": invalid_utf8_strings([b"fine", b"\xff\xfe broken", None, b"\xef\xbb\xbfkept BOM"]),
        "url": invalid_utf8_strings([b"http://x/a", b"http://x/\xe9", None, b"http://x/d"]),
    }), inp / "a.parquet")
    out = tmp_path / "out"
    run_job(make_job(inp, out, fmt="parquet", stages=QUALITY))
    rows = {r["key"]: r for r in _rows(out)}
    assert {k: r["drop_reason"] for k, r in rows.items()} == {
        "0": None, "1": "caption_not_utf8", "2": "missing_caption", "3": None}
    assert rows["1"]["url"] == "http://x/\\xe9"


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("compression", ["snappy", "none"])
def test_item9_corrupt_parquet_page_footer_intact(ray_session, tmp_path, compression):
    """Row group 1 of 3 has a corrupt page: its 4 rows become source_corrupt rows with their
    uids (the footer says how many); the others go through, kept columns and all."""
    inp = tmp_path / "in"
    inp.mkdir()
    n = 12
    pq.write_table(pa.table({"image": [jpeg(i) for i in range(n)], "caption": [f"photo {i}" for i in range(n)],
                             "score": pa.array([float(i) for i in range(n)])}),
                   inp / "a.parquet", row_group_size=4, compression=compression)
    corrupt_row_group(inp / "a.parquet", 1)
    out = tmp_path / "out"
    result = run_job(make_job(inp, out, fmt="parquet", stages=QUALITY, input={"keep_columns": ["score"]}))
    rows = {int(r["key"]): r for r in _rows(out)}
    assert sorted(rows) == list(range(n))
    assert {k: r["drop_reason"] for k, r in rows.items()} == {k: ("source_corrupt" if 4 <= k < 8 else None) for k in range(n)}
    assert {k: r["uid"] for k, r in rows.items()} == {k: make_uid("a.parquet", str(k)) for k in range(n)}
    assert [rows[k]["score"] for k in range(n)] == [float(k) if not 4 <= k < 8 else None for k in range(n)]
    (error,) = _source_errors(result)
    assert "row group 1 (rows 4-7) could not be read" in error


# --------------------------------------------------------------------------- item 12


def test_item12_gzip_bad_crc_rejects_the_stream_and_says_so(ray_session, tmp_path):
    members = [m for i in range(4) for m in _pair(f"k{i}", i)]
    raw = write_tar(members).data
    inp = tmp_path / "in"
    _write(inp / "altered.tgz", altered_stored_gzip(raw))  # one JPEG byte flipped, CRC not updated
    _write(inp / "trailer.tgz", bad_crc(gzipped(raw)))  # data intact, CRC trailer wrong
    _write(inp / "sound.tgz", gzipped(raw))
    _write(inp / "members.tgz", gzipped(raw[:3000]) + gzipped(raw[3000:]) + bytes(700))  # 2 gzip members, padding
    truncated = gzipped(write_tar([m for i in range(4, 10) for m in _pair(f"k{i}", i)]).data, level=0)
    _write(inp / "truncated.tgz", truncated[: len(truncated) * 2 // 3])
    out = tmp_path / "out"
    result = run_job(make_job(inp, out, stages=QUALITY))
    rows = _rows(out)
    by_source = {}
    for r in rows:
        by_source.setdefault(Path(r["source"]).name, []).append(r["drop_reason"])
    assert by_source["altered.tgz"] == by_source["trailer.tgz"] == ["source_corrupt"] * 4
    assert by_source["sound.tgz"] == by_source["members.tgz"] == [None] * 4
    cut = by_source["truncated.tgz"]  # complete samples kept, the interrupted one flagged
    assert cut[-1] == "source_truncated" and set(cut[:-1]) == {None} and len(cut) >= 3
    errors = {Path(i["path"]).name: i["source_errors"] for i in result.manifest["inputs"]}
    assert "incorrect data check" in errors["altered.tgz"][0] and "source_corrupt" in errors["altered.tgz"][0]
    assert "fails its integrity check" in errors["trailer.tgz"][0]
    assert errors["sound.tgz"] == errors["members.tgz"] == []
    assert errors["truncated.tgz"] and "integrity" not in errors["truncated.tgz"][0]
    assert len(_shard_members(out)) == 3 * (8 + len(cut) - 1)  # no altered JPEG reaches a training shard


# --------------------------------------------------------------------------- item 13


def _peak_read(inp: Path, fmt: str = "webdataset", **input_opts) -> tuple[list[dict], list[str], int]:
    tracemalloc.start()
    try:
        rows, errors = _read(inp, fmt, **input_opts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rows, errors, peak


def test_item13_sparse_member_is_dropped_unread(tmp_path):
    """A GNU sparse member of 1.5 GiB apparent size in a ~20 KB tar."""
    members = _pair("a", 1) + [Member("b.jpg", b"\xff\xd8" + b"\0" * 4094, kind="sparse", apparent=3 * 2**29),
                               Member("b.txt", b"a sparse bomb")] + _pair("c", 2)
    data = write_tar(members).data
    assert len(data) < 64 * 1024
    _write(tmp_path / "in" / "sparse.tar", data)
    rows, errors, peak = _peak_read(tmp_path / "in")
    assert [(r["key"], r["drop_reason"]) for r in rows] == [("a", None), ("b", "member_too_large"), ("c", None)]
    assert peak < 16 * 2**20, f"reading took {peak / 2**20:.0f} MiB"


def test_item13_gzip_bomb_and_huge_caption_are_dropped_unread(tmp_path):
    big = 96 * 2**20  # over the 64 MiB image cap, ~100 KB gzip'd
    bomb = _pair("a", 1) + [Member("b.png", b"\0" * big), Member("b.txt", b"zeros")] + _pair("c", 2)
    _write(tmp_path / "in" / "bomb.tgz", gzipped(write_tar(bomb).data, level=9))
    words = b"word " * (10 * 2**20)  # a 50 MB caption
    _write(tmp_path / "in" / "caption.tar", write_tar([Member("d.jpg", jpeg(3)), Member("d.txt", words)]
                                                      + _pair("e", 4, json=b'{"url": "' + b"u" * (2 * 2**20) + b'"}')
                                                      + _pair("f", 5)).data)
    del bomb, words
    rows, errors, peak = _peak_read(tmp_path / "in")
    assert [(r["key"], r["drop_reason"]) for r in rows] == [
        ("a", None), ("b", "member_too_large"), ("c", None),
        ("d", "member_too_large"), ("e", "member_too_large"), ("f", None)]
    assert not errors
    assert peak < 16 * 2**20, f"reading took {peak / 2**20:.0f} MiB"


def test_item13_long_name_bomb_is_refused_unread(tmp_path):
    """A GNU long-name header claiming 96 MiB (tarfile reads such headers whole) ends the read
    as a damaged tar: the samples before it are kept, nothing after it is allocated."""
    bomb = io.BytesIO()
    head = tarfile.TarInfo("././@LongLink")
    head.type, head.size = tarfile.GNUTYPE_LONGNAME, 96 * 2**20
    bomb.write(head.tobuf(tarfile.GNU_FORMAT))
    bomb.write(b"n" * head.size)
    first = write_tar(_pair("a", 1))
    data = first.data[: first.data_end[-1]] + bomb.getvalue() + write_tar(_pair("b", 2)).data
    _write(tmp_path / "in" / "longname.tgz", gzipped(data, level=1))
    del bomb, data
    rows, errors, peak = _peak_read(tmp_path / "in")
    assert [(r["key"], r["drop_reason"]) for r in rows] == [("a", "source_truncated")]
    assert "an extended header of 100663296 bytes" in errors[0]
    assert peak < 16 * 2**20, f"reading took {peak / 2**20:.0f} MiB"


def test_item13_caps_are_configurable_for_every_reader(ray_session, tmp_path):
    small, large = jpeg(1, size=(32, 32)), jpeg(2, size=(400, 400))
    caps = {"max_image_bytes": (len(small) + len(large)) // 2, "max_text_bytes": 64}
    tar = _write(tmp_path / "tar" / "s.tar", write_tar(
        _pair("small", 1) + [Member("large.jpg", large), Member("large.txt", b"a large one")]
        + [Member("wordy.jpg", jpeg(3)), Member("wordy.txt", b"w" * 65)]).data)
    photos = tmp_path / "photos"
    _write(photos / "small.jpg", small)
    _write(photos / "small.txt", b"small")
    _write(photos / "large.jpg", large)
    _write(photos / "large.txt", b"large")
    _write(photos / "wordy.jpg", jpeg(3))
    _write(photos / "wordy.txt", b"w" * 65)
    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    pq.write_table(pa.table({"image": [small, large, jpeg(3)], "caption": ["small", "large", "w" * 65]}),
                   pqdir / "a.parquet")
    for inp, fmt in ((tar.parent, "webdataset"), (photos, "folder"), (pqdir, "parquet")):
        out = tmp_path / f"out-{fmt}"
        run_job(make_job(inp, out, fmt=fmt, stages=[{"quality": {"min_side": 16}}], input=caps))
        reasons = sorted(r["drop_reason"] or "kept" for r in _rows(out))
        assert reasons == ["kept", "member_too_large", "member_too_large"], (fmt, reasons)
    with pytest.raises(ConfigError, match="max_image_bytes"):
        make_job(tar.parent, tmp_path / "x", input={"max_image_bytes": 0})


# --------------------------------------------------------------------------- smaller


def test_folder_named_like_a_glob_is_taken_literally(ray_session, tmp_path):
    base = tmp_path / "data"
    _write(base / "br[1]" / "s.tar", write_tar(_pair("a", 1)).data)
    _write(base / "br1" / "other.tar", write_tar(_pair("z", 9)).data)  # what the glob br[1] would match
    spec = tmp_path / "jobs" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({"name": "br", "input": {"format": "webdataset", "path": "../data/br[1]"},
                                    "output": "../out", "stages": QUALITY}))
    job = load_job(spec)
    assert job.input.path == str(base / "br[1]")
    (shard,) = discover(job.input)
    assert shard.rel == "s.tar"
    run_job(job)
    assert [r["key"] for r in _rows(tmp_path / "out")] == ["a"]
    # A path that does not exist is a glob, with glob rules ([1] is a character class).
    assert [s.rel for s in discover(make_job(base / "br[1]" / "*.tar", tmp_path / "o2").input)] == ["br1/other.tar"]
    assert [s.rel for s in discover(make_job(base / "*" / "s.tar", tmp_path / "o2").input)] == ["br[1]/s.tar"]


def test_folder_input_given_as_glob_or_single_file(ray_session, tmp_path):
    photos = tmp_path / "photos"
    for i, name in enumerate(("red", "blue")):
        _write(photos / f"{name}.jpg", jpeg(i))
        _write(photos / f"{name}.txt", f"a {name} one".encode())
    out = tmp_path / "out"
    run_job(make_job(photos / "*.jpg", out, fmt="folder", stages=QUALITY))
    assert sorted((r["key"], r["drop_reason"]) for r in _rows(out)) == [("blue", None), ("red", None)]
    rows, _ = _read(photos / "red.jpg", fmt="folder")
    assert [(r["key"], r["caption"]) for r in rows] == [("red", "a red one")]


def test_pipes_and_device_links_are_not_input_files(ray_session, tmp_path):
    photos = tmp_path / "photos"
    _write(photos / "ok.jpg", jpeg(1))
    _write(photos / "ok.txt", b"fine")
    os.mkfifo(photos / "pipe.jpg")  # reading it would block for ever
    os.symlink("/dev/zero", photos / "zero.jpg")  # reading it would never end
    os.symlink("/dev/zero", photos / "ok2.txt")
    _write(photos / "ok2.jpg", jpeg(2))
    rows, errors = _read(photos, fmt="folder")
    assert [(r["key"], r["drop_reason"]) for r in rows] == [("ok", None), ("ok2", "missing_caption")]
    assert any("ok2.txt: not a regular file" in e for e in errors)


def test_expected_groups_oracle_matches_the_reader(tmp_path):
    """The property test's oracle agrees with the reader on a fixed hostile member list."""
    names = ["a.jpg", "a.txt", "a.jpg", "b.txt", "._c.jpg", "noext", "./b.cls", "b.jpg", "sub/x.y.png"]
    layout = write_tar([Member(n, jpeg(i) if n.endswith(("jpg", "png")) else b"t") for i, n in enumerate(names)]
                       + [Member("d", kind="dir"), Member("l.jpg", kind="symlink")])
    _write(tmp_path / "in" / "s.tar", layout.data)
    rows, _ = _read(tmp_path / "in")
    assert [r["key"] for r in rows] == expected_groups(names) == ["a", "a", "b", "sub/x"]
