"""MetaCLIP matching speed: MetaCLIP's own fast method vs pairsift's matcher, side by side;
with --coverage, what the shipped English metadata matches instead.

    python tests/benchmarks/bench_metaclip.py [--metadata FILE] [--reps 5] [--procs 2]
    python tests/benchmarks/bench_metaclip.py --coverage

--coverage: the share of the langid-English LAION alt texts that match at least one entry of
the shipped English list, and per part of the list (metadata/MANIFEST.json's counts: numbers,
WordNet, WordNet lemma names, wordfreq unigrams, capitalised copies, SCOWL, ...): its share of
all matches, the captions it matches, and those only it matches.

Input: the 10k LAION alt texts in ../shared/realdata/laion_alt_text_10k. Metadata: a ~500k
entry list (the shipped English list, plus adjacent word pairs of the COCO and CC3M captions in
../shared/realdata and further wordfreq words, standing in for MetaCLIP's bigrams and titles),
or any JSON list given with --metadata (MetaCLIP's own metadata.json works).

(a) MetaCLIP's method: one pyahocorasick automaton over the padded entries, iterating its
    matches caption by caption (metaclip/substr_matching_ahocorasick.py).
(b) pairsift's Matcher (pairsift.metadata.match): batches of captions, token n-gram hashing.
Both give the same ids for every caption (checked). Prints captions/s per core (median and
best of --reps interleaved runs), the ratio, memory, and both run in --procs processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "realdata"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build_metadata(target: int) -> tuple[list[str], dict]:
    from wordfreq import iter_wordlist

    from pairsift.metadata.load import load_metadata

    entries = load_metadata("en")
    parts = {"shipped en": len(entries)}
    seen = set(entries)
    captions = [a["caption"] for a in json.loads(
        (SHARED / "coco_val2017_captions_full" / "captions_val2017.json").read_text())["annotations"]]
    captions += [line.split("\t")[0] for line in
                 (SHARED / "cc3m_val_captions" / "Validation_GCC-1.1.0-Validation.tsv").read_text().splitlines()]
    n = 0
    for c in captions:
        toks = c.split()
        for a, b in zip(toks, toks[1:]):
            bg = f"{a} {b}"
            if bg not in seen and len(entries) < target:
                seen.add(bg)
                entries.append(bg)
                n += 1
    parts["caption word pairs"] = n
    n = 0
    for w in iter_wordlist("en", "large"):
        if len(entries) >= target:
            break
        for cand in (w, w.capitalize()):
            if cand not in seen and len(entries) < target:
                seen.add(cand)
                entries.append(cand)
                n += 1
    parts["more wordfreq words (+ capitalised)"] = n
    return entries, parts


class MetaClipAutomaton:
    """MetaCLIP's fast method, as in its substr_matching_ahocorasick.py."""

    def __init__(self, entries):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for idx, key in enumerate(f" {e} " for e in entries):
            self.automaton.add_word(key, (idx, key))
        self.automaton.make_automaton()

    def match_lists(self, texts):
        from pairsift.metadata.match import spacing

        out = []
        for text in texts:
            matched = set()
            for _end, (entry_id, _value) in self.automaton.iter(spacing(text)):
                matched.add(entry_id)
            out.append(sorted(matched))
        return out


def run_pairsift(matcher, texts, batch):
    for i in range(0, len(texts), batch):
        matcher.match(texts[i:i + batch])


_WORK = {}


def _proc(args):
    name, lo, hi, batch = args
    texts = _WORK["texts"][lo:hi]
    t0 = time.perf_counter()
    if name == "metaclip":
        _WORK["a"].match_lists(texts)
    else:
        run_pairsift(_WORK["m"], texts, batch)
    return time.perf_counter() - t0


def coverage(laion: Path) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from pairsift.metadata.language import detect
    from pairsift.metadata.load import load_metadata
    from pairsift.metadata.match import Matcher

    texts = pq.read_table(laion, columns=["TEXT"]).column("TEXT").to_pylist()
    english = [t for t, lang in zip(texts, detect(texts)) if lang == "en"]
    entries = load_metadata("en")
    parts = json.loads((REPO / "metadata" / "MANIFEST.json").read_text())["languages"]["en"]["counts"]
    bounds = np.cumsum([0] + list(parts.values()))
    offsets, ids = Matcher(entries).match(english)
    n = len(english)
    owner = np.repeat(np.arange(n), np.diff(offsets))
    part = np.searchsorted(bounds, ids, side="right") - 1
    print(f"{n:,} of {len(texts):,} LAION alt texts are English (langid); {len(entries):,} entries match "
          f"{np.mean(np.diff(offsets) > 0):.1%} of them ({len(ids):,} matches)")
    print(f"{'part':16s} {'entries':>8s} {'matches':>8s} {'share':>7s} {'captions':>9s} {'only it':>8s}")
    for k, (name, size) in enumerate(parts.items()):
        mine = part == k
        has = np.zeros(n, bool)
        has[owner[mine]] = True
        others = np.zeros(n, bool)
        others[owner[~mine]] = True
        print(f"{name:16s} {size:>8,} {mine.sum():>8,} {mine.mean():>7.1%} {has.mean():>9.1%} {(has & ~others).mean():>8.2%}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--metadata", help="JSON list of strings (default: ~500k entries built here)")
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=10_000, help="captions per pairsift call")
    ap.add_argument("--coverage", action="store_true", help="coverage of English alt texts per metadata part")
    args = ap.parse_args()
    laion = SHARED / "laion_alt_text_10k" / "test_10000.parquet"
    if not laion.is_file():
        print(f"needs {laion} (../shared is absent)")
        return 0
    if args.coverage:
        return coverage(laion)
    import pyarrow.parquet as pq

    from pairsift.metadata.load import load_metadata
    from pairsift.metadata.match import Matcher

    texts = pq.read_table(laion, columns=["TEXT"]).column("TEXT").to_pylist()
    if args.metadata:
        entries, parts = load_metadata(args.metadata), {args.metadata: None}
    else:
        entries, parts = build_metadata(args.entries)
    print(f"{len(texts):,} LAION alt texts; metadata {len(entries):,} entries: "
          + ", ".join(f"{k} {v:,}" if v is not None else k for k, v in parts.items()))
    print(f"load: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores: timings on a shared machine are noisy")

    r0 = rss_mb()
    t0 = time.perf_counter()
    automaton = MetaClipAutomaton(entries)
    ta, r1 = time.perf_counter() - t0, rss_mb()
    t0 = time.perf_counter()
    matcher = Matcher(entries)
    tm, r2 = time.perf_counter() - t0, rss_mb()
    print(f"build: (a) automaton {ta:.1f}s, +{r1 - r0:,.0f} MB RSS;  (b) pairsift matcher {tm:.1f}s, +{r2 - r1:,.0f} MB RSS")

    expected = automaton.match_lists(texts)
    got = matcher.match_lists(texts)
    assert got == expected, "the two methods disagree"
    print(f"same ids for all {len(texts):,} captions ({sum(map(len, got)):,} matches, "
          f"{sum(1 for g in got if g):,} captions with at least one)")

    times = {"(a) metaclip automaton": [], f"(b) pairsift, batches of {args.batch:,}": [],
             "(b) pairsift, batches of 256 (the stage's)": []}
    for _ in range(args.reps):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        automaton.match_lists(texts)
        times["(a) metaclip automaton"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_pairsift(matcher, texts, args.batch)
        times[f"(b) pairsift, batches of {args.batch:,}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_pairsift(matcher, texts, 256)
        times["(b) pairsift, batches of 256 (the stage's)"].append(time.perf_counter() - t0)
    base_med = statistics.median(times["(a) metaclip automaton"])
    base_best = min(times["(a) metaclip automaton"])
    print(f"\nsingle process, {args.reps} interleaved runs over the 10k captions:")
    print(f"{'method':45s} {'captions/s (median)':>20s} {'captions/s (best)':>18s} {'x (a) median':>13s} {'x (a) best':>11s}")
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(f"{name:45s} {len(texts) / med:>20,.0f} {len(texts) / best:>18,.0f} {base_med / med:>13.2f} "
              f"{base_best / best:>11.2f}")

    tracemalloc.start()
    run_pairsift(matcher, texts, args.batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\npeak memory: process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB "
          f"(both structures loaded); pairsift temporaries per {args.batch:,}-caption call {peak / 2**20:,.1f} MB")

    if args.procs > 1 and hasattr(os, "fork"):
        _WORK.update(texts=texts * 2, a=automaton, m=matcher)
        n = len(_WORK["texts"])
        ctx = mp.get_context("fork")
        print(f"\nacross processes (fork; each process matches {n // args.procs:,} captions):")
        for procs in (1, args.procs):
            for name in ("metaclip", "pairsift"):
                cuts = [n * i // procs for i in range(procs + 1)]
                with ctx.Pool(procs) as pool:
                    t0 = time.perf_counter()
                    pool.map(_proc, [(name, lo, hi, args.batch) for lo, hi in zip(cuts, cuts[1:])])
                    wall = time.perf_counter() - t0
                print(f"  {name:9s} {procs} process(es): {n / wall:>10,.0f} captions/s in all, "
                      f"{n / wall / procs:>10,.0f} per process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
