"""Co-emerging text rate (CoTR) between a caption and the text read in its image.

Lin et al. 2023, "Parrot Captions Teach CLIP to Spot Text", Algorithm 1: the share of the
caption's distinct words that also appear among the words read in the image,

    cotr = |set(caption.split()) & set(ocr_text.split())| / |set(caption.split())|

case-sensitive, on whitespace tokens as they are (punctuation stays part of a token): "The
Best Coffee in Town" against OCR "BEST COFFEE" is 0.0. The paper's spotter (DeepSolo) reads
word instances; ``ocr_text`` here is the recognised lines joined by spaces, and its whitespace
tokens are the same words (a line's words are separated by spaces in the recogniser's output).
:func:`cotr` is exactly that, and 0 where the caption or the OCR text has no token (the paper
divides by zero there). The reference repository (opendatalab/CLIP-Parrot-Bias) publishes no
CoTR code; Algorithm 1 in the paper is the reference.

:func:`cotr_normalized` is pairsift's own, more lenient variant (not the paper's), stored beside
it as ``cotr_normalized`` / ``cotr_fuzzy``. Normalisation, the same for caption and OCR text:
Unicode NFKC, then case folding; apostrophes inside words are removed ("don't" -> "dont");
tokens are the maximal runs of Unicode letters and digits (regex ``[^\\W_]+``, so punctuation,
symbols and underscores separate words); a run holding Han or kana characters is split into
one token per such character (those scripts do not put spaces between words); tokens shorter
than 2 characters are dropped (except single Han/kana characters). Caption side only: English
stop words (articles, pronouns, prepositions, conjunctions, forms of "be"/"have"/"do") are
removed, unless that leaves nothing, in which case they are kept. The rate is |C ∩ O| / |C|
over the *distinct* caption words C and the OCR words O (0 when C or O is empty).
With ``fuzzy`` it also counts a caption word of at least 4 characters that is within a small
Levenshtein distance of an OCR word (1 edit up to 7 characters, 2 beyond; words of digits
must match exactly) or that appears inside an OCR word (OCR often glues words: "COFFEESHOP").
"""

from __future__ import annotations

import re
import unicodedata

_APOSTROPHE = re.compile(r"(?<=\w)['\u2019\u02bc](?=\w)")
_WORD = re.compile(r"[^\W_]+")
# Han (CJK unified ideographs, extension A, compatibility), hiragana and katakana.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
MIN_LEN = 2
FUZZY_MIN_LEN = 4

STOP_WORDS = frozenset(
    """a an the and or but nor so yet if then than as of at by for from in into on onto off out over
    under up down to with within without about above below across after against along among around
    before behind beside between beyond during near per since through toward towards upon via
    i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
    this that these those who whom whose which what there here
    is are was were be been being am have has had having do does did doing
    not no very just also too can will would shall should may might must""".split()
)


def words(text: str | None) -> list[str]:
    """The normalised tokens of ``text``, in order (see the module docstring)."""
    if not text:
        return []
    text = _APOSTROPHE.sub("", unicodedata.normalize("NFKC", text).casefold())
    out: list[str] = []
    for run in _WORD.findall(text):
        if _CJK.search(run):
            pos = 0
            for m in _CJK.finditer(run):
                if m.start() > pos and m.start() - pos >= MIN_LEN:
                    out.append(run[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if len(run) - pos >= MIN_LEN:
                out.append(run[pos:])
        elif len(run) >= MIN_LEN:
            out.append(run)
    return out


def caption_words(caption: str | None) -> set[str]:
    """Distinct caption words without stop words (all of them where only stop words remain)."""
    tokens = set(words(caption))
    content = {t for t in tokens if t not in STOP_WORDS}
    return content or tokens


def _max_edits(word: str) -> int:
    if len(word) < FUZZY_MIN_LEN or word.isdigit():
        return 0
    return 1 if len(word) <= 7 else 2


def matched_words(caption: set[str], ocr: set[str], fuzzy: bool) -> set[str]:
    """The caption words found among the OCR words (exactly, or fuzzily when ``fuzzy``)."""
    found = caption & ocr
    if not fuzzy or not ocr:
        return found
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    ocr_list = sorted(ocr)
    for w in caption - found:
        k = _max_edits(w)
        if k == 0:
            continue
        if process.extractOne(w, ocr_list, scorer=Levenshtein.distance, score_cutoff=k) is not None:
            found.add(w)
        elif any(w in o for o in ocr_list if len(o) > len(w)):
            found.add(w)
    return found


def cotr_normalized(caption: str | None, ocr_text: str | None, fuzzy: bool = False) -> float:
    """Share of the caption's distinct normalised words that also appear in ``ocr_text``
    (pairsift's variant; see the module docstring)."""
    cap = caption_words(caption)
    ocr = set(words(ocr_text))
    if not cap or not ocr:
        return 0.0
    return len(matched_words(cap, ocr, fuzzy)) / len(cap)


# -- the paper's CoTR ------------------------------------------------------------------------

def tokens(text: str | None) -> set[str]:
    """The distinct whitespace tokens of ``text`` as they are (the paper's ``set(text.split())``)."""
    return set(text.split()) if text else set()


def cotr(caption: str | None, ocr_text: str | None) -> float:
    """Lin et al. 2023, Algorithm 1: |caption tokens ∩ OCR tokens| / |caption tokens|, case-sensitive
    whitespace tokens; 0 when either side has none."""
    cap = tokens(caption)
    if not cap:
        return 0.0
    return len(cap & tokens(ocr_text)) / len(cap)


#: The CoTR variants a policy can read, by column name.
SCORES = ("cotr", "cotr_normalized", "cotr_fuzzy")


def spells(caption: str | None, token: str, score: str = "cotr") -> bool:
    """Whether OCR ``token`` (one whitespace token of a recognised line) is a caption word under
    the rule of ``score``: the same token in the caption (``cotr``), or a normalised caption
    word among the token's normalised words (``cotr_normalized``; near misses too with
    ``cotr_fuzzy``)."""
    if score == "cotr":
        return token in tokens(caption)
    return bool(matched_words(caption_words(caption), set(words(token)), score == "cotr_fuzzy"))
