"""Issue 12, readers: a property test. Hypothesis generates WebDataset tars and Parquet files
that mix good samples with hostile ones (repeated and non-UTF-8 keys, odd ``.json``, members
over the size caps, GNU sparse members, captions that are not UTF-8, directories, links and
resource forks; gzip'd, truncated, CRC-damaged or altered streams; Parquet with several row
groups, a corrupt page, invalid UTF-8 and Hugging Face image structs) and runs each input set
through the real job runner. Invariants:

- no crash, the job finishes (exit 0);
- every sample ends exactly once in kept ∪ rejected (uids unique; per file, the keys are the
  ones WebDataset's grouping rule gives, :func:`hostile_inputs.group_starts`; a truncated tar
  gives every sample before the cut; a Parquet file gives one row per row of its footer);
- every drop reason is a known one, none is ``error:<stage>`` (no stage raised);
- every kept sample is in a training shard.

CI runs a few examples (``PAIRSIFT_HOSTILE_EXAMPLES``, default 40, about 20 s; no shrinking, no example
database: a failure prints its input). ``PAIRSIFT_HOSTILE_EXAMPLES=200 pytest -s
tests/hostile/test_property_hostile.py`` runs a campaign and prints the table of what it tried.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import make_job
from hostile_inputs import (Member, altered_stored_gzip, bad_crc, corrupt_row_group, group_starts, gzipped,
                            invalid_utf8_strings, jpeg, write_tar)
from pairsift.pipeline.runner import run_job
from pairsift.pipeline.ingest import INGEST_REASONS, safe_text

EXAMPLES = int(os.environ.get("PAIRSIFT_HOSTILE_EXAMPLES", "40"))
CAPS = {"max_image_bytes": 20_000, "max_text_bytes": 300}
STAGES = [{"quality": {"min_side": 8, "max_aspect": 10.0}}, {"exact_dedup": {}}]
KNOWN_REASONS = set(INGEST_REASONS) | {"decode_error", "decompression_bomb", "too_small", "bad_aspect",
                                       "empty_caption", "caption_too_short", "caption_too_long", "exact_dedup"}
STATS: Counter = Counter()  # what the campaign tried, printed at the end

KEYS = st.sampled_from(["a", "a", "a#1", "b", "./c", "sub/d", "caf\udce9", "x y", "k\u00e9", "dup", "n\x7f"])
TAR_NAMES = st.sampled_from(["s.tar", "t\udcff.tar", "u.tgz", "v.tar.gz", "w[1].tar"])


@dataclass
class InputFile:
    name: str
    data: bytes = field(repr=False)
    kind: str  # "tar" | "parquet" | "image" (a file of a folder input)
    damage: str = "none"
    groups: list[tuple[str, int]] = field(default_factory=list)  # tars: (key, first member index)
    header_start: list[int] = field(default_factory=list)
    cut: int | None = None  # truncated plain tars: bytes kept
    rows: int = 0  # parquet: rows in the footer
    table: tuple = field(default=(), repr=False)  # parquet: (table, row group size, snappy), written by _materialise
    caption: str = ""  # folder images: what lies beside them as ``stem.txt``
    corrupt_rows: range = range(0)


# --------------------------------------------------------------------------- strategies


@st.composite
def tar_sample(draw, seed: int) -> list[Member]:
    key = draw(KEYS)
    image = draw(st.sampled_from(["jpg"] * 6 + ["png", "garbage", "empty", "none", "large", "sparse", "two"]))
    caption = draw(st.sampled_from(["good"] * 6 + ["not_utf8", "empty", "none", "large", "bom"]))
    meta = draw(st.sampled_from(["none", "none", "good", "int", "dict", "surrogate", "invalid"]))
    extra = draw(st.sampled_from(["none", "none", "cls", "dir", "fork", "noext", "symlink"]))
    members: list[Member] = []
    if image == "jpg" or image == "two":
        members.append(Member(f"{key}.jpg", jpeg(seed)))
    if image == "png" or image == "two":
        members.append(Member(f"{key}.png", jpeg(seed + 7919)))
    if image == "garbage":
        members.append(Member(f"{key}.webp", draw(st.binary(min_size=1, max_size=64))))
    if image == "empty":
        members.append(Member(f"{key}.jpg", b""))
    if image == "large":
        members.append(Member(f"{key}.jpg", b"\xff\xd8" + bytes(CAPS["max_image_bytes"])))
    if image == "sparse":
        members.append(Member(f"{key}.jpg", b"\xff\xd8" + bytes(1022), kind="sparse", apparent=50 * 2**20))
    text = {"good": f"a photo {seed}".encode(), "not_utf8": b"caf\xe9 \xff", "empty": b"",
            "large": b"w " * CAPS["max_text_bytes"], "bom": b"\xef\xbb\xbfwith a bom"}.get(caption)
    if text is not None:
        members.append(Member(f"{key}.txt", text))
    js = {"good": b'{"url": "http://x/1.jpg"}', "int": b'{"url": 7}', "dict": b'{"url": {"a": 1}}',
          "surrogate": b'{"url": "http://x/\\udc80"}', "invalid": b'{"url": '}.get(meta)
    if js is not None:
        members.append(Member(f"{key}.json", js))
    if extra == "cls":
        members.append(Member(f"{key}.cls", b"3"))
    elif extra == "dir":
        members.append(Member(f"{key}.d", kind="dir"))
    elif extra == "fork":
        members.append(Member(f"._{key.split('/')[-1]}.jpg", b"mac"))
    elif extra == "noext":
        members.append(Member("README", b"not a sample"))
    elif extra == "symlink":
        members.append(Member(f"{key}.gif", kind="symlink"))
    return draw(st.permutations(members)) if draw(st.booleans()) else members


@st.composite
def tar_file(draw, base_seed: int) -> InputFile:
    n = draw(st.integers(1, 7))
    members = [m for i in range(n) for m in draw(tar_sample(base_seed + i))]
    layout = write_tar(members)
    names = [m.name if m.kind in ("file", "sparse") else None for m in members]
    f = InputFile(draw(TAR_NAMES), layout.data, "tar", groups=group_starts(names), header_start=layout.header_start)
    f.damage = draw(st.sampled_from(["none", "none", "gzip", "truncate", "gzip_truncate", "bad_crc", "altered"]))
    if f.damage == "gzip":
        f.data = gzipped(layout.data)
    elif f.damage == "truncate":
        f.cut = int(len(layout.data) * draw(st.floats(0.02, 0.98)))
        f.data = layout.data[: f.cut]
    elif f.damage == "gzip_truncate":
        gz = gzipped(layout.data, level=draw(st.sampled_from([0, 6])))
        f.data = gz[: int(len(gz) * draw(st.floats(0.05, 0.95)))]
    elif f.damage == "bad_crc":
        f.data = bad_crc(gzipped(layout.data))
    elif f.damage == "altered":
        f.data = altered_stored_gzip(layout.data)
    return f


@st.composite
def parquet_file(draw, base_seed: int, index: int) -> InputFile:
    n = draw(st.integers(1, 9))
    images, captions, urls = [], [], []
    for i in range(n):
        kind = draw(st.sampled_from(["jpg"] * 5 + ["garbage", "null", "large"]))
        images.append({"jpg": jpeg(base_seed + i), "garbage": b"\x00junk", "null": None,
                       "large": bytes(CAPS["max_image_bytes"] + 1)}[kind])
        cap = draw(st.sampled_from(["good"] * 5 + ["not_utf8", "null", "large", "empty"]))
        captions.append({"good": f"parquet photo {i}".encode(), "not_utf8": b"\xff\xfe", "null": None,
                         "large": b"x" * (CAPS["max_text_bytes"] + 1), "empty": b""}[cap])
        urls.append(draw(st.sampled_from([None, b"http://x/a.jpg", b"http://x/\xe9.jpg"])))
    as_struct = draw(st.booleans())
    image_col = (pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])) if as_struct
                 else pa.array(images, pa.binary()))
    caption_col = invalid_utf8_strings(captions) if draw(st.booleans()) else pa.array(captions, pa.binary())
    table = pa.table({"image": image_col, "caption": caption_col, "url": invalid_utf8_strings(urls)})
    rg = draw(st.integers(1, 4))
    f = InputFile(f"p{index}.parquet", b"", "parquet", rows=n, table=(table, rg, draw(st.booleans())))
    f.damage = draw(st.sampled_from(["none", "none", "corrupt"]))
    if f.damage == "corrupt":
        groups = -(-n // rg)
        g = draw(st.integers(0, groups - 1))
        f.corrupt_rows = range(g * rg, min(n, (g + 1) * rg))
    return f


@st.composite
def folder_images(draw, base_seed: int) -> list[InputFile]:
    """Image files (some named in bytes that are not UTF-8, some in sub-folders, some with
    glob characters) with caption files that may be missing, not UTF-8, too large or a folder."""
    files = []
    for i in range(draw(st.integers(1, 6))):
        stem = draw(st.sampled_from(["a", "caf\udce9", "x[1]", "sub/c", "d e", "k\u00e9"])) + str(i)
        ext = draw(st.sampled_from(["jpg", "jpg", "png", "JPG", "gif"]))
        image = draw(st.sampled_from(["good"] * 4 + ["garbage", "empty", "large"]))
        data = {"good": jpeg(base_seed + i), "garbage": b"GIF89a junk", "empty": b"",
                "large": bytes(CAPS["max_image_bytes"] + 1)}[image]
        caption = draw(st.sampled_from(["good"] * 4 + ["none", "not_utf8", "large", "folder"]))
        f = InputFile(f"{stem}.{ext}", data, "image")
        f.caption = caption
        files.append(f)
    return files


@st.composite
def input_sets(draw) -> tuple[str, list[InputFile]]:
    fmt = draw(st.sampled_from(["webdataset", "webdataset", "parquet", "folder"]))
    count = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10**6)) * 100
    if fmt == "parquet":
        return fmt, [draw(parquet_file(seed + 10 * i, i)) for i in range(count)]
    if fmt == "folder":
        return fmt, draw(folder_images(seed))
    files = [draw(tar_file(seed + 10 * i)) for i in range(count)]
    for i, f in enumerate(files):  # distinct file names
        stem, dot, ext = f.name.partition(".")
        f.name = f"{stem}{i}{dot}{ext}"
    return fmt, files


# --------------------------------------------------------------------------- the property


def _materialise(files: list[InputFile], folder: Path) -> None:
    folder.mkdir(parents=True)
    for f in files:
        path = folder / f.name
        if f.kind == "parquet":
            table, rg, snappy = f.table
            pq.write_table(table, path, row_group_size=rg, compression="snappy" if snappy else "none")
            if f.damage == "corrupt":
                corrupt_row_group(path, f.corrupt_rows.start // rg)
        elif f.kind == "image":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f.data)
            txt = path.with_name(path.name.rsplit(".", 1)[0] + ".txt")
            if f.caption == "folder":
                txt.mkdir(exist_ok=True)
            elif f.caption != "none":
                txt.write_bytes({"good": b"a folder photo", "not_utf8": b"\xe9t\xe9",
                                 "large": b"y" * (CAPS["max_text_bytes"] + 1)}[f.caption])
        else:
            path.write_bytes(f.data)


def _outputs(out: Path) -> list[dict]:
    rows = []
    for sub in ("metadata", "rejected"):
        for p in sorted((out / sub).glob("*.parquet")):
            rows += pq.read_table(p).to_pylist()
    return rows


def check_file(f: InputFile, rows: list[dict]) -> None:
    """The per-file invariants (see the module docstring). Samples that must be there and
    are not count as ``lost`` in the campaign table before the assertion fails."""
    keys = sorted(r["key"] for r in rows)
    reasons = [r["drop_reason"] for r in rows]
    if f.kind == "image":
        STATS["samples"] += 1
        STATS["lost"] += 0 if rows else 1
        assert keys == [safe_text(f.name.rsplit(".", 1)[0])], "one row per image file"
        if f.caption in ("none", "folder") and f.data and len(f.data) <= CAPS["max_image_bytes"]:
            assert reasons == ["missing_caption"]
        return
    if f.kind == "parquet":
        expected = sorted(str(i) for i in range(f.rows))
        STATS["samples"] += f.rows
        STATS["lost"] += sum((Counter(expected) - Counter(keys)).values())
        assert keys == expected, "one row per row of the footer"
        for r in rows:
            if int(r["key"]) in f.corrupt_rows:
                assert r["drop_reason"] == "source_corrupt"
        return
    expected = [safe_text(k) for k, _ in f.groups]
    STATS["samples"] += len(expected)
    if f.damage in ("none", "gzip"):
        STATS["lost"] += sum((Counter(expected) - Counter(keys)).values())
        assert keys == sorted(expected), "every sample of the tar, once"
        return
    STATS["damaged_samples_not_listed"] += len(expected) - len(rows)
    assert len(rows) <= len(expected) and Counter(keys) <= Counter(expected)
    if f.damage in ("bad_crc", "altered"):
        assert set(reasons) <= {"source_corrupt"}, "nothing from a stream that fails its CRC is kept"
        if f.damage == "bad_crc":
            STATS["lost"] += len(expected) - len(rows)
            assert len(rows) == len(expected)
    if f.damage == "truncate":
        # Sample g is complete once the first header of sample g+1 is read; the one being
        # read at the cut is there too, as source_truncated.
        starts = [f.header_start[i] for _, i in f.groups[1:]]
        complete = sum(1 for s in starts if s + 512 <= f.cut)
        STATS["lost"] += max(0, complete - len(rows))
        assert complete <= len(rows) <= min(complete + 1, len(expected)), (complete, len(rows), f.cut)


def run_and_check(fmt: str, files: list[InputFile], folder: Path) -> None:
    """Write the inputs, run the job, check every invariant. (Kill points — the engine's
    part of issue 12 — would go between run_job and the checks: kill, rerun, then check.)"""
    inp, out = folder / "in", folder / "out"
    _materialise(files, inp)
    STATS["inputs"] += len(files)
    STATS["jobs"] += 1
    STATS[f"jobs:{fmt}"] += 1
    for f in files:
        STATS[f"inputs:{f.kind}:{f.damage}"] += 1
    try:
        result = run_job(make_job(inp, out, stages=STAGES, fmt=fmt, input=CAPS, emit={"shard_size": 8}))
    except BaseException:
        STATS["crashes"] += 1
        raise
    rows = _outputs(out)
    uids = [r["uid"] for r in rows]
    assert len(uids) == len(set(uids)), "a uid twice in kept ∪ rejected"
    assert result.manifest["counts"]["input"] == len(rows)
    reasons = Counter(r["drop_reason"] for r in rows if r["drop_reason"])
    assert set(reasons) <= KNOWN_REASONS, reasons
    STATS.update({f"reason:{k}": v for k, v in reasons.items()})
    by_file: dict[str, list[dict]] = {}
    for r in rows:  # rows by input file, relative to the input folder
        by_file.setdefault(r["source"][len(str(inp)) + 1:], []).append(r)
    for f in files:
        check_file(f, by_file.pop(safe_text(f.name), []))
    assert not by_file, f"rows from no input file: {list(by_file)}"
    kept = [r for r in rows if r["drop_reason"] is None]
    images = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            images += [m.name for m in tf.getmembers() if not m.name.endswith((".txt", ".json"))]
    assert sorted(n.split(".")[0] for n in images) == sorted(r["uid"] for r in kept)
    STATS["kept"] += len(kept)
    STATS["rejected"] += len(rows) - len(kept)


@pytest.fixture(scope="module")
def campaign_report():
    yield STATS
    if STATS:
        table = {k: STATS[k] for k in ("jobs", "inputs", "samples", "kept", "rejected", "lost", "crashes",
                                       "damaged_samples_not_listed")}
        print("\nhostile property campaign:", json.dumps(table))
        print("drop reasons:", json.dumps({k[7:]: v for k, v in sorted(STATS.items()) if k.startswith("reason:")}))
        print("jobs by format:", json.dumps({k[5:]: v for k, v in sorted(STATS.items()) if k.startswith("jobs:")}))
        print("input files by kind and damage:",
              json.dumps({k[7:]: v for k, v in sorted(STATS.items()) if k.startswith("inputs:")}))
        report = os.environ.get("PAIRSIFT_HOSTILE_REPORT")
        if report:
            Path(report).write_text(json.dumps(dict(STATS), indent=2, sort_keys=True))


@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(case=input_sets())
def test_hostile_inputs_nothing_lost_nothing_crashes(ray_session, tmp_path_factory, campaign_report, case):
    fmt, files = case
    folder = tmp_path_factory.mktemp("hostile")
    try:
        run_and_check(fmt, files, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
