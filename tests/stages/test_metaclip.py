"""Stage metaclip: MetaCLIP's matching rule (golden vectors, brute force on real alt texts),
counts invariant to sharding, deterministic balancing close to t, worldwide mode, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_job, shared_path
from pairsift.metadata.balance import accept_probs, entry_probs, p_to_t, t_to_p
from pairsift.metadata.load import load_metadata
from pairsift.metadata.match import Matcher, brute_force_match, pad_entry, spacing
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.base import StageContext
from pairsift.stages.metaclip import MetaClipConfig, MetaClipStage


@pytest.fixture(scope="module")
def golden():
    return json.loads(shared_path("anchors", "metaclip", "balancing_golden_tiny.json").read_text())


def _batch(captions, uids=None, dropped=()) -> pa.Table:
    n = len(captions)
    uids = uids or [f"{i:032x}" for i in range(n)]
    reasons = ["too_small" if i in dropped else None for i in range(n)]
    return pa.table({
        "uid": uids, "key": [None] * n, "source": [None] * n, "url": [None] * n, "caption": captions,
        "image": [None if i in dropped else b"img" for i in range(n)],
        "drop_reason": pa.array(reasons, pa.string()),
        "drop_stage": pa.array(["quality" if r else None for r in reasons], pa.string()),
    }, schema=BASE_SCHEMA)


def _stage(tmp_path, entries, seed=0, **options) -> MetaClipStage:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(entries))
    stage = MetaClipStage(MetaClipConfig(metadata=str(path), **options), StageContext(seed=seed))
    stage.preflight()
    stage.setup()
    return stage


def _run(stage, tables):
    """process + scan per batch, combine per shard, merge, apply: as the runner does."""
    shards = [[stage.process(t) for t in shard] for shard in tables]
    state = stage.merge([stage.combine([stage.scan(b) for b in shard]) for shard in shards])
    return state, [stage.apply(b, state) for shard in shards for b in shard]


# -- the rule -------------------------------------------------------------------------------------

def test_golden_v1_matching(golden):
    g = golden["v1_matching_and_balancing"]
    texts = [t["text"] for t in g["texts"]]
    expected = [t["matched_entry_ids"] for t in g["texts"]]
    assert [spacing(t) for t in texts] == [t["padded"] for t in g["texts"]]
    assert Matcher(g["metadata"]).match_lists(texts) == expected
    assert brute_force_match(texts, g["metadata"]) == expected


def test_golden_v2_no_space_matching(golden):
    g = golden["v2_no_space_matching"]
    texts = [t["text"] for t in g["texts"]]
    expected = [t["matched_entry_ids"] for t in g["texts"]]
    assert [pad_entry(e, no_space_rule=True) for e in g["metadata"]] == g["padded_entries"]
    assert Matcher(g["metadata"], no_space_rule=True).match_lists(texts) == expected
    assert brute_force_match(texts, g["metadata"], no_space_rule=True) == expected


def test_golden_threshold_transfer(golden):
    g = golden["v2_threshold_transfer"]
    p = t_to_p(np.array(g["counts_en"]), g["t_en"])
    assert p == pytest.approx(g["p"], abs=1e-12)
    assert p_to_t(np.array(g["counts_lang"]), p) == g["t_lang"]


@pytest.mark.parametrize("no_space_rule", [False, True])
def test_matcher_edge_cases_agree_with_brute_force(no_space_rule):
    entries = ["", " ", "a", "a b", "a  b", " a", "a ", "x\x00y", "\x01", "a,", "U.S.", "hot dog", "dog",
               "dog", "hot", "狗", "小狗", "ねこ", "(dog)", "T恤", "a b c d e", "b c"]
    texts = ["", " ", "a b", "a  b", "  a  ", "a,b", "a , b", "hot dog\x00 \x00 dog", "\x00", "\x01 a", None,
             "hot\tdog", "a b c d e f", "小狗很可爱 (dog)", "T恤 ねこ", "x\x00y", "hot dog\r\ndog!"]
    got = Matcher(entries, no_space_rule).match_lists(texts)
    assert got == brute_force_match(texts, entries, no_space_rule)
    assert got[7] == sorted(got[7]) and len(set(got[7])) == len(got[7])
    assert 12 in got[7] and 13 in got[7]  # duplicate entries: every id matches


@pytest.fixture(scope="module")
def laion_texts():
    path = shared_path("realdata", "laion_alt_text_10k", "test_10000.parquet")
    return pq.read_table(path, columns=["TEXT"]).column("TEXT").to_pylist()


def test_agrees_with_brute_force_on_laion_alt_texts(laion_texts):
    """The literal rule on all 10k real alt texts, with a 3,000-entry list of entries that
    occur in them (and unigrams, bigrams and numbers that do not)."""
    full = load_metadata("en")
    rng = np.random.default_rng(0)
    words = sorted({w for t in laion_texts for w in spacing(t).split(" ") if w})
    pairs = sorted({f"{a} {b}" for t in laion_texts[:2000] for a, b in zip(spacing(t).split(" "), spacing(t).split(" ")[1:])})
    entries = [str(e) for e in (list(rng.choice(words, 1200, replace=False)) + list(rng.choice(pairs, 800, replace=False))
               + list(rng.choice(full, 1000, replace=False)))]
    got = Matcher(entries).match_lists(laion_texts)
    assert got == brute_force_match(laion_texts, entries)
    assert sum(map(len, got)) > 3000  # the check is not vacuous


def test_no_space_rule_agrees_with_brute_force_on_laion_alt_texts(laion_texts):
    """MetaCLIP 2 padding on the real alt texts (some Japanese and Chinese) with entries of the
    shipped ja, zh, de and en lists."""
    rng = np.random.default_rng(1)
    entries = [str(e) for lang, k in (("ja", 600), ("zh", 600), ("de", 300), ("en", 500))
               for e in rng.choice(load_metadata(lang), k, replace=False)]
    got = Matcher(entries, no_space_rule=True).match_lists(laion_texts)
    assert got == brute_force_match(laion_texts, entries, no_space_rule=True)
    assert sum(map(len, got)) > 500


def test_agrees_with_metaclip_automaton_on_laion_alt_texts(laion_texts):
    """MetaCLIP's own fast method (one pyahocorasick automaton over the padded entries) with
    the whole shipped English metadata."""
    import ahocorasick

    entries = load_metadata("en")
    automaton = ahocorasick.Automaton()
    for i, e in enumerate(entries):
        automaton.add_word(f" {e} ", i)
    automaton.make_automaton()
    expected = [sorted({i for _, i in automaton.iter(spacing(t))}) for t in laion_texts]
    assert Matcher(entries).match_lists(laion_texts) == expected
    assert sum(1 for e in expected if e) > 5000


# -- the stage ------------------------------------------------------------------------------------

def test_stage_golden_counts_probs_and_accept(tmp_path, golden):
    g = golden["v1_matching_and_balancing"]
    stage = _stage(tmp_path, g["metadata"], t=g["t"])
    texts = [t["text"] for t in g["texts"]]
    # an extra dropped row (earlier stage) must be skipped: no entries, not counted, no p
    batch = _batch(texts + ["a photo of a dog"], dropped={len(texts)})
    state, (out,) = _run(stage, [[batch]])
    assert state["counts"]["*"].tolist() == g["entry_counts"]
    np.testing.assert_allclose(state["probs"]["*"], g["entry_probs"], atol=1e-12)
    assert out.column("metaclip_entries").to_pylist() == [t["matched_entry_ids"] for t in g["texts"]] + [None]
    p = out.column("metaclip_p").to_pylist()
    np.testing.assert_allclose(p[:-1], [t["accept_prob"] for t in g["texts"]], atol=1e-12)
    assert p[-1] is None
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[-1] == "too_small"
    for r, t in zip(reasons, g["texts"]):
        if t["accept_prob"] == 0.0:
            assert r == "metaclip"
        if t["accept_prob"] == 1.0:
            assert r is None


def test_empty_batch_schema(tmp_path):
    stage = _stage(tmp_path, ["dog", "cat"], t=5)
    empty = stage.process(BASE_SCHEMA.empty_table())
    assert empty.schema.field("metaclip_entries").type == pa.list_(pa.int32())
    assert stage.scan(empty) == {}
    state = stage.merge([stage.combine([stage.scan(empty)])])
    out = stage.apply(empty, state)
    assert out.num_rows == 0 and out.schema.field("metaclip_p").type == pa.float64()


def _synthetic_pool(n, n_entries=40, per_caption=(1, 1), seed=0):
    """Captions made of Zipf-distributed entries: head entries far above t, a long tail."""
    rng = np.random.default_rng(seed)
    entries = [f"concept{i}" for i in range(n_entries)]
    weights = 1.0 / np.arange(1, n_entries + 1) ** 1.2
    weights /= weights.sum()
    captions = []
    for _ in range(n):
        k = rng.integers(per_caption[0], per_caption[1] + 1)
        picks = rng.choice(n_entries, size=k, replace=False, p=weights)
        captions.append("a photo of " + " and ".join(entries[j] for j in picks))
    return entries, captions


def test_counts_invariant_to_sharding(tmp_path):
    entries, captions = _synthetic_pool(3000, per_caption=(1, 3))
    stage = _stage(tmp_path, entries + ["photo", "a photo"], t=50)
    whole = _batch(captions)
    one, _ = _run(stage, [[whole]])
    cuts = [0, 7, 900, 901, 2500, 3000]
    shards = [[whole.slice(a, b - a)] for a, b in zip(cuts, cuts[1:])]
    many, out = _run(stage, shards + [[whole.slice(0, 0)]])
    np.testing.assert_array_equal(one["counts"]["*"], many["counts"]["*"])
    assert one["counts"]["*"][len(entries)] == 3000  # "photo" in every caption
    # the partials stay sparse: one shard's partial holds only the ids it matched
    part = stage.combine([stage.scan(stage.process(whole.slice(0, 7)))])
    assert part["*"][0].size <= 7 * 5


def test_sampling_deterministic_and_head_entries_kept_near_t(tmp_path):
    t = 400
    entries, captions = _synthetic_pool(60_000, seed=1)
    stage = _stage(tmp_path, entries, t=t, seed=7)
    batch = _batch(captions)
    state, (out,) = _run(stage, [[batch]])
    counts = state["counts"]["*"]
    assert (counts >= t).sum() >= 5 and (counts < t).sum() >= 10
    kept = out.column("drop_reason").is_null().to_numpy(zero_copy_only=False)
    matched = out.column("metaclip_entries").to_pylist()
    kept_per_entry = np.zeros(len(entries), dtype=np.int64)
    for ids, k in zip(matched, kept):
        if k:
            kept_per_entry[ids] += 1
    for e in range(len(entries)):
        if counts[e] >= t:  # one entry per caption: Binomial(count, t / count), mean t
            sd = math.sqrt(t * (1 - t / counts[e]))
            assert abs(kept_per_entry[e] - t) <= 5 * sd + 1, (e, counts[e], kept_per_entry[e])
        else:
            assert kept_per_entry[e] == counts[e]
    # the same decisions in other batches and shards; other ones under another seed
    _, outs = _run(stage, [[batch.slice(0, 10_000), batch.slice(10_000, 33_333)], [batch.slice(43_333)]])
    again = np.concatenate([o.column("drop_reason").is_null().to_numpy(zero_copy_only=False) for o in outs])
    np.testing.assert_array_equal(kept, again)
    other = _stage(tmp_path, entries, t=t, seed=8)
    _, (out8,) = _run(other, [[batch]])
    assert (out8.column("drop_reason").is_null().to_numpy(zero_copy_only=False) != kept).sum() > 1000


def test_multi_entry_captions_kept_as_expected(tmp_path):
    """Kept count per head entry against its exact expectation sum(1 - prod(1 - p_e))."""
    t = 300
    entries, captions = _synthetic_pool(30_000, per_caption=(1, 3), seed=2)
    stage = _stage(tmp_path, entries, t=t, seed=3)
    state, (out,) = _run(stage, [[_batch(captions)]])
    p = np.array(out.column("metaclip_p").to_pylist())
    kept = out.column("drop_reason").is_null().to_numpy(zero_copy_only=False)
    rows_of = {}
    for r, ids in enumerate(out.column("metaclip_entries").to_pylist()):
        for e in ids:
            rows_of.setdefault(e, []).append(r)
    for e, rows in rows_of.items():
        if state["counts"]["*"][e] < t:
            continue
        mean, var = p[rows].sum(), (p[rows] * (1 - p[rows])).sum()
        assert abs(kept[rows].sum() - mean) <= 5 * math.sqrt(var) + 1
        assert mean >= t  # other entries only add chances


def test_tail_share_derives_t(tmp_path):
    entries, captions = _synthetic_pool(5000, seed=4)
    stage = _stage(tmp_path, entries, tail_share=0.2)
    state, _ = _run(stage, [[_batch(captions)]])
    counts, t = state["counts"]["*"], state["t"]["*"]
    assert t == p_to_t(counts, 0.2)
    assert abs(t_to_p(counts, t) - 0.2) < 0.1
    np.testing.assert_allclose(state["probs"]["*"], entry_probs(counts, t))


def test_accept_probs_formula():
    probs = np.array([0.5, 0.2, 1.0])
    out = accept_probs(np.array([0, 2, 2, 3]), np.array([0, 1, 2]), probs)
    np.testing.assert_allclose(out, [1 - 0.5 * 0.8, 0.0, 1.0])


# -- worldwide -----------------------------------------------------------------------------------

def test_worldwide_multilingual(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "en.json").write_text(json.dumps(["dog", "cat", "park", "photo"]))
    (folder / "de.json").write_text(json.dumps(["Hund", "Katze", "Park"]))
    (folder / "zh.json").write_text(json.dumps(["狗", "小狗", "猫", "公园"]))
    en = ["a photo of a dog in the park", "my cat sleeps on the sofa", "the dog and the cat play"] * 40
    de = ["ein Hund läuft im Park", "die Katze schläft auf dem Sofa"] * 30
    zh = ["一只小狗在公园里玩", "这只猫很可爱"] * 20
    captions = en + de + zh
    stage = MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, t=30), StageContext(seed=0))
    stage.preflight()
    state, (out,) = _run(stage, [[_batch(captions)]])
    langs = out.column("metaclip_lang").to_pylist()
    assert langs[:120] == ["en"] * 120 and langs[120:180] == ["de"] * 60 and langs[180:] == ["zh"] * 40
    ids = out.column("metaclip_entries").to_pylist()
    assert ids[0] == [0, 2, 3] and ids[120] == [0, 2] and ids[180] == [0, 1, 3]  # 狗 inside 小狗
    assert ids[181] == [2]
    counts = state["counts"]
    assert counts["zh"].tolist() == [20, 20, 20, 20] and counts["de"].tolist() == [30, 30, 30]
    share = t_to_p(counts["en"], 30)
    assert state["t"]["en"] == 30
    assert state["t"]["de"] == p_to_t(counts["de"], share) and state["t"]["zh"] == p_to_t(counts["zh"], share)
    p = np.array(out.column("metaclip_p").to_pylist())
    assert np.all(p[180:] > 0)


def test_preflight_errors(tmp_path):
    with pytest.raises(ConfigError, match="metadata"):
        MetaClipStage(MetaClipConfig(metadata=str(tmp_path / "missing.json"))).preflight()
    with pytest.raises(ConfigError, match="metadata"):
        MetaClipStage(MetaClipConfig(metadata="xx")).preflight()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": [1]}) + "x")
    with pytest.raises(ConfigError, match="metadata"):
        MetaClipStage(MetaClipConfig(metadata=str(bad))).preflight()
    folder = tmp_path / "de_only"
    folder.mkdir()
    (folder / "de.json").write_text(json.dumps(["Hund"]))
    with pytest.raises(ConfigError, match="^t:"):
        MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, t=10, other_metadata=None)).preflight()
    with pytest.raises(ConfigError, match="other_metadata"):
        MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, tail_share=0.1,
                                     other_metadata=str(tmp_path / "missing.json"))).preflight()
    with pytest.raises(ConfigError, match="other"):
        make_job(tmp_path, tmp_path / "out", stages=[{"metaclip": {"worldwide": True, "metadata": {"other": "en"}}}])
    with pytest.raises(ConfigError, match="fallback_language"):  # renamed: other_metadata
        make_job(tmp_path, tmp_path / "out", stages=[{"metaclip": {"worldwide": True, "fallback_language": "en"}}])
    with pytest.raises(ConfigError, match="t or tail_share"):
        make_job(tmp_path, tmp_path / "out", stages=[{"metaclip": {"t": 5, "tail_share": 0.1}}])


# -- end to end ----------------------------------------------------------------------------------

def test_job_spec_runs_on_quickstart_pool(ray_session, sample_pool, tmp_path):
    import yaml

    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.spec import parse_job
    from pairsift.pipeline.stats import stats_text

    raw = yaml.safe_load((REPO / "jobs" / "metaclip.yaml").read_text())
    raw["input"]["path"] = str(sample_pool)
    raw["output"] = str(tmp_path / "out")
    raw["ray"] = {"num_cpus": 2}
    result = run_job(parse_job(raw))
    out = tmp_path / "out"
    kept = pq.read_table(out / "metadata")
    rejected = pq.read_table(out / "rejected")
    assert kept.num_rows + rejected.num_rows == 78
    assert "metaclip_entries" in kept.column_names and "metaclip_p" in kept.column_names
    assert all(p is not None and p > 0 for p in kept.column("metaclip_p").to_pylist())
    counts = pq.read_table(out / "metaclip" / "entry_counts.parquet")
    assert counts.num_rows == len(load_metadata("en"))
    live = [e for e, r in zip(rejected.column("metaclip_entries").to_pylist(), rejected.column("drop_stage").to_pylist())
            if r == "metaclip"] + kept.column("metaclip_entries").to_pylist()
    assert sum(counts.column("count").to_pylist()) == sum(len(e) for e in live)
    assert "entry_counts" in json.dumps(result.manifest)
    text = stats_text(str(out))
    assert "MetaCLIP" in text and "head entries" in text



# -- golden: MetaCLIP's reference logic on real captions ------------------------------------------
# The functions below restate, for the tests only, what facebookresearch/MetaCLIP's reference
# code does (metaclip/metaclip1/substr_matching.py and balancing.py; metaclip/curation/
# substr_matching.py and curate.py): entries padded with spaces (MetaCLIP 2: only on sides whose
# boundary is not a no-space script or punctuation), looked up with one pyahocorasick automaton
# over the spaced caption (MetaCLIP 2: stripped first); counts per language; English t -> tail
# share p -> t of every other language (and of "other", where every LID code without metadata
# goes); p_e = t / max(count_e, t); a caption kept with probability 1 - prod(1 - p_e).

_REF_PUNCT = set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_REF_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
               (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF),
               (0x0F00, 0x0FFF))


def _ref_no_space(ch):
    import string

    return any(a <= ord(ch) <= b for a, b in _REF_RANGES) or ch in string.punctuation or ch in _REF_PUNCT


def _ref_spacing(text):
    text = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        text = text.replace(c, " ")
    return text


def _ref_automaton(metadata, v2):
    import ahocorasick

    a = ahocorasick.Automaton()
    for idx, e in enumerate(metadata):
        if v2:
            key = e if _ref_no_space(e[0]) else " " + e
            key = key if _ref_no_space(key[-1]) else key + " "
        else:
            key = f" {e} "
        a.add_word(key, (idx, key))
    a.make_automaton()
    return a


def _ref_match(automaton, text, v2):
    if v2:
        text = text.strip()
    return sorted({idx for _, (idx, _) in automaton.iter(_ref_spacing(text))})


def _ref_t_to_p(counts, t):
    return float(counts[counts < t].sum() / counts.sum())


def _ref_p_to_t(counts, p):
    counts = np.sort(counts)
    portion = np.cumsum(counts) / counts.sum()
    return counts[np.abs(portion - p).argmin()]


def _ref_count_to_prob(counts, t):
    c = np.array(counts)
    c[c < t] = t
    return t / c


def _ref_accept(probs, ids):
    return 1.0 - np.prod(1.0 - probs[ids]) if ids else 0.0


def test_golden_metaclip1_balancing_on_laion_alt_texts(tmp_path, laion_texts):
    """MetaCLIP 1 on the 10k LAION alt texts with the shipped English list: entry counts,
    t from the paper's tail share (no t given), p_e and the accept probability, as the
    reference code computes them; the draw keeps sum(p) captions within 5 sd."""
    from pairsift.metadata.balance import PAPER_TAIL_SHARE

    entries = load_metadata("en")
    automaton = _ref_automaton(entries, v2=False)
    ref_ids = [_ref_match(automaton, t, v2=False) for t in laion_texts]
    counts = np.zeros(len(entries), dtype=np.uint64)
    for ids in ref_ids:
        counts[ids] += 1
    t = int(_ref_p_to_t(counts, PAPER_TAIL_SHARE))
    probs = _ref_count_to_prob(counts, t)
    accept = np.array([_ref_accept(probs, ids) for ids in ref_ids])

    stage = MetaClipStage(MetaClipConfig(metadata="en"), StageContext(seed=0))  # the defaults
    stage.preflight()
    batch = _batch(laion_texts)
    state, outs = _run(stage, [[batch.slice(0, 4000)], [batch.slice(4000, 3000), batch.slice(7000)]])
    out = pa.concat_tables(outs)
    assert out.column("metaclip_entries").to_pylist() == ref_ids
    np.testing.assert_array_equal(state["counts"]["*"], counts.astype(np.int64))
    # 10k captions: singletons alone hold > 5.64% of the matches, so the paper's share gives t = 1
    assert state["t"]["*"] == t >= 1
    np.testing.assert_allclose(state["probs"]["*"], probs, rtol=1e-12)
    p = np.array(out.column("metaclip_p").to_pylist())
    np.testing.assert_allclose(p, accept, rtol=1e-9, atol=1e-12)
    assert abs(state["tail_share"] - _ref_t_to_p(counts, t)) < 1e-12
    kept = out.column("drop_reason").is_null().to_numpy(zero_copy_only=False)
    assert abs(kept.sum() - p.sum()) <= 5 * math.sqrt((p * (1 - p)).sum())
    assert (counts >= t).sum() > 10  # there is a head to balance
    assert 0.2 < kept.mean() < 0.95


def test_golden_metaclip2_curation_on_laion_alt_texts(tmp_path, laion_texts):
    """MetaCLIP 2 (worldwide) on the 10k LAION alt texts: per-language lists (en, de, fr, es,
    ja, zh shipped), every other LID language in the ``other`` bucket matched against the
    English list, captions stripped, English t = 20 transferred by tail share; ids, counts, t,
    p_e and accept probabilities as the reference curation computes them."""
    from pairsift.metadata.language import detect

    langs_kept = ("en", "de", "fr", "es", "ja", "zh")
    folder = tmp_path / "lists"
    folder.mkdir()
    lists = {lang: load_metadata(lang) for lang in langs_kept}
    for lang, entries in lists.items():
        (folder / f"{lang}.json").write_text(json.dumps(entries, ensure_ascii=False))
    lists["other"] = lists["en"]
    # a caption padded with whitespace: MetaCLIP 2 strips it before matching
    texts = list(laion_texts) + ["\u3000Vintage Leather Bag\xa0", " 一只小狗 "]
    lid = detect(texts)
    bucket = [l if l in langs_kept else "other" for l in lid]
    automata = {lang: _ref_automaton(e, v2=True) for lang, e in lists.items()}
    ref_ids = [_ref_match(automata[b], t, v2=True) for b, t in zip(bucket, texts)]
    counts = {lang: np.zeros(len(e), dtype=np.uint64) for lang, e in lists.items()}
    for b, ids in zip(bucket, ref_ids):
        counts[b][ids] += 1
    t_en = 20
    p_t = _ref_t_to_p(counts["en"], t_en)
    ts = {lang: (t_en if lang == "en" else int(_ref_p_to_t(c, p_t))) for lang, c in counts.items() if c.sum()}
    probs = {lang: _ref_count_to_prob(counts[lang], t) for lang, t in ts.items()}
    accept = [_ref_accept(probs[b], ids) if ids else 0.0 for b, ids in zip(bucket, ref_ids)]

    stage = MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, t=t_en), StageContext(seed=0))
    stage.preflight()
    state, (out,) = _run(stage, [[_batch(texts)]])
    assert out.column("metaclip_lang").to_pylist() == bucket
    assert out.column("metaclip_entries").to_pylist() == ref_ids
    assert ref_ids[-2] and ref_ids[-1]  # the stripped captions match
    assert bucket.count("other") > 100 and len(set(bucket)) == 7
    for lang in ts:
        np.testing.assert_array_equal(state["counts"][lang], counts[lang].astype(np.int64))
        assert state["t"][lang] == ts[lang], lang
        np.testing.assert_allclose(state["probs"][lang], probs[lang], rtol=1e-12)
    assert state["tail_share"] == pytest.approx(p_t, abs=1e-15)
    np.testing.assert_allclose(out.column("metaclip_p").to_pylist(), accept, rtol=1e-9, atol=1e-12)
    # the ``other`` bucket is not in the English counts: English t's tail share is English's own
    en_only = [ids for b, ids in zip(bucket, ref_ids) if b == "en"]
    assert int(state["counts"]["en"].sum()) == sum(map(len, en_only))


def test_detect_is_langids_classify(laion_texts):
    """The batched scoring gives langid.py's own answer, caption by caption."""
    from pairsift.metadata.language import _identifier, detect

    sample = laion_texts[::10]
    ident = _identifier()
    assert detect(sample) == [ident.classify(t)[0] for t in sample]


def test_default_balancing_is_the_papers_tail_share(tmp_path):
    """No t, no tail_share: t is derived from MetaCLIP's 400M tail share (5.64%), so a
    small pool is balanced; t = 20000 would keep everything of it."""
    from pairsift.metadata.balance import PAPER_TAIL_SHARE

    assert PAPER_TAIL_SHARE == pytest.approx((5.67 - 5.35) / 5.67, abs=1e-4)
    entries, captions = _synthetic_pool(20_000, n_entries=400, seed=5)
    stage = _stage(tmp_path, entries)
    state, (out,) = _run(stage, [[_batch(captions)]])
    counts, t = state["counts"]["*"], state["t"]["*"]
    assert t == p_to_t(counts, PAPER_TAIL_SHARE) and t < counts.max() / 5
    assert abs(t_to_p(counts, t) - PAPER_TAIL_SHARE) < 0.02
    assert out.column("drop_reason").null_count < 0.8 * len(captions)
    fixed = _stage(tmp_path, entries, t=20_000)
    _, (out20k,) = _run(fixed, [[_batch(captions)]])
    assert out20k.column("drop_reason").null_count == len(captions)  # nothing balanced


def test_worldwide_other_bucket_has_its_own_counts_and_t(tmp_path):
    """Captions in a language without a list go to ``other`` (matched with other_metadata),
    not into English's counts; with other_metadata null they match nothing."""
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "en.json").write_text(json.dumps(["dog", "cat", "park", "photo", "Roma"]))
    (folder / "de.json").write_text(json.dumps(["Hund", "Park"]))
    en = ["a photo of a dog in the park", "my cat sleeps on the sofa"] * 50
    it = ["una foto del cane nel parco di Roma", "il gatto dorme sul divano a Roma"] * 30
    captions = en + it
    stage = MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, t=40,
                                         other_metadata=str(folder / "en.json")), StageContext(seed=0))
    stage.preflight()
    state, (out,) = _run(stage, [[_batch(captions)]])
    langs = out.column("metaclip_lang").to_pylist()
    assert langs == ["en"] * 100 + ["other"] * 60
    assert state["counts"]["en"].tolist() == [50, 50, 50, 50, 0]  # Roma is not counted for English
    assert state["counts"]["other"].tolist() == [0, 0, 0, 0, 60]
    share = t_to_p(state["counts"]["en"], 40)
    assert state["t"]["en"] == 40 and state["t"]["other"] == p_to_t(state["counts"]["other"], share)
    assert all(p > 0 for p in out.column("metaclip_p").to_pylist()[100:])
    none = MetaClipStage(MetaClipConfig(metadata=str(folder), worldwide=True, t=40, other_metadata=None),
                         StageContext(seed=0))
    none.preflight()
    _, (out2,) = _run(none, [[_batch(captions)]])
    assert out2.column("metaclip_lang").to_pylist()[100:] == [None] * 60
    assert out2.column("drop_reason").to_pylist()[100:] == ["metaclip"] * 60
