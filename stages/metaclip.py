"""Stage ``metaclip``: MetaCLIP's metadata matching and count balancing.

"Demystifying CLIP Data" (MetaCLIP, Xu et al. 2023); worldwide mode from "MetaCLIP 2: A
Worldwide Scaling Recipe" (2025). Rule: each live caption is matched against the metadata
list (an entry matches when the space-padded entry is a case-sensitive substring of the
caption after MetaCLIP's punctuation spacing, once per caption; see
:mod:`pairsift.metadata.match`), giving ``metaclip_entries`` (ids, ascending). Over the whole
pool each entry's count is the number of live captions matching it; with threshold ``t``
(given, or derived from ``tail_share``: the ``t`` below which entries hold that share of all
matches) an entry gets ``p_e = 1`` if ``count_e < t`` else ``t / count_e``, and a caption is
kept with probability ``metaclip_p = 1 - prod(1 - p_e)`` over its entries (0 when it matches
none), decided by a uniform draw from hash(seed, uid). Dropped rows get reason ``metaclip``.
Worldwide (``worldwide: true``): each caption's language is identified offline (langid.py)
and matched against that language's metadata with MetaCLIP 2's entry padding (no padding
beside no-space scripts and punctuation), counts are per language, and each language's ``t``
is the one whose tail share equals English's (``metaclip_lang`` says which list the ids
index). ``OUT/metaclip/entry_counts.parquet`` (language, entry_id, entry, count, p, t) keeps
the head/tail distribution for DuckDB.

A global stage: ``process`` matches (map part), ``scan`` counts per shard (sparse: matched
ids only), ``merge`` sums the counts into one vector per language and derives ``t`` and the
probabilities, ``apply`` draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pairsift.pipeline import storage
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import GlobalStage, StageConfig

#: Language key of the single list in MetaCLIP 1 mode (written as null).
SINGLE = "*"
ENTRIES_TYPE = pa.list_(pa.int32())


class MetaClipConfig(StageConfig):
    #: A shipped language code (``en``), or a path to a JSON list of strings (.json or
    #: .json.gz; relative paths are relative to the working directory). Worldwide: a folder
    #: of ``<lang>.json[.gz]``, ``shipped``, or a mapping language -> source.
    metadata: str | dict[str, str] = "en"
    #: Head/tail threshold (MetaCLIP: 20,000 for 400M pairs, 170,000 for 2.5B).
    t: int | None = Field(None, ge=1)
    #: Instead of ``t``: the share of all matches the tail entries (count < t) should hold.
    tail_share: float | None = Field(None, gt=0, lt=1)
    worldwide: bool = False
    #: Worldwide: captions in a language without metadata are matched with this language's
    #: list (null: they match nothing and are dropped).
    fallback_language: str | None = "en"
    caption_column: str = "caption"

    @model_validator(mode="after")
    def _one_threshold(self):
        if self.t is not None and self.tail_share is not None:
            raise ValueError("give either t or tail_share, not both")
        if isinstance(self.metadata, dict) and not self.worldwide:
            raise ValueError("metadata: a mapping of languages needs worldwide: true")
        return self

    @property
    def threshold(self) -> int | None:
        """``t``, defaulting to MetaCLIP's 20,000 when neither option is given."""
        if self.t is None and self.tail_share is None:
            return 20_000
        return self.t


class MetaClipStage(GlobalStage):
    name = "metaclip"
    Config = MetaClipConfig

    def __init__(self, config, context=None):
        super().__init__(config, context)
        self._files: dict[str, Any] | None = None
        self._entries: dict[str, list[str]] = {}
        self._matchers: dict[str, Any] = {}

    # -- configuration ----------------------------------------------------------------------
    def files(self) -> dict[str, Any]:
        """Language key -> metadata file."""
        if self._files is None:
            from pairsift.metadata.load import resolve, resolve_languages

            c: MetaClipConfig = self.config
            if c.worldwide:
                self._files = dict(resolve_languages(c.metadata))
            else:
                self._files = {SINGLE: resolve(c.metadata)}
        return self._files

    def preflight(self) -> None:
        c: MetaClipConfig = self.config
        files = self.files()
        if c.worldwide:
            if c.fallback_language is not None and c.fallback_language not in files:
                raise ConfigError(f"fallback_language: no metadata for {c.fallback_language!r} "
                                  f"(have: {', '.join(sorted(files))})")
            if c.tail_share is None and "en" not in files:
                raise ConfigError("t: worldwide mode transfers English t to other languages and needs "
                                  "English metadata ('en'); give tail_share instead")
        for lang in files:
            entries = self.entries(lang)
            if not entries:
                raise ConfigError(f"metadata: {files[lang]} is an empty list")

    def entries(self, lang: str) -> list[str]:
        if lang not in self._entries:
            from pairsift.metadata.load import load_metadata

            self._entries[lang] = load_metadata(str(self.files()[lang]))
        return self._entries[lang]

    def matcher(self, lang: str):
        if lang not in self._matchers:
            from pairsift.metadata.match import Matcher

            self._matchers[lang] = Matcher(self.entries(lang), no_space_rule=self.config.worldwide)
        return self._matchers[lang]

    def batch_rows(self) -> int:
        return 4096  # the matcher's fixed cost per call is amortised over many captions

    def setup(self) -> None:
        if not self.config.worldwide:  # worldwide: each language's list on first use
            self.matcher(SINGLE)

    def summary(self) -> dict:
        c: MetaClipConfig = self.config
        return {"metadata": {k: str(v) for k, v in self.files().items()}, "t": c.threshold,
                "tail_share": c.tail_share, "worldwide": c.worldwide}

    # -- map part: matching -------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        c: MetaClipConfig = self.config
        n = batch.num_rows
        live = live_mask(batch) if n else np.zeros(0, dtype=bool)
        if n and c.caption_column not in batch.column_names:
            raise ConfigError(f"caption_column: no column {c.caption_column!r} in the batch")
        texts = batch.column(c.caption_column).to_pylist() if n else []
        rows = np.flatnonzero(live)
        langs: list[str | None] = [None] * n
        if c.worldwide:
            from pairsift.metadata.language import detect, metadata_language

            known = self.files()
            for i, lang in zip(rows, detect([texts[i] for i in rows])):
                langs[i] = metadata_language(lang, known) or c.fallback_language
        else:
            for i in rows:
                langs[i] = SINGLE
        lengths = np.zeros(n, dtype=np.int64)
        per_row: dict[int, np.ndarray] = {}
        for lang in sorted({l for l in langs if l is not None}):
            group = [i for i in rows if langs[i] == lang]
            offsets, ids = self.matcher(lang).match([texts[i] for i in group])
            for j, i in enumerate(group):
                per_row[i] = ids[offsets[j]:offsets[j + 1]]
                lengths[i] = offsets[j + 1] - offsets[j]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.concatenate([per_row[i] for i in sorted(per_row)]) if per_row else np.zeros(0, np.int32)
        valid = np.array([langs[i] is not None for i in range(n)], dtype=bool)
        entries = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()),
                                           type=ENTRIES_TYPE, mask=pa.array(~valid, pa.bool_()))
        batch = set_column(batch, "metaclip_entries", entries, ENTRIES_TYPE)
        if c.worldwide:
            batch = set_column(batch, "metaclip_lang", [l if l != SINGLE else None for l in langs], pa.string())
        return batch

    # -- global part: counts ---------------------------------------------------------------------
    def _lang_keys(self, batch: pa.Table) -> list[str | None]:
        if self.config.worldwide:
            return batch.column("metaclip_lang").to_pylist()
        return [SINGLE] * batch.num_rows

    def scan(self, batch: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Sparse counts of this batch's live captions: language -> (entry ids, counts)."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if batch.num_rows == 0:
            return out
        live = live_mask(batch)
        entries = batch.column("metaclip_entries").combine_chunks()
        langs = self._lang_keys(batch)
        for lang in sorted({l for l, ok in zip(langs, live) if ok and l is not None}):
            sel = np.array([ok and l == lang for l, ok in zip(langs, live)], dtype=bool)
            values = pc.list_flatten(entries.filter(pa.array(sel))).to_numpy(zero_copy_only=False)
            ids, counts = np.unique(values.astype(np.int32), return_counts=True)
            out[lang] = (ids.astype(np.int32), counts.astype(np.int64))
        return out

    def combine(self, partials: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for lang in sorted({k for p in partials for k in p}):
            ids = np.concatenate([p[lang][0] for p in partials if lang in p])
            counts = np.concatenate([p[lang][1] for p in partials if lang in p])
            uniq, inv = np.unique(ids, return_inverse=True)
            out[lang] = (uniq.astype(np.int32), np.bincount(inv, weights=counts).astype(np.int64))
        return out

    def merge(self, partials: list[dict]) -> dict[str, Any]:
        """Global counts per language (dense vectors, accumulated shard by shard), ``t`` and
        the entry probabilities."""
        from pairsift.metadata.balance import entry_probs, p_to_t, t_to_p

        c: MetaClipConfig = self.config
        counts: dict[str, np.ndarray] = {}
        for lang in self.files():
            counts[lang] = np.zeros(len(self.entries(lang)), dtype=np.int64)
        for part in partials:
            for lang, (ids, n) in (part or {}).items():
                np.add.at(counts[lang], ids, n)
        ts: dict[str, int] = {}
        share = None
        if not c.worldwide:
            ts[SINGLE] = c.threshold if c.tail_share is None else p_to_t(counts[SINGLE], c.tail_share)
            share = t_to_p(counts[SINGLE], ts[SINGLE])
        else:
            if c.tail_share is not None:
                share = c.tail_share
                t_en = p_to_t(counts["en"], share) if "en" in counts else None
            else:
                t_en = c.threshold
                share = t_to_p(counts["en"], t_en) if counts["en"].sum() > 0 else None
            for lang, cnt in counts.items():
                if lang == "en" and t_en is not None:
                    ts[lang] = int(t_en)
                elif share is None:  # no English match to take the share from
                    ts[lang] = int(c.threshold)
                else:
                    ts[lang] = p_to_t(cnt, share)
        probs = {lang: entry_probs(counts[lang], ts[lang]) for lang in counts}
        return {"counts": counts, "t": ts, "probs": probs, "tail_share": share}

    def apply(self, batch: pa.Table, state: dict[str, Any]) -> pa.Table:
        from pairsift.metadata.balance import accept_probs, uniform_draws

        n = batch.num_rows
        p = np.full(n, np.nan)
        if n:
            live = live_mask(batch)
            entries = batch.column("metaclip_entries").combine_chunks()
            langs = self._lang_keys(batch)
            for lang in sorted({l for l, ok in zip(langs, live) if ok and l is not None}):
                rows = np.flatnonzero(np.array([ok and l == lang for l, ok in zip(langs, live)], dtype=bool))
                sub = entries.take(pa.array(rows))
                offsets = sub.offsets.to_numpy()
                offsets = offsets - offsets[0]
                ids = pc.list_flatten(sub).to_numpy(zero_copy_only=False).astype(np.int64)
                p[rows] = accept_probs(offsets, ids, state["probs"][lang])
            # rows without a language (worldwide, no fallback) match nothing: p = 0
            p[np.flatnonzero(live & np.isnan(p))] = 0.0
            live_rows = np.flatnonzero(live)
            uids = batch.column("uid").to_pylist()
            draws = uniform_draws(self.context.seed, [uids[i] for i in live_rows])
            keep = draws < p[live_rows]
            reasons: list[str | None] = [None] * n
            for i, k in zip(live_rows, keep):
                if not k:
                    reasons[i] = "metaclip"
        else:
            reasons = []
        values = pa.array(np.nan_to_num(p), pa.float64(), mask=np.isnan(p))
        batch = set_column(batch, "metaclip_p", values, pa.float64())
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: dict[str, Any], output: str) -> dict:
        """Write ``OUT/metaclip/entry_counts.parquet``; manifest facts per language."""
        import pyarrow.parquet as pq

        tables, facts = [], {}
        for lang in sorted(state["counts"]):
            counts, probs, t = state["counts"][lang], state["probs"][lang], state["t"][lang]
            if lang != SINGLE and not counts.any():
                continue  # worldwide: a language no caption matched
            entries = self.entries(lang)
            label = None if lang == SINGLE else lang
            tables.append(pa.table({
                "language": pa.array([label] * len(entries), pa.string()),
                "entry_id": pa.array(np.arange(len(entries), dtype=np.int32)),
                "entry": pa.array(entries, pa.string()),
                "count": pa.array(counts, pa.int64()),
                "p": pa.array(probs, pa.float64()),
                "t": pa.array(np.full(len(entries), t, dtype=np.int64)),
            }))
            facts[label or "all"] = {"t": int(t), "matches": int(counts.sum()),
                                     "entries_matched": int((counts > 0).sum()),
                                     "head_entries": int((counts >= t).sum())}
        path = storage.join(output, "metaclip", "entry_counts.parquet")
        table = pa.concat_tables(tables) if tables else pa.table(
            {"language": pa.array([], pa.string()), "entry_id": pa.array([], pa.int32()),
             "entry": pa.array([], pa.string()), "count": pa.array([], pa.int64()),
             "p": pa.array([], pa.float64()), "t": pa.array([], pa.int64())})
        with storage.atomic_open(path) as f:
            pq.write_table(table, f, compression="zstd")
        share = state.get("tail_share")
        return {"entry_counts": path, "tail_share": None if share is None else round(float(share), 6),
                "languages": facts}
