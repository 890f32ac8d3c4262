"""Stage ``metaclip``: MetaCLIP's metadata matching and count balancing.

"Demystifying CLIP Data" (MetaCLIP, Xu et al. 2023); worldwide mode from "MetaCLIP 2: A
Worldwide Scaling Recipe" (Chuang et al. 2025) and its reference code
(facebookresearch/MetaCLIP ``metaclip/curation``). Rule: each live caption is matched against
the metadata list (an entry matches when the space-padded entry is a case-sensitive substring
of the caption after MetaCLIP's punctuation spacing, once per caption; see
:mod:`pairsift.metadata.match`), giving ``metaclip_entries`` (ids, ascending). Over the whole
pool each entry's count is the number of live captions matching it; with threshold ``t`` an
entry gets ``p_e = 1`` if ``count_e < t`` else ``t / count_e``, and a caption is kept with
probability ``metaclip_p = 1 - prod(1 - p_e)`` over its entries (0 when it matches none),
decided by a uniform draw from hash(seed, uid). Dropped rows get reason ``metaclip``.

``t``: given, or derived from ``tail_share`` (the ``t`` at which tail entries, count < t, hold
that share of all matches; MetaCLIP 2's ``p_to_t``). With neither, the default is the paper's
tail share, :data:`~pairsift.metadata.balance.PAPER_TAIL_SHARE` = 5.64% (``t = 20k`` on
MetaCLIP's 1.6B-pair pool: 16k head entries hold 5.35B of 5.67B matches), so that a pool of
any size is balanced as MetaCLIP balanced its 400M set; a fixed ``t = 20000`` leaves a pool
under ~100M pairs nearly unbalanced.

Worldwide (``worldwide: true``, MetaCLIP 2): each caption's language is identified offline
(langid.py); the caption is stripped (``str.strip``, as MetaCLIP 2's curation does) and
matched against its language's list with MetaCLIP 2's entry padding (no padding beside
no-space scripts and punctuation). A caption in a language without a list goes to the
``other`` bucket, as MetaCLIP 2 maps every LID code without metadata to ``other``: matched
against ``other_metadata`` (the English list by default), counted apart, with its own ``t``.
Counts are per language; English ``t`` (given, or from the tail share) fixes the tail share
``p = t_to_p(counts_en, t_en)`` and every other language, ``other`` included, gets
``t = p_to_t(counts_lang, p)`` (MetaCLIP 2's ``global_count``). ``metaclip_lang`` says which
list the ids index. ``OUT/metaclip/entry_counts.parquet`` (language, entry_id, entry, count,
p, t) keeps the head/tail distribution for DuckDB.

A global stage: ``process`` matches (map part), ``scan`` counts per shard (sparse: matched
ids only), ``merge`` sums the counts into one vector per language and derives ``t`` and the
probabilities, ``apply`` draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from pairsift.pipeline import storage
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import GlobalStage, StageConfig, decision

#: Language key of the single list in MetaCLIP 1 mode (written as null).
SINGLE = "*"
#: Worldwide: the bucket of captions in a language without a list (MetaCLIP 2's ``other``).
OTHER = "other"
ENTRIES_TYPE = pa.list_(pa.int32())


class MetaClipConfig(StageConfig):
    #: A shipped language code (``en``), or a path to a JSON list of strings (.json or
    #: .json.gz; relative paths are relative to the working directory). Worldwide: a folder
    #: of ``<lang>.json[.gz]``, ``shipped``, or a mapping language -> source.
    metadata: str | dict[str, str] = "en"
    #: Head/tail threshold (MetaCLIP: 20,000 for its 1.6B-pair pool -> 400M; 170,000 for
    #: 2.5B). Worldwide: English ``t``, transferred to the other languages by tail share.
    t: int | None = decision(None, ge=1)
    #: Instead of ``t``: the share of all matches the tail entries (count < t) should hold.
    #: Neither given: the paper's share, 0.0564 (t = 20k at MetaCLIP's 400M setting).
    tail_share: float | None = decision(None, gt=0, lt=1)
    worldwide: bool = False
    #: Worldwide: the list that captions in a language without one are matched against, in
    #: their own ``other`` bucket (own counts, own t). A shipped language code or a file;
    #: null: such captions match nothing and are dropped.
    other_metadata: str | None = "en"
    caption_column: str = "caption"

    @model_validator(mode="after")
    def _one_threshold(self):
        if self.t is not None and self.tail_share is not None:
            raise ValueError("give either t or tail_share, not both")
        if isinstance(self.metadata, dict) and not self.worldwide:
            raise ValueError("metadata: a mapping of languages needs worldwide: true")
        if isinstance(self.metadata, dict) and OTHER in self.metadata:
            raise ValueError(f"metadata: {OTHER!r} is the bucket of languages without a list; "
                             f"set other_metadata instead")
        return self

    @property
    def share(self) -> float | None:
        """The tail share t is derived from: ``tail_share``, the paper's when neither option
        is given, None when ``t`` is given."""
        from pairsift.metadata.balance import PAPER_TAIL_SHARE

        if self.tail_share is not None:
            return self.tail_share
        return PAPER_TAIL_SHARE if self.t is None else None


class MetaClipStage(GlobalStage[MetaClipConfig]):
    name = "metaclip"
    version = "2"  # the cased English list, the worldwide `other` bucket, stripped captions
    artifacts = ("metaclip",)

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # it reads captions / stored columns only

    @classmethod
    def stats_section(cls, output: str, con) -> list[str]:
        """Head/tail of MetaCLIP entry counts before and after balancing, when the job ran the
        ``metaclip`` stage (``OUT/metaclip/entry_counts.parquet``)."""
        import os

        from pairsift.pipeline.stats import format_table

        path = os.path.join(output, "metaclip", "entry_counts.parquet")
        if not os.path.isfile(path):
            return []
        cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
        if "metaclip_entries" not in cols:
            return []
        lang = "metaclip_lang" if "metaclip_lang" in cols else "NULL::VARCHAR"
        src = "'" + path.replace("'", "''") + "'"
        con.execute(f"""CREATE OR REPLACE TEMP VIEW metaclip_counts AS
            WITH k AS (SELECT {lang} AS language, unnest(metaclip_entries) AS entry_id FROM samples),
                 kc AS (SELECT language, entry_id, count(*) AS kept FROM k GROUP BY ALL)
            SELECT e.*, coalesce(kc.kept, 0) AS kept FROM read_parquet({src}) e LEFT JOIN kc
            ON e.entry_id = kc.entry_id AND e.language IS NOT DISTINCT FROM kc.language""")
        per_lang = con.execute("""
            SELECT coalesce(language, 'all'), any_value(t), count(*), count(*) FILTER (WHERE count > 0),
                   count(*) FILTER (WHERE count >= t), sum(count), sum(count) FILTER (WHERE count < t) / sum(count),
                   sum(kept), max(kept) FILTER (WHERE count >= t)
            FROM metaclip_counts GROUP BY 1 ORDER BY sum(count) DESC""").fetchall()
        top = con.execute("""SELECT coalesce(language, 'all'), entry, count, p, kept FROM metaclip_counts
                             ORDER BY count DESC, entry LIMIT 10""").fetchall()
        return ["", "MetaCLIP entry counts (metaclip/entry_counts.parquet; kept = matches among kept samples):",
                format_table(["language", "t", "entries", "matched", "head entries", "matches", "tail share",
                              "kept matches", "max kept (head)"], per_lang),
                "", "most matched entries:", format_table(["language", "entry", "count", "p", "kept"], top)]

    @classmethod
    def report_section(cls, output: str, manifest: dict) -> str | None:
        """Entry counts before balancing and expected counts after (``metaclip/entry_counts.parquet``)."""
        import os

        import numpy as np
        import pyarrow.parquet as pq

        from pairsift.pipeline.report import svg_histogram

        path = os.path.join(output, "metaclip", "entry_counts.parquet")
        if not os.path.isfile(path):
            return None
        t = pq.read_table(path).to_pandas()
        t = t[t["count"] > 0]
        before = np.log10(t["count"].to_numpy(dtype=float))
        after_vals = (t["count"] * t["p"]).to_numpy(dtype=float)
        after = np.log10(after_vals[after_vals > 0])
        return ('<section id="metaclip"><h2>MetaCLIP entry counts</h2><div class="charts">'
                + svg_histogram(before, "log10 matches per entry, before")
                + svg_histogram(after, "log10 expected matches per entry, after") + "</div></section>")

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

            c = self.config
            if c.worldwide:
                self._files = dict(resolve_languages(c.metadata))
                if c.other_metadata is not None:
                    self._files[OTHER] = resolve(c.other_metadata, "other_metadata")
            else:
                self._files = {SINGLE: resolve(c.metadata)}
        return self._files

    def preflight(self) -> None:
        c = self.config
        files = self.files()
        if c.worldwide and c.share is None and "en" not in files:
            raise ConfigError("t: worldwide mode transfers English t to other languages and needs "
                              "English metadata ('en'); give tail_share instead")
        for lang in files:
            entries = self.entries(lang)
            if not entries:
                raise ConfigError(f"metadata: {files[lang]} is an empty list")

    def entries(self, lang: str) -> list[str]:
        """The list of ``lang`` (loaded once per file: ``other`` shares English's by default)."""
        path = str(self.files()[lang])
        if path not in self._entries:
            from pairsift.metadata.load import load_metadata

            self._entries[path] = load_metadata(path)
        return self._entries[path]

    def matcher(self, lang: str):
        path = str(self.files()[lang])
        if path not in self._matchers:
            from pairsift.metadata.match import Matcher

            worldwide = self.config.worldwide
            self._matchers[path] = Matcher(self.entries(lang), no_space_rule=worldwide, strip=worldwide)
        return self._matchers[path]

    def batch_rows(self) -> int:
        return 4096  # the matcher's fixed cost per call is amortised over many captions

    def setup(self) -> None:
        """Nothing: the matcher is built on the first batch that needs matching, so workers that
        only apply the balancing, or find every row in the compute cache, never build it."""

    def summary(self) -> dict:
        c = self.config
        return {"metadata": {k: str(v) for k, v in self.files().items()}, "t": c.t,
                "tail_share": c.share, "worldwide": c.worldwide}

    # -- map part: matching -------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        n = batch.num_rows
        live = live_mask(batch) if n else np.zeros(0, dtype=bool)
        if n and c.caption_column not in batch.column_names:
            raise ConfigError(f"caption_column: no column {c.caption_column!r} in the batch")
        texts = batch.column(c.caption_column).to_pylist() if n else []
        rows = np.flatnonzero(live)
        langs: list[str | None] = [None] * n
        if c.worldwide:
            from pairsift.metadata.language import detect, metadata_language

            known = {k for k in self.files() if k != OTHER}
            other = OTHER if c.other_metadata is not None else None
            for i, lang in zip(rows, detect([texts[i] for i in rows])):
                langs[i] = metadata_language(lang, known) or other
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

    def scan_columns(self, pass_name: str) -> tuple[str, ...]:
        return ("metaclip_entries",) + (("metaclip_lang",) if self.config.worldwide else ())

    def scan(self, batch: pa.Table, pass_name: str = "scan", state: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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

    def combine(self, partials: list[dict], pass_name: str = "scan") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for lang in sorted({k for p in partials for k in p}):
            ids = np.concatenate([p[lang][0] for p in partials if lang in p])
            counts = np.concatenate([p[lang][1] for p in partials if lang in p])
            uniq, inv = np.unique(ids, return_inverse=True)
            out[lang] = (uniq.astype(np.int32), np.bincount(inv, weights=counts).astype(np.int64))
        return out

    def merge(self, partials, pass_name: str = "scan", state: Any = None) -> dict[str, Any]:
        """Global counts per language (dense vectors, accumulated shard by shard), ``t`` and
        the entry probabilities."""
        from pairsift.metadata.balance import entry_probs, p_to_t, t_to_p

        c = self.config
        counts: dict[str, np.ndarray] = {}
        for lang in self.files():
            counts[lang] = np.zeros(len(self.entries(lang)), dtype=np.int64)
        for part in partials:
            for lang, (ids, n) in (part or {}).items():
                np.add.at(counts[lang], ids, n)
        ts: dict[str, int] = {}
        share = c.share
        if not c.worldwide:
            ts[SINGLE] = c.t if share is None else p_to_t(counts[SINGLE], share)
            share = t_to_p(counts[SINGLE], ts[SINGLE])
        else:
            # MetaCLIP 2's global_count: English t fixes the tail share p; every other
            # language (and the ``other`` bucket) gets the t at which its tail holds p.
            if share is None:
                t_en = int(c.t)
                share = t_to_p(counts["en"], t_en) if counts["en"].sum() > 0 else None
            else:
                t_en = p_to_t(counts["en"], share) if "en" in counts else None
            for lang, cnt in counts.items():
                if lang == "en" and t_en is not None:
                    ts[lang] = int(t_en)
                elif share is None:  # t given, but no English match to take the share from
                    ts[lang] = int(c.t)
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
            # rows without a language (worldwide, other_metadata: null) match nothing: p = 0
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

        from pairsift.metadata.balance import t_to_p

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
                                     "head_entries": int((counts >= t).sum()),
                                     "tail_share": round(t_to_p(counts, t), 6)}
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
