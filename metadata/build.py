"""Build MetaCLIP-style metadata from open sources, offline.

MetaCLIP ("Demystifying CLIP Data", Xu et al. 2023) builds its 500k entries from, in this
order: the numbers "0".."99", WordNet synset names (the name up to its first ".", "_" turned
into a space; 86,654 with the numbers), Wikipedia unigrams (count >= 100), Wikipedia bigrams
(PMI >= 30) and Wikipedia article titles (by page views), keeping the first copy of each
entry and skipping empty, all-punctuation and over-long ones. Matching is case-sensitive and
the Wikipedia parts keep their case ("Chicken", "Guyana", "New York" are entries of their
own). MetaCLIP's released list is CC-BY-NC, and Wikipedia's counts are not available offline,
so this module rebuilds the recipe from sources we may ship, keeping case where they have it:

- WordNet 3.0 from Debian's ``wordnet-base`` (``/usr/share/wordnet``), read through NLTK's
  WordNet reader: the files are copied into an NLTK data folder ``corpora/wordnet/`` with the
  ``lexnames`` file Debian leaves out (the standard list of 45 lexicographer files). First
  MetaCLIP's synset names (lower-case), then every lemma name of every synset, case kept
  ("New York", "Einstein", "hot dog"), where the synset name is a different string;
- unigrams from ``wordfreq`` (per language, down to a Zipf frequency cut-off; lower-case);
- English: capitalised copies of the wordfreq words with Zipf >= 3 (one use per million
  words, so ~4,000 uses in English Wikipedia's ~4B words): the form such a word takes at the
  start of a sentence or in a title, which Wikipedia's case-keeping unigram counts hold far
  above MetaCLIP's cut-off of 100 ("Chicken", "Dark", "Wood");
- English: the words of SCOWL's ``american-english-insane`` list (Debian ``wamerican-insane``,
  Kevin Atkinson's Spell Checker Oriented Word Lists), case kept (proper nouns: "Guyana",
  "Pratchett"), those wordfreq knows, most frequent first;
- bigrams mined by pointwise mutual information (NLTK's collocation finder, log2 PMI) from
  any corpus the user gives (Parquet columns or text lines, e.g. the pool's own captions);
- an optional titles file (one per line, or ``title<TAB>score``, highest score first).

At most ``max_entries`` (MetaCLIP's 500,000) entries in all.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pairsift.pipeline.errors import ConfigError

WORDNET_DIR = "/usr/share/wordnet"
#: SCOWL's largest American English list, as Debian's ``wamerican-insane`` installs it.
SCOWL_LIST = "/usr/share/dict/american-english-insane"
SCOWL_COPYRIGHT = "/usr/share/doc/wamerican-insane/copyright"

#: WordNet's lexicographer files (lexnames(5WN)): number = position, syntactic category
#: 1 noun, 2 verb, 3 adjective, 4 adverb.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv",
                  "index.noun", "index.verb", "index.adj", "index.adv",
                  "noun.exc", "verb.exc", "adj.exc", "adv.exc")

#: Languages written without spaces (MetaCLIP 2): their bigrams are joined without a space.
NO_SPACE_LANGUAGES = frozenset({"bo", "dz", "ja", "km", "lo", "my", "ryu", "th", "zh"})
MAX_ENTRY_LENGTH = 256
_EXTRA_PUNCT = frozenset("，。、；：？¿！“”‘’（）【】《》〈〉「」『』～—")
_SPACED_PUNCT = (",", ".", ";", ":", "?", "!", "`")
_HTML = re.compile(r"(&lt;.*?&gt;|<.*?>)")


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0: number, name and syntactic category per line."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def _wordnet_synsets(wordnet_dir: str = WORDNET_DIR) -> list:
    """Every synset of the WordNet database in ``wordnet_dir`` (NLTK's reader)."""
    missing = [f for f in _WORDNET_FILES if not os.path.isfile(os.path.join(wordnet_dir, f))]
    if missing:
        raise ConfigError(f"wordnet: {wordnet_dir} lacks {', '.join(missing)} "
                          f"(install Debian's wordnet-base, or pass --wordnet-dir)")
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # no mapping between WordNet versions needed
            return None

    root = tempfile.mkdtemp(prefix="pairsift-nltk-")
    try:
        corpus = os.path.join(root, "corpora", "wordnet")
        os.makedirs(corpus)
        for name in os.listdir(wordnet_dir):
            src = os.path.join(wordnet_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(corpus, name))
        if not os.path.isfile(os.path.join(corpus, "lexnames")):
            with open(os.path.join(corpus, "lexnames"), "w") as f:
                f.write(lexnames_text())
        nltk.data.path.append(root)  # NLTK only reads corpora under its data path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available"
                reader = _Reader(corpus, None)
                synsets = list(reader.all_synsets())
                for s in synsets:  # read the lemmas while the files are there
                    s.lemmas()
        finally:
            nltk.data.path.remove(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return synsets


def wordnet_heads(wordnet_dir: str = WORDNET_DIR, synsets: list | None = None) -> list[str]:
    """MetaCLIP's WordNet part: every synset's name up to its first ".", "_" -> " ",
    without the empty one; sorted, unique."""
    synsets = _wordnet_synsets(wordnet_dir) if synsets is None else synsets
    heads = {s.name().split(".")[0].replace("_", " ") for s in synsets}
    heads.discard("")
    return sorted(heads)


def wordnet_lemma_names(wordnet_dir: str = WORDNET_DIR, synsets: list | None = None) -> list[str]:
    """Every lemma name of every synset, "_" -> " ", case kept (WordNet writes proper nouns
    capitalised: "New York", "Einstein"; synset names are lower-case); sorted, unique."""
    synsets = _wordnet_synsets(wordnet_dir) if synsets is None else synsets
    names = {lemma.name().replace("_", " ") for s in synsets for lemma in s.lemmas()}
    names.discard("")
    return sorted(names)


def _never_matches(word: str) -> bool:
    """Tokens MetaCLIP matching can never find (punctuation it spaces apart) or that
    wordfreq made up (it writes every digit of a multi-digit number as 0)."""
    return any(p in word for p in _SPACED_PUNCT) or any(ch.isdigit() for ch in word)


def _wordfreq_dict(lang: str, wordlist: str = "large") -> dict[str, float]:
    import wordfreq

    if lang not in wordfreq.available_languages(wordlist):
        wordlist = "best"
        if lang not in wordfreq.available_languages(wordlist):
            raise ConfigError(f"lang: wordfreq has no word list for {lang!r}")
    return wordfreq.get_frequency_dict(lang, wordlist)


def _by_frequency(pairs: Iterable[tuple[float, str]]) -> list[str]:
    """Words of (frequency, word) pairs, most frequent first, ties by word."""
    return [w for _, w in sorted(pairs, key=lambda x: (-x[0], x[1]))]


def wordfreq_unigrams(lang: str, min_zipf: float = 1.5, wordlist: str = "large") -> list[str]:
    """wordfreq's words of ``lang`` with Zipf frequency >= ``min_zipf``, most frequent
    first (ties by word), skipping ones MetaCLIP matching can never find."""
    floor = 10 ** (min_zipf - 9)
    return _by_frequency((f, w) for w, f in _wordfreq_dict(lang, wordlist).items()
                         if f >= floor and not _never_matches(w))


def capitalised_unigrams(lang: str, min_zipf: float = 3.0) -> list[str]:
    """The capitalised form (first letter upper-case) of wordfreq's words of ``lang`` with
    Zipf >= ``min_zipf`` where it differs from the word, most frequent first."""
    out = []
    for w in wordfreq_unigrams(lang, min_zipf):
        cap = w[:1].upper() + w[1:]
        if cap != w:
            out.append(cap)
    return out


def scowl_words(path: str = SCOWL_LIST, lang: str = "en", min_zipf: float = 1.0) -> list[str]:
    """Words of a SCOWL word list (one per line, case kept) whose lower-case form has a
    wordfreq Zipf frequency >= ``min_zipf``, most frequent first (ties by word), skipping
    ones MetaCLIP matching can never find."""
    if not os.path.isfile(path):
        raise ConfigError(f"scowl: word list {path} not found (install Debian's wamerican-insane, "
                          f"or pass --scowl FILE, or --no-scowl)")
    freqs = _wordfreq_dict(lang)
    floor = 10 ** (min_zipf - 9)
    with open(path, encoding="utf-8") as f:
        words = {line.strip() for line in f}
    words.discard("")
    return _by_frequency((freqs[w.lower()], w) for w in words
                         if freqs.get(w.lower(), 0.0) >= floor and not _never_matches(w))


def is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or ch in _EXTRA_PUNCT


def _segments(text: str) -> Iterator[list[str]]:
    """Runs of word tokens of a text (tokens split at whitespace after MetaCLIP's spacing;
    an all-punctuation token ends a run, as in MetaCLIP's n-gram counting)."""
    from pairsift.metadata.match import spacing

    run: list[str] = []
    for tok in spacing(_HTML.sub("", text)).split():
        if all(is_punctuation(c) for c in tok):
            if len(run) > 1:
                yield run
            run = []
        else:
            run.append(tok)
    if len(run) > 1:
        yield run


def pmi_bigrams(texts: Iterable[str], min_pmi: float = 30.0, min_count: int = 5,
                join: str = " ") -> list[tuple[str, float]]:
    """Bigrams of ``texts`` with log2 PMI >= ``min_pmi`` among those seen at least
    ``min_count`` times, highest PMI first (ties by bigram). NLTK's collocation finder."""
    from nltk.collocations import BigramAssocMeasures, BigramCollocationFinder

    finder = BigramCollocationFinder.from_documents(seg for t in texts if t for seg in _segments(t))
    finder.apply_freq_filter(min_count)
    scored = finder.score_ngrams(BigramAssocMeasures.pmi)
    out = [(join.join(bg), s) for bg, s in scored if s >= min_pmi]
    out.sort(key=lambda x: (-x[1], x[0]))
    return out


def read_corpus(path: str, column: str | None = None) -> Iterator[str]:
    """Texts of a corpus file: a Parquet column (``column``, default ``caption``) or lines
    of a text file (a .tsv line's first field)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"corpus: file not found: {path}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        col = column or "caption"
        if col not in pf.schema_arrow.names:
            raise ConfigError(f"corpus-column: {path} has no column {col!r} "
                              f"(columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[col]):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            text = line.rstrip("\n").split("\t")[0] if p.suffix == ".tsv" else line.rstrip("\n")
            if text:
                yield text


def read_titles(path: str) -> list[str]:
    """Titles, one per line, or ``title<TAB>score`` (sorted by score, highest first)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"titles: file not found: {path}")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        title, _, score = line.partition("\t")
        try:
            rows.append((-float(score) if score else 0.0, i, title))
        except ValueError:
            raise ConfigError(f"titles: line {i + 1} of {path}: score {score!r} is not a number") from None
    rows.sort()
    return [t for _, _, t in rows]


@dataclass
class BuildOptions:
    lang: str = "en"
    wordnet: bool = True  # English only
    wordnet_dir: str = WORDNET_DIR
    wordnet_lemmas: bool = True  # English only, with wordnet
    min_zipf: float = 1.5
    max_unigrams: int | None = 251_465
    #: Zipf cut-off of the capitalised copies; None: 3.0 for English, none for others.
    capitalised_min_zipf: float | None = None
    scowl: str | None = SCOWL_LIST  # English only
    scowl_min_zipf: float = 1.0
    corpus: list[str] = field(default_factory=list)
    corpus_column: str | None = None
    min_pmi: float = 30.0
    min_bigram_count: int = 5
    max_bigrams: int | None = 100_646
    titles: str | None = None
    max_titles: int | None = 61_235
    max_entries: int | None = 500_000

    @property
    def capitalised_cutoff(self) -> float | None:
        if self.capitalised_min_zipf is None:
            return 3.0 if self.lang == "en" else None
        return self.capitalised_min_zipf if self.capitalised_min_zipf > 0 else None


def _keepable(entry: str) -> str | None:
    entry = entry.strip()
    if not entry or len(entry) > MAX_ENTRY_LENGTH or all(is_punctuation(c) for c in entry):
        return None
    return entry


def build_metadata(opts: BuildOptions) -> tuple[list[str], dict]:
    """The entry list and a report (sources, options, counts per part) for the manifest."""
    from importlib.metadata import version

    entries: dict[str, None] = {}
    counts: dict[str, int] = {}
    sources: dict[str, dict] = {}

    def add(part: str, items: Iterable[str], cap: int | None = None) -> None:
        before = len(entries)
        for item in items:
            if opts.max_entries is not None and len(entries) >= opts.max_entries:
                break
            e = _keepable(item)
            if e is None or e in entries:
                continue
            entries[e] = None
            if cap is not None and len(entries) - before >= cap:
                break
        counts[part] = len(entries) - before

    english = opts.lang == "en"
    wf = f"wordfreq {version('wordfreq')}"
    add("numbers", (str(i) for i in range(100)))
    if opts.wordnet and english:
        synsets = _wordnet_synsets(opts.wordnet_dir)
        add("wordnet", wordnet_heads(synsets=synsets))
        sources["wordnet"] = {"what": "Princeton WordNet 3.0 synset names (MetaCLIP's rule)",
                              "from": f"Debian wordnet-base, {opts.wordnet_dir}, read with NLTK",
                              "license": "WordNet 3.0 license (see LICENSE-WordNet-3.0.txt)"}
        if opts.wordnet_lemmas:
            add("wordnet_lemmas", wordnet_lemma_names(synsets=synsets))
            sources["wordnet_lemmas"] = {"what": "Princeton WordNet 3.0 lemma names, case kept, "
                                                 "not already a synset name",
                                         "from": f"Debian wordnet-base, {opts.wordnet_dir}, read with NLTK",
                                         "license": "WordNet 3.0 license (see LICENSE-WordNet-3.0.txt)"}
    add("unigrams", wordfreq_unigrams(opts.lang, opts.min_zipf), opts.max_unigrams)
    sources["unigrams"] = {"what": f"{wf} word list for {opts.lang!r}, Zipf >= {opts.min_zipf} (lower-case)",
                           "license": "wordfreq data: CC BY-SA 4.0 (wordfreq code: Apache-2.0)"}
    cap_zipf = opts.capitalised_cutoff
    if cap_zipf is not None:
        add("capitalised", capitalised_unigrams(opts.lang, cap_zipf))
        sources["capitalised"] = {"what": f"capitalised copies of the {wf} words with Zipf >= {cap_zipf} "
                                          f"(their sentence-initial and title form)",
                                  "license": "wordfreq data: CC BY-SA 4.0 (wordfreq code: Apache-2.0)"}
    if opts.scowl and english:
        add("scowl", scowl_words(opts.scowl, opts.lang, opts.scowl_min_zipf))
        sources["scowl"] = {"what": f"SCOWL words, case kept, whose lower-case form has {wf} Zipf >= "
                                    f"{opts.scowl_min_zipf}, most frequent first",
                            "from": f"Debian wamerican-insane, {opts.scowl}",
                            "license": "SCOWL license (Kevin Atkinson and contributors; permissive, notice "
                                       "required): LICENSE-SCOWL.txt"}
    if opts.corpus:
        join = "" if opts.lang in NO_SPACE_LANGUAGES else " "
        texts = (t for path in opts.corpus for t in read_corpus(path, opts.corpus_column))
        bigrams = pmi_bigrams(texts, opts.min_pmi, opts.min_bigram_count, join)
        add("bigrams", (b for b, _ in bigrams), opts.max_bigrams)
        sources["bigrams"] = {"what": f"bigrams with log2 PMI >= {opts.min_pmi}, seen >= "
                                      f"{opts.min_bigram_count} times",
                              "from": [os.path.basename(p) for p in opts.corpus]}
    if opts.titles:
        add("titles", read_titles(opts.titles), opts.max_titles)
        sources["titles"] = {"from": os.path.basename(opts.titles)}
    options = {k: v for k, v in opts.__dict__.items() if k not in ("wordnet_dir",)}
    options["capitalised_min_zipf"] = cap_zipf
    report = {
        "language": opts.lang,
        "entries": len(entries),
        "counts": counts,
        "sources": sources,
        "options": options,
    }
    return list(entries), report
