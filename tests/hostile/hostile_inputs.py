"""Generators of hostile inputs (issue 12, readers): WebDataset tars with repeated and
non-UTF-8 keys, odd ``.json``, oversized and GNU sparse members, gzip streams with bad CRCs,
truncated files; Parquet files with invalid UTF-8, oversized cells and corrupt pages behind an
intact footer. Everything is built here, byte by byte where Python's writers refuse.

Also the oracle the property test checks against: :func:`expected_groups` is WebDataset's
grouping rule (a sample is a run of members with one key; a key change or a repeated extension
starts the next one), applied to the member list as written.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def jpeg(seed: int, size=(72, 72)) -> bytes:
    """A small noise JPEG; different seeds give different bytes (exact_dedup keeps them all)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


# --------------------------------------------------------------------------- tars


@dataclass
class Member:
    """One tar entry: a regular file unless ``kind`` says otherwise. ``name`` may hold
    surrogates (bytes that are not UTF-8, written raw); ``apparent`` > 0 makes a GNU sparse
    member of that apparent size whose stored data is ``data``."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file | dir | symlink | sparse
    apparent: int = 0


@dataclass
class TarLayout:
    """Where each member's header and data lie in the written (uncompressed) tar."""

    data: bytes
    header_start: list[int] = field(default_factory=list)
    data_end: list[int] = field(default_factory=list)


def sparse_header(name: str, apparent: int, stored: int) -> bytes:
    """A GNU "old sparse" header (type ``S``): one data region of ``stored`` bytes at the end of
    a file of ``apparent`` bytes (tarfile fills the hole with zeros when it extracts)."""
    info = tarfile.TarInfo(name)
    info.size = stored
    info.type = tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    h = len(buf) - 512  # a long name comes first as its own GNU longname header
    header = buf[h:]
    header[386:398] = b"%011o\0" % (apparent - stored)
    header[398:410] = b"%011o\0" % stored
    header[410:482] = b"\0" * 72  # the other three slots: empty regions
    header[482] = 0
    header[483:495] = b"%011o\0" % apparent
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(buf[:h] + header)


def write_tar(members: list[Member]) -> TarLayout:
    """A GNU tar of ``members`` (raw bytes for surrogates in names) and its layout."""
    out = io.BytesIO()
    layout = TarLayout(b"")
    tf = tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    for m in members:
        layout.header_start.append(out.tell())
        if m.kind == "sparse":
            tf.fileobj.write(sparse_header(m.name, m.apparent, len(m.data)))
            tf.fileobj.write(m.data + b"\0" * (-len(m.data) % 512))
            tf.offset = out.tell()
        else:
            info = tarfile.TarInfo(m.name)
            if m.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
            else:
                info.size = len(m.data)
            tf.addfile(info, io.BytesIO(m.data) if m.kind == "file" else None)
        layout.data_end.append(out.tell())
    tf.close()
    layout.data = out.getvalue()
    return layout


def gzipped(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def bad_crc(gz: bytes) -> bytes:
    """The same gzip stream with its CRC-32 trailer altered: every byte decompresses as
    written, only the check fails."""
    return gz[:-8] + (int.from_bytes(gz[-8:-4], "little") ^ 0x5A5A5A5A).to_bytes(4, "little") + gz[-4:]


def altered_stored_gzip(raw: bytes, marker: bytes = b"JFIF", shift: int = 40) -> bytes:
    """A level-0 (stored blocks) gzip of ``raw`` with one byte of image data flipped: the
    stream still decompresses, to an altered JPEG, and only its CRC-32 says so."""
    gz = bytearray(gzipped(raw, level=0))
    pos = gz.find(marker) + shift
    gz[pos] ^= 0xFF
    return bytes(gz)


def expected_groups(names: list[str | None]) -> list[str]:
    """Keys of the samples a WebDataset reader forms from the regular-file members named
    ``names`` (None for entries that are not regular files), in order."""
    return [key for key, _ in group_starts(names)]


def group_starts(names: list[str | None]) -> list[tuple[str, int]]:
    """(key, index in ``names`` of the sample's first member) of each sample, in order."""
    groups: list[tuple[str, int]] = []
    current, exts = None, set()
    for i, name in enumerate(names):
        if name is None:
            continue
        m = _KEY_EXT.match(name)
        if not m or name.rsplit("/", 1)[-1].startswith("._"):
            continue
        key, ext = m.group(1), m.group(2).lower()
        if key.startswith("./"):
            key = key[2:]
        if current is None or key != current or ext in exts:
            groups.append((key, i))
            current, exts = key, set()
        exts.add(ext)
    return groups


# --------------------------------------------------------------------------- parquet


def invalid_utf8_strings(values: list[bytes | None]) -> pa.Array:
    """A ``string`` array whose bytes are not checked: Arrow writes it, readers get the bytes."""
    b = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(b), b.buffers())


def corrupt_row_group(path, row_group: int, column: int = 0) -> None:
    """Overwrite the first page header of one column chunk of one row group; the footer (and
    so every row group's row count) stays intact."""
    md = pq.ParquetFile(path).metadata
    col = md.row_group(row_group).column(column)
    start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else col.data_page_offset
    raw = bytearray(open(path, "rb").read())
    for k in range(16):
        raw[start + 2 + k] ^= 0x5A
    open(path, "wb").write(bytes(raw))
