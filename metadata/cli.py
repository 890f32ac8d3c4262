"""``pairsift metadata build`` and ``pairsift metaclip match``.

    pairsift metadata build --out FILE [--lang en] [--min-zipf 1.5] [--capitalised-min-zipf 3]
                            [--scowl FILE | --no-scowl] [--corpus FILE ...] [--corpus-column caption]
                            [--min-pmi 30] [--titles FILE] [--max-entries 500000] [--manifest FILE]
    pairsift metaclip match --metadata M.json --input IN.parquet --text-column COL --output OUT.parquet
                            [--worldwide]
"""

from __future__ import annotations

import json
import sys
import time


def _cmd_build(args) -> int:
    from pairsift.metadata.build import BuildOptions, build_metadata
    from pairsift.metadata.load import write_metadata

    opts = BuildOptions(lang=args.lang, wordnet=not args.no_wordnet, wordnet_dir=args.wordnet_dir,
                        wordnet_lemmas=not args.no_wordnet_lemmas,
                        min_zipf=args.min_zipf, max_unigrams=args.max_unigrams or None,
                        capitalised_min_zipf=args.capitalised_min_zipf,
                        scowl=None if args.no_scowl else args.scowl, scowl_min_zipf=args.scowl_min_zipf,
                        max_entries=args.max_entries or None,
                        corpus=list(args.corpus or []), corpus_column=args.corpus_column,
                        min_pmi=args.min_pmi, min_bigram_count=args.min_bigram_count,
                        max_bigrams=args.max_bigrams or None, titles=args.titles,
                        max_titles=args.max_titles or None)
    t0 = time.perf_counter()
    entries, report = build_metadata(opts)
    path = write_metadata(entries, args.out)
    if args.manifest:
        with open(args.manifest, "w", encoding="utf-8") as f:
            json.dump({"file": path.name, **report}, f, indent=1, ensure_ascii=False)
            f.write("\n")
    parts = ", ".join(f"{k} {v:,}" for k, v in report["counts"].items())
    print(f"wrote {len(entries):,} entries ({parts}) to {path} in {time.perf_counter() - t0:.1f}s")
    if opts.corpus and not report["counts"].get("bigrams"):
        print("note: no bigram reached --min-pmi; log2 PMI is at most log2(corpus words / --min-bigram-count), "
              "so small corpora need a lower --min-pmi", file=sys.stderr)
    return 0


def _cmd_match(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pairsift.metadata.load import load_metadata
    from pairsift.metadata.match import Matcher
    from pairsift.pipeline.errors import ConfigError

    entries = load_metadata(args.metadata, key="--metadata")
    try:
        pf = pq.ParquetFile(args.input)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"--input: cannot read {args.input}: {e}") from None
    if args.text_column not in pf.schema_arrow.names:
        raise ConfigError(f"--text-column: {args.input} has no column {args.text_column!r} "
                          f"(columns: {', '.join(pf.schema_arrow.names)})")
    t0 = time.perf_counter()
    matcher = Matcher(entries, no_space_rule=args.worldwide, strip=args.worldwide)
    t_build = time.perf_counter() - t0
    rows = matched = 0
    t0 = time.perf_counter()
    writer = None
    try:
        for rb in pf.iter_batches(batch_size=args.batch_size):
            table = pa.Table.from_batches([rb])
            col = matcher.match_arrow(table.column(args.text_column).to_pylist())
            table = table.append_column(pa.field("metaclip_entries", pa.list_(pa.int32())), col)
            if writer is None:
                writer = pq.ParquetWriter(args.output, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
            matched += table.num_rows - int((col.value_lengths().to_numpy(zero_copy_only=False) == 0).sum())
        if writer is None:  # an empty input still gets an output with the new column
            schema = pf.schema_arrow.append(pa.field("metaclip_entries", pa.list_(pa.int32())))
            pq.write_table(schema.empty_table(), args.output)
    finally:
        if writer is not None:
            writer.close()
    secs = time.perf_counter() - t0
    print(f"{rows:,} rows, {matched:,} matched at least one of {len(entries):,} entries; "
          f"matcher built in {t_build:.1f}s, matched {rows / max(secs, 1e-9):,.0f} rows/s -> {args.output}")
    return 0


def add_commands(sub) -> None:
    from pairsift.metadata.build import SCOWL_LIST, WORDNET_DIR

    md = sub.add_parser("metadata", help="build MetaCLIP-style metadata (WordNet, wordfreq, SCOWL, PMI bigrams)")
    msub = md.add_subparsers(dest="metadata_command", required=True)
    b = msub.add_parser("build", help="build a metadata list (JSON, or .json.gz)")
    b.add_argument("--out", required=True, help="output file (.json or .json.gz)")
    b.add_argument("--lang", default="en", help="language (wordfreq code; WordNet for en only)")
    b.add_argument("--no-wordnet", action="store_true", help="leave WordNet synset names out")
    b.add_argument("--wordnet-dir", default=WORDNET_DIR, help="WordNet 3.0 database files (Debian wordnet-base)")
    b.add_argument("--no-wordnet-lemmas", action="store_true", help="only synset names from WordNet (MetaCLIP's "
                   "rule), not the case-keeping lemma names")
    b.add_argument("--min-zipf", type=float, default=1.5,
                   help="unigram cut-off on wordfreq's Zipf scale (log10 per billion words; 1.5 ~ 100 "
                        "occurrences in English Wikipedia, MetaCLIP's cut-off)")
    b.add_argument("--max-unigrams", type=int, default=251_465, help="at most this many unigrams (0: no cap)")
    b.add_argument("--capitalised-min-zipf", type=float, default=None,
                   help="add capitalised copies of the unigrams with at least this Zipf frequency "
                        "(default 3.0 for en, none for other languages; 0: none)")
    b.add_argument("--scowl", default=SCOWL_LIST, help="SCOWL word list, case kept (English; Debian wamerican-insane)")
    b.add_argument("--no-scowl", action="store_true", help="leave the SCOWL words out")
    b.add_argument("--scowl-min-zipf", type=float, default=1.0,
                   help="keep SCOWL words whose lower-case form has at least this wordfreq Zipf frequency")
    b.add_argument("--max-entries", type=int, default=500_000, help="at most this many entries in all "
                   "(MetaCLIP: 500,000; 0: no cap)")
    b.add_argument("--corpus", action="append", help="text corpus for PMI bigrams (.parquet, .txt, .tsv); repeatable")
    b.add_argument("--corpus-column", help="text column of Parquet corpora (default: caption)")
    b.add_argument("--min-pmi", type=float, default=30.0, help="bigram log2 PMI cut-off (MetaCLIP: 30 on Wikipedia)")
    b.add_argument("--min-bigram-count", type=int, default=5, help="ignore bigrams seen fewer times")
    b.add_argument("--max-bigrams", type=int, default=100_646, help="at most this many bigrams (0: no cap)")
    b.add_argument("--titles", help="titles file: one per line, or title<TAB>score")
    b.add_argument("--max-titles", type=int, default=61_235, help="at most this many titles (0: no cap)")
    b.add_argument("--manifest", help="also write a JSON report (sources, options, counts)")
    b.set_defaults(func=_cmd_build)

    mc = sub.add_parser("metaclip", help="MetaCLIP tools outside a job")
    csub = mc.add_subparsers(dest="metaclip_command", required=True)
    m = csub.add_parser("match", help="add metaclip_entries (list<int32>) to a Parquet file")
    m.add_argument("--metadata", required=True, help="JSON list of strings (.json/.json.gz) or a shipped language")
    m.add_argument("--input", required=True, help="input Parquet file")
    m.add_argument("--text-column", required=True, help="column holding the captions")
    m.add_argument("--output", required=True, help="output Parquet file (input rows + metaclip_entries)")
    m.add_argument("--worldwide", action="store_true", help="MetaCLIP 2 matching: entry padding for no-space scripts, captions stripped")
    m.add_argument("--batch-size", type=int, default=8192, help="rows per matching call")
    m.set_defaults(func=_cmd_match)
