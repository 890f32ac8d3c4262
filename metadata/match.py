"""Substring matching of captions against MetaCLIP metadata, exactly MetaCLIP's rule, fast.

MetaCLIP ("Demystifying CLIP Data", Xu et al. 2023) matches a caption to an entry when the
space-padded entry ``" e "`` is a case-sensitive substring of the caption after MetaCLIP's
spacing: the caption padded with one space on each side, each of ``, . ; : ? ! `` wrapped in
spaces, and tab, newline and carriage return turned into spaces. A caption matches an entry at
most once. MetaCLIP 2 ("A Worldwide Scaling Recipe", 2025) pads a side of an entry only where
its boundary character is not CJK, Thai, Lao, Burmese, Khmer or Tibetan script or punctuation,
so entries of languages written without spaces match inside words, and strips the caption
(``str.strip``) before spacing it (``metaclip/curation/curate.py``: ``txt = txt.strip()``).

How it is fast: every padded entry starts and ends at a space of the spaced caption, so
``" e "`` occurs in it exactly when ``e`` equals a run of consecutive tokens of
``spaced.split(" ")`` joined by single spaces (empty tokens included, which keeps double
spaces exact). :class:`Matcher` therefore spaces a whole batch of captions at once (captions
joined by a separator token that no entry contains, UTF-8 bytes), and looks every token, then
every run of tokens that still begins some entry, up in one open-addressing hash table held in
numpy arrays: span hashes come from prefix sums in O(1) each, and every hit is compared with
its key byte for byte (8 bytes at a time), so the result is exact. No Python code runs per
caption or per token. Entries that are not padded on both sides (MetaCLIP 2's no-space
scripts) go through one Aho-Corasick automaton (pyahocorasick) over the same batch string.
:func:`brute_force_match` is the rule written out literally, for tests.
"""

from __future__ import annotations

import string
from itertools import chain
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

#: MetaCLIP's spacing: these are wrapped in spaces, these become spaces.
PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")

#: Punctuation that MetaCLIP 2 treats like a no-space script at an entry's boundary.
_EXTRA_PUNCT = frozenset("，。、；：？¿！“”‘’（）【】《》〈〉「」『』～—")
_ASCII_PUNCT = frozenset(string.punctuation)
_NO_SPACE_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF),
    (0x2E80, 0x2EFF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF),  # CJK
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF),
)


def spacing(text: str) -> str:
    """MetaCLIP's spacing of a caption (padded with one space on each side)."""
    spaced = f" {text} "
    for p in PUNCTS_TO_WRAP:
        spaced = spaced.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        spaced = spaced.replace(c, " ")
    return spaced


def is_no_space_char(ch: str) -> bool:
    """MetaCLIP 2: a character of a script written without spaces, or punctuation."""
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES):
        return True
    return ch in _ASCII_PUNCT or ch in _EXTRA_PUNCT


def pad_entry(entry: str, no_space_rule: bool = False) -> str:
    """The string MetaCLIP looks for: ``" e "`` (v1), or padded only on the sides whose
    boundary character is not a no-space script or punctuation (v2). An empty entry is
    padded on both sides in either mode."""
    if not no_space_rule or not entry:
        return f" {entry} "
    left = "" if is_no_space_char(entry[0]) else " "
    right = "" if is_no_space_char(entry[-1]) else " "
    return f"{left}{entry}{right}"


def brute_force_match(texts: Iterable[str], entries: Sequence[str], no_space_rule: bool = False,
                      strip: bool = False) -> list[list[int]]:
    """The rule written out literally: ids of the entries whose padded form occurs in the
    spaced caption (stripped first with ``strip``), ascending. Quadratic; for tests and small
    inputs."""
    padded = [pad_entry(e, no_space_rule) for e in entries]
    out = []
    for text in texts:
        spaced = spacing((text or "").strip() if strip else (text or ""))
        out.append([i for i, p in enumerate(padded) if p in spaced])
    return out


def _spare_chars(entries: Sequence[str], k: int = 2) -> list[str]:
    """``k`` characters that occur in no entry (separator and substitute)."""
    used = set("".join(entries))
    candidates = [chr(c) for c in range(0, 32) if chr(c) not in "\t\n\r"] + ["\ufffe", "\uffff"]
    candidates += [chr(c) for c in range(0xF0000, 0xF0100)]
    spare = [c for c in candidates if c not in used][:k]
    if len(spare) < k:  # pragma: no cover - needs entries holding every candidate
        raise ValueError("metadata uses every separator candidate character")
    return spare


_MASK64 = (1 << 64) - 1


class _SpanTable:
    """A hash table of byte strings, probed for many spans of one buffer at once (numpy).

    A span's hash is the polynomial ``sum (b_j + 1) * P**j mod 2**64`` plus its length times a
    constant, computed for any span of a buffer in O(1) from prefix sums; the table is open
    addressing with linear probing; every hit is then compared with its key eight bytes at a
    time, so lookups are exact whatever the hash does."""

    _LEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: list[bytes]):
        self.n = len(keys)
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=self.n)
        self.key_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.key_len = lengths
        self._key_buf = b"".join(keys) + bytes(8)
        self.key_words = _words(self._key_buf)
        key_bytes = np.frombuffer(self._key_buf, dtype=np.uint8)[: self.key_off[-1]]
        base = 0x100000001B3
        while True:  # a base under which no two keys share a hash (the first, in practice)
            self._set_base(base)
            h = self.span_hash(self.prefix(key_bytes), self.key_off[:-1], self.key_off[1:])
            if np.unique(h).size == h.size and not (h == 0).any():
                break
            base += 2  # pragma: no cover - a 64-bit collision among the keys
        bits = max(4, int(2 * max(self.n, 1) - 1).bit_length())
        cap = 1 << bits
        self.mask = np.uint64(cap - 1)
        self.shift = np.uint64(64 - bits)
        table = np.full(cap, -1, dtype=np.int64)
        pending = np.arange(self.n)
        pos = self._home(h)
        while pending.size:
            slot = pos[pending]
            free = table[slot] < 0
            slots, first = np.unique(slot[free], return_index=True)
            table[slots] = pending[free][first]
            placed = np.zeros(pending.size, dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending = pending[~placed]
            pos[pending] = (pos[pending] + np.uint64(1)) & self.mask
        self.slot_key = table
        self.slot_hash = np.zeros(cap, dtype=np.uint64)  # 0: an empty slot
        filled = table >= 0
        self.slot_hash[filled] = h[table[filled]]

    def _home(self, h: np.ndarray) -> np.ndarray:
        """Home slot: the top bits of the hash times 2**64 / golden ratio (Fibonacci hashing)."""
        with np.errstate(over="ignore"):
            return (h * np.uint64(0x9E3779B97F4A7C15)) >> self.shift

    def _set_base(self, base: int) -> None:
        self.base = base
        self.inv_base = pow(base, -1, 1 << 64)
        self._pow = np.ones(1, dtype=np.uint64)
        self._ipow = np.ones(1, dtype=np.uint64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``base**j`` and ``base**-j`` mod 2**64 for ``j < n`` (cached, grown by doubling)."""
        if self._pow.size < n:
            size = max(n, 2 * self._pow.size)
            with np.errstate(over="ignore"):
                for name, b in (("_pow", self.base), ("_ipow", self.inv_base)):
                    steps = np.full(size, b, dtype=np.uint64)
                    steps[0] = 1
                    setattr(self, name, np.cumprod(steps, dtype=np.uint64))
        return self._pow, self._ipow

    def prefix(self, buf: np.ndarray) -> np.ndarray:
        """Prefix sums of ``buf`` for :meth:`span_hash`."""
        pw, _ = self._powers(buf.size + 1)
        out = np.zeros(buf.size + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * pw[: buf.size], dtype=np.uint64, out=out[1:])
        return out

    def span_hash(self, pre: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        _, ipw = self._powers(pre.size)
        with np.errstate(over="ignore"):
            return (pre[end] - pre[start]) * ipw[start] + (end - start + 1).astype(np.uint64) * self._LEN

    def lookup(self, words: np.ndarray, pre: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Key index of every span ``[start, end)`` of the buffer, or -1. ``words`` are the
        buffer's 8-byte windows (:func:`_words`), ``pre`` its :meth:`prefix` sums."""
        m = start.size
        found = np.full(m, -1, dtype=np.int64)
        if m == 0 or self.n == 0:
            return found
        h = self.span_hash(pre, start, end)
        length = end - start
        idx = np.arange(m)
        slot = self._home(h)
        while idx.size:  # linear probing; nearly all end at their home slot
            sh = self.slot_hash[slot]
            hit = sh == h[idx]
            found[idx[hit]] = self.slot_key[slot[hit]]
            more = ~hit & (sh != 0)
            idx, slot = idx[more], (slot[more] + np.uint64(1)) & self.mask
        hits = np.flatnonzero(found >= 0)
        other_length = self.key_len[found[hits]] != length[hits]  # keys' hashes all differ
        found[hits[other_length]] = -1
        key_off = np.zeros(m, dtype=np.int64)
        hits = hits[~other_length]
        key_off[hits] = self.key_off[found[hits]]
        return self._verify(words, start, length, found, key_off)

    def _verify(self, words, start, length, found, key_off) -> np.ndarray:
        """Drop hits whose bytes differ from their key's (compared 8 bytes at a time)."""
        hits = np.flatnonzero(found >= 0)
        ln = length[hits]
        chunks = (ln + 7) >> 3
        total = int(chunks.sum())
        if total:
            owner = np.repeat(np.arange(hits.size), chunks)
            k8 = 8 * (np.arange(total) - np.repeat(np.cumsum(chunks) - chunks, chunks))
            rem = np.minimum(ln[owner] - k8, 8).astype(np.uint64)
            mask = np.where(rem == 8, np.uint64(0xFFFFFFFFFFFFFFFF),
                            (np.uint64(1) << (rem * np.uint64(8) % np.uint64(64))) - np.uint64(1))
            diff = (words[start[hits][owner] + k8] ^ self.key_words[key_off[hits][owner] + k8]) & mask
            found[hits[np.unique(owner[diff != 0])]] = -1
        return found


def _words(buf: bytes) -> np.ndarray:
    """Every 8-byte window of ``buf`` (which ends with 8 padding bytes) as a little-endian
    uint64: ``words[i]`` holds ``buf[i:i + 8]``."""
    return np.ndarray(shape=(max(len(buf) - 7, 0),), dtype="<u8", buffer=buf, strides=(1,))


class Matcher:
    """Exact MetaCLIP matching of many captions at once.

    ``entries``: the metadata list (ids are positions in it; duplicates allowed, each id
    matches). ``no_space_rule``: MetaCLIP 2's entry padding (see :func:`pad_entry`).
    ``strip``: strip each caption first (MetaCLIP 2's curation does).
    """

    def __init__(self, entries: Sequence[str], no_space_rule: bool = False, strip: bool = False):
        self.entries = list(entries)
        self.no_space_rule = no_space_rule
        self.strip = strip
        self.size = len(self.entries)
        self.sep, self.sub = _spare_chars(self.entries)
        # Keys: every entry padded on both sides, and every run of its first tokens.
        # code: -1 the separator, else 2 * (group + 1) + begins_longer_entry, group -1 when
        # the key only begins entries.
        codes: dict[str, int] = {}
        groups: dict[str, int] = {}  # entry string -> group number
        group_ids: list[list[int]] = []
        unpadded: dict[str, list[int]] = {}
        for i, e in enumerate(self.entries):
            p = pad_entry(e, no_space_rule)
            if p[:1] != " " or p[-1:] != " ":
                unpadded.setdefault(p, []).append(i)
                continue
            g = groups.get(e)
            if g is not None:
                group_ids[g].append(i)
                continue
            g = groups[e] = len(group_ids)
            group_ids.append([i])
            codes[e] = 2 * (g + 1) + (codes.get(e, 0) & 1)
            parts = e.split(" ")
            for k in range(1, len(parts)):
                prefix = " ".join(parts[:k])
                codes[prefix] = codes.get(prefix, 0) | 1
        codes[self.sep] = -1
        self._table = _SpanTable([k.encode("utf-8", "surrogatepass") for k in codes])
        self._key_code = np.fromiter(codes.values(), dtype=np.int64, count=len(codes))
        self._max_tokens = max((e.count(" ") + 1 for e in groups), default=0)
        self._group_first = np.array([g[0] for g in group_ids], dtype=np.int64)
        self._unique = all(len(g) == 1 for g in group_ids)
        if not self._unique:
            sizes = np.array([len(g) for g in group_ids], dtype=np.int64)
            self._group_off = np.concatenate([[0], np.cumsum(sizes)])
            self._group_ids = np.array([i for g in group_ids for i in g], dtype=np.int64)
        self._automaton = None
        self._auto_ids: list[list[int]] = []
        if unpadded:
            import ahocorasick

            a = ahocorasick.Automaton()
            for k, (p, ids) in enumerate(unpadded.items()):
                a.add_word(p, k)
                self._auto_ids.append(ids)
            a.make_automaton()
            self._automaton = a
            self._auto_first = np.array([ids[0] for ids in self._auto_ids], dtype=np.int64)

    # -- batch matching -------------------------------------------------------------------
    def match(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Match a batch: ``(offsets, ids)`` in CSR form, caption ``i`` matching
        ``ids[offsets[i]:offsets[i + 1]]`` (ascending, each once). ``None`` matches nothing."""
        n = len(texts)
        if n == 0:
            return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32)
        texts = ["" if t is None else (t.strip() if self.strip else t) for t in texts]
        sep = self.sep
        joiner = f" {sep} "
        big = joiner.join(texts)
        if big.count(sep) != n - 1:  # a caption holds the separator itself
            texts = [t.replace(sep, self.sub) for t in texts]
            big = joiner.join(texts)
        raw = big.encode("utf-8", "surrogatepass")  # the spacing below is ASCII: byte-safe
        for p in PUNCTS_TO_WRAP:
            if p.encode() in raw:
                raw = raw.replace(p.encode(), f" {p} ".encode())
        for c in CHARS_TO_SPACE:
            if c.encode() in raw:
                raw = raw.replace(c.encode(), b" ")
        raw += f" {sep}".encode("utf-8") + bytes(8)
        size = len(raw) - 8
        buf = np.frombuffer(raw, dtype=np.uint8)[:size]
        words = _words(raw)
        spaces = np.flatnonzero(buf == 32)
        tok_start = np.concatenate([[0], spaces + 1])
        tok_end = np.concatenate([spaces, [size]])
        pre = self._table.prefix(buf)
        key = self._table.lookup(words, pre, tok_start, tok_end)
        codes = np.where(key >= 0, self._key_code[key], 0)
        seps = np.flatnonzero(codes == -1)
        starts, groups = self._token_matches(words, pre, tok_start, tok_end, codes)
        caption = np.searchsorted(seps, starts)
        if self._unique:
            ids = self._group_first[groups]
        else:
            caption, ids = self._expand(caption, groups, self._group_off, self._group_ids)
        if self._automaton is not None:
            c2, i2 = self._automaton_matches(raw[:size].decode("utf-8", "surrogatepass"))
            caption = np.concatenate([caption, c2])
            ids = np.concatenate([ids, i2])
        width = max(self.size, 1)
        both = np.sort(caption * width + ids)
        if both.size:  # each (caption, entry) once
            both = both[np.concatenate([[True], both[1:] != both[:-1]])]
        caption, ids = np.divmod(both, width)
        offsets = np.searchsorted(caption, np.arange(n + 1)).astype(np.int64)
        return offsets, ids.astype(np.int32)

    def _token_matches(self, words, pre, tok_start, tok_end, codes) -> tuple[np.ndarray, np.ndarray]:
        """Start token and group of every run of tokens that is an entry."""
        hit = np.flatnonzero(codes >= 2)
        starts, groups = [hit], [(codes[hit] >> 1) - 1]
        cand = np.flatnonzero((codes > 0) & ((codes & 1) == 1))
        k = 1
        while cand.size and k < self._max_tokens:
            # never past the end: the last token is the separator, which begins no entry
            key = self._table.lookup(words, pre, tok_start[cand], tok_end[cand + k])
            c = np.where(key >= 0, self._key_code[key], 0)
            m = c >= 2
            starts.append(cand[m])
            groups.append((c[m] >> 1) - 1)
            cand = cand[(c > 0) & ((c & 1) == 1)]
            k += 1
        return np.concatenate(starts), np.concatenate(groups)

    def _automaton_matches(self, big: str) -> tuple[np.ndarray, np.ndarray]:
        """Matches of the entries not padded on both sides, by Aho-Corasick over the batch."""
        text = " " + big  # every caption now reads " spaced " between separators
        flat = np.fromiter(chain.from_iterable(self._automaton.iter(text)), dtype=np.int64)
        if flat.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ends, keys = flat[0::2], flat[1::2]
        chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        sep_pos = np.flatnonzero(chars == ord(self.sep))
        caption = np.searchsorted(sep_pos, ends)
        if all(len(ids) == 1 for ids in self._auto_ids):
            return caption, self._auto_first[keys]
        sizes = np.array([len(i) for i in self._auto_ids], dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(sizes)])
        flat_ids = np.array([i for ids in self._auto_ids for i in ids], dtype=np.int64)
        return self._expand(caption, keys, off, flat_ids)

    @staticmethod
    def _expand(caption: np.ndarray, groups: np.ndarray, off: np.ndarray, flat: np.ndarray):
        counts = off[groups + 1] - off[groups]
        rep_caption = np.repeat(caption, counts)
        starts = np.repeat(off[groups], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return rep_caption, flat[starts + within]

    def match_lists(self, texts: Sequence[str | None]) -> list[list[int]]:
        offsets, ids = self.match(texts)
        ids = ids.tolist()
        return [ids[offsets[i]:offsets[i + 1]] for i in range(len(texts))]

    def match_arrow(self, texts: Sequence[str | None]) -> pa.ListArray:
        """``list<int32>`` per caption."""
        offsets, ids = self.match(texts)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, type=pa.int32()))
