"""Metadata builder: WordNet via NLTK from Debian's files (synset names, case-keeping lemma
names), wordfreq unigrams and their capitalised copies, SCOWL words, PMI bigrams, titles, the
MetaCLIP build order, and the lists pairsift ships (the English one rebuilt from the builder,
and its coverage of real English alt texts)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os

import pytest

from conftest import REPO, SHARED
from pairsift.metadata.build import (LEXNAMES, SCOWL_LIST, WORDNET_DIR, BuildOptions, build_metadata,
                                     capitalised_unigrams, lexnames_text, pmi_bigrams, read_titles, scowl_words,
                                     wordfreq_unigrams, wordnet_heads, wordnet_lemma_names)
from pairsift.metadata.load import load_metadata, resolve, resolve_languages, shipped_languages, write_metadata
from pairsift.pipeline.errors import ConfigError


def test_lexnames_is_wordnet_30s_list():
    lines = [l.split("\t") for l in lexnames_text().splitlines()]
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == ["00", "adj.all", "3"] and lines[3] == ["03", "noun.Tops", "1"]
    assert lines[29] == ["29", "verb.body", "2"] and lines[2] == ["02", "adv.all", "4"]
    assert lines[44] == ["44", "adj.ppl", "3"]
    man = "/usr/share/man/man5/lexnames.5WN.gz"
    if os.path.isfile(man):  # Debian's manual page lists the same numbers and names
        text = gzip.open(man, "rt").read()
        for num, name, _ in lines:
            assert f"{num}\t{name}" in text


@pytest.fixture(scope="module")
def synsets():
    from pairsift.metadata.build import _wordnet_synsets

    if not os.path.isfile(os.path.join(WORDNET_DIR, "data.noun")):
        pytest.skip("Debian wordnet-base is not installed (.ci/run installs it)")
    return _wordnet_synsets()


@pytest.fixture(scope="module")
def heads(synsets):
    return wordnet_heads(synsets=synsets)


def test_wordnet_heads(heads):
    assert len(heads) == 86_554  # + "0".."99" = MetaCLIP's 86,654
    assert heads == sorted(set(heads)) and "" not in heads
    for h in ("dog", "hotdog", "ice cream", "new york", "d", "st", "i"):
        assert h in heads
    anchor = SHARED / "anchors" / "metaclip" / "wordnet30_synset_heads.json"
    if anchor.is_file():
        assert heads == [h for h in json.loads(anchor.read_text()) if h]


def test_missing_wordnet_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="wordnet-base"):
        wordnet_heads(str(tmp_path))


def test_wordfreq_unigrams_cutoff_and_order():
    from wordfreq import zipf_frequency

    words = wordfreq_unigrams("en", min_zipf=5.0)
    assert 100 < len(words) < 2000 and words[:3] == ["the", "to", "and"]
    assert all(zipf_frequency(w, "en", wordlist="large") >= 4.99 for w in words)
    assert not any(ch.isdigit() or ch in ",.;:?!`" for w in words for ch in w)
    more = wordfreq_unigrams("en", min_zipf=4.0)
    assert more[: len(words)] == words and len(more) > 5 * len(words)
    with pytest.raises(ConfigError, match="lang"):
        wordfreq_unigrams("xx")


def test_pmi_bigrams():
    texts = ["a hot dog on a plate", "the hot dog stand", "hot dog!", "a red plate, a dog", "the dog on a plate"] * 3
    scored = dict(pmi_bigrams(texts, min_pmi=-100, min_count=3))
    # log2 PMI = log2(N * n(hot dog) / (n(hot) n(dog))): hot dog 9 times, hot 9, dog 15, N words
    n_words = 3 * sum(len([w for w in t.replace(",", " ").replace("!", " ").split()]) for t in texts[:5])
    assert scored["hot dog"] == pytest.approx(math.log2(n_words * 9 / (9 * 15)))
    assert "plate a" not in scored  # the comma ends the run of tokens
    top = pmi_bigrams(texts, min_pmi=1.0, min_count=3)
    assert top[0] == ("red plate", pytest.approx(math.log2(n_words * 3 / (3 * 9))))  # N / 9 > N / 15
    assert "hot dog" in dict(top) and all(s >= 1.0 for _, s in top)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert pmi_bigrams(["狗 很 可爱"] * 5, min_pmi=-100, min_count=1, join="")[0][0] in ("狗很", "很可爱")


def test_wordnet_lemma_names_keep_case(synsets, heads):
    names = wordnet_lemma_names(synsets=synsets)
    assert names == sorted(set(names)) and "" not in names
    for n in ("New York", "Einstein", "Guyana", "South America", "hot dog", "dog", "Dalmatian"):
        assert n in names, n
    assert "new york" not in names and "new york" in heads  # the synset name is lower-case
    assert sum(n != n.lower() for n in names) > 30_000
    assert set(heads) - set(names) and len(set(names) - set(heads)) > 60_000


def test_capitalised_unigrams():
    caps = capitalised_unigrams("en", 4.0)
    lower = wordfreq_unigrams("en", 4.0)
    assert caps[:3] == ["The", "To", "And"] and "Chicken" in caps and "Dark" in caps
    assert all(c[0].isupper() and c[0].lower() + c[1:] in lower for c in caps)
    assert len(caps) == sum(1 for w in lower if w[:1].upper() + w[1:] != w)
    zh = capitalised_unigrams("zh", 4.0)  # Chinese has no case: only the Latin-script words get copies
    assert 0 < len(zh) < 0.05 * len(wordfreq_unigrams("zh", 4.0)) and all(c[0] != c[0].lower() for c in zh)


@pytest.fixture(scope="module")
def scowl():
    if not os.path.isfile(SCOWL_LIST):
        pytest.skip("Debian wamerican-insane is not installed (.ci/run installs it)")
    return scowl_words()


def test_scowl_words_keep_case_by_frequency(scowl):
    from wordfreq import word_frequency

    for w in ("Guyana", "Atlanta", "Pratchett", "Spurgeon", "dragonfly", "iPad"):
        assert w in scowl, w
    freqs = [word_frequency(w.lower(), "en", wordlist="large") for w in scowl[:2000]]
    assert freqs == sorted(freqs, reverse=True) and min(freqs) > 0
    assert not any(ch.isdigit() or ch in ",.;:?!`" for w in scowl for ch in w)
    with pytest.raises(ConfigError, match="wamerican-insane"):
        scowl_words("/nonexistent/american-english-insane")


def test_max_entries_caps_the_list():
    entries, report = build_metadata(BuildOptions(lang="en", wordnet=False, scowl=None, min_zipf=5.5,
                                                  max_entries=1000))
    assert len(entries) == 1000 == report["entries"] and sum(report["counts"].values()) == 1000
    assert report["counts"]["capitalised"] > 0 and entries[100] == "the"


def test_build_order_dedup_and_report(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a teddy bear on the bed", "teddy bear and a dog", "my teddy bear"] * 4))
    titles = tmp_path / "titles.tsv"
    titles.write_text("New York\t10\nthe\t99\nMona Lisa\t50\n  \t1\n")
    opts = BuildOptions(lang="en", wordnet=False, scowl=None, capitalised_min_zipf=0, min_zipf=5.5,
                        corpus=[str(corpus)], min_pmi=1.0, min_bigram_count=3, titles=str(titles))
    entries, report = build_metadata(opts)
    assert entries[:100] == [str(i) for i in range(100)]
    n = report["counts"]
    assert n["numbers"] == 100 and n["unigrams"] > 10 and n["bigrams"] >= 1 and n["titles"] == 2
    assert len(entries) == len(set(entries)) == sum(n.values()) == report["entries"]
    uni = entries[100:100 + n["unigrams"]]
    assert uni == wordfreq_unigrams("en", 5.5)
    assert "teddy bear" in entries[100 + n["unigrams"]:]
    assert entries[-2:] == ["Mona Lisa", "New York"]  # by score; "the" was already a unigram
    assert read_titles(str(titles))[0] == "the"


def test_write_and_load_formats(tmp_path):
    entries = ["dog", "hot dog", "狗", ""]
    for name in ("m.json", "m.json.gz"):
        write_metadata(entries, tmp_path / name)
        assert load_metadata(str(tmp_path / name)) == entries
    a = (tmp_path / "m.json.gz").read_bytes()
    write_metadata(entries, tmp_path / "m.json.gz")
    assert (tmp_path / "m.json.gz").read_bytes() == a  # deterministic gzip
    (tmp_path / "only.json.gz").write_bytes(a)
    assert load_metadata(str(tmp_path / "only.json")) == entries  # the .gz sibling
    (tmp_path / "v2.json").write_text(json.dumps({"狗": "w", "小狗": "u"}, ensure_ascii=False))
    assert load_metadata(str(tmp_path / "v2.json")) == ["狗", "小狗"]  # MetaCLIP 2 per-language files
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON list of strings"):
        load_metadata(str(tmp_path / "bad.json"))
    folder = tmp_path / "lists"
    write_metadata(["dog"], folder / "en.json")
    write_metadata(["狗"], folder / "zh.json.gz")
    (folder / "notes.txt").write_text("not a list")
    assert sorted(resolve_languages(str(folder))) == ["en", "zh"]
    assert sorted(resolve_languages({"en": str(folder / "en.json")})) == ["en"]
    with pytest.raises(ConfigError, match="metadata"):
        resolve_languages(str(tmp_path / "m.json"))


def test_shipped_lists_match_the_manifest():
    manifest = json.loads((REPO / "metadata" / "MANIFEST.json").read_text())
    assert set(shipped_languages()) == set(manifest["languages"]) and "en" in manifest["languages"]
    assert (REPO / "metadata" / "LICENSE-WordNet-3.0.txt").read_text().startswith("License: WordNet3.0")
    assert "CC BY-SA 4.0" in manifest["licenses"]["wordfreq"]
    for lang, info in manifest["languages"].items():
        path = resolve(lang)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    en = load_metadata("en")
    info = manifest["languages"]["en"]
    assert len(en) == info["entries"] == sum(info["counts"].values())
    assert len(en) == len(set(en)) and en[:100] == [str(i) for i in range(100)]
    assert info["counts"]["wordnet"] == 86_554 and "ice cream" in en and "fire hydrant" in en
    assert len(en) <= 500_000  # MetaCLIP's size
    for cased in ("Chicken", "Guyana", "South America", "New York", "Dragonfly"):
        assert cased in en, cased
    assert "bigrams" not in info["counts"]  # nothing mined from the caption sets the tests measure with
    assert (REPO / "metadata" / "LICENSE-SCOWL.txt").read_text().count("Kevin Atkinson") >= 1
    assert "LICENSE-SCOWL.txt" in manifest["licenses"]["scowl"]
    total = sum(p.stat().st_size for p in (REPO / "metadata").glob("*.json.gz"))
    assert total < 4_000_000


def test_shipped_english_list_is_the_builders_output(scowl, heads):
    """metadata/en.json.gz is exactly what `pairsift metadata build` makes from the installed
    WordNet, wordfreq and SCOWL (the MANIFEST's command)."""
    manifest = json.loads((REPO / "metadata" / "MANIFEST.json").read_text())
    info = manifest["languages"]["en"]
    assert info["command"] == "pairsift metadata build --out metadata/en.json.gz"
    entries, report = build_metadata(BuildOptions())
    assert report["counts"] == info["counts"]
    assert entries == load_metadata("en")


def test_english_list_covers_english_laion_alt_texts():
    """>= 95% of the langid-English alt texts of the 10k LAION sample match an entry (MetaCLIP's
    own 500k list keeps Wikipedia's case; a lower-case list matches ~66%)."""
    import pyarrow.parquet as pq

    from conftest import shared_path
    from pairsift.metadata.language import detect
    from pairsift.metadata.match import Matcher

    path = shared_path("realdata", "laion_alt_text_10k", "test_10000.parquet")
    texts = pq.read_table(path, columns=["TEXT"]).column("TEXT").to_pylist()
    english = [t for t, lang in zip(texts, detect(texts)) if lang == "en"]
    assert len(english) > 7000
    entries = load_metadata("en")
    offsets, _ = Matcher(entries).match(english)
    coverage = float((offsets[1:] > offsets[:-1]).mean())
    assert coverage >= 0.95, coverage
    lower = [e for e in entries if e == e.lower()]
    offsets, _ = Matcher(lower).match(english)
    assert float((offsets[1:] > offsets[:-1]).mean()) < 0.85  # case is what makes the difference
