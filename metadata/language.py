"""Language identification for MetaCLIP 2's worldwide mode, offline (langid.py).

langid.py (Lui & Baldwin 2012) ships its model inside the package, so nothing is downloaded.
Codes are ISO 639-1 as langid gives them; :func:`metadata_language` maps one to a language
that has metadata, through the codes wordfreq uses where they differ (``no`` -> ``nb``,
``tl`` -> ``fil``, Croatian/Serbian/Bosnian -> ``sh``).
"""

from __future__ import annotations

from typing import Sequence

ALIASES = {"no": "nb", "tl": "fil", "hr": "sh", "sr": "sh", "bs": "sh"}
_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model

        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    return _IDENTIFIER


def detect(texts: Sequence[str | None], chunk: int = 1024) -> list[str | None]:
    """The language of each text (None for a missing or blank text): langid.py's
    ``classify`` (its byte n-gram features, naive Bayes scores, arg max), with the scores of
    ``chunk`` texts computed in one float64 matrix product instead of one mixed-type dot
    product per text (~70x faster; the same languages, checked in the tests)."""
    import numpy as np

    ident = _identifier()
    ptc, pc = _scores()
    out: list[str | None] = [None] * len(texts)
    todo = [i for i, t in enumerate(texts) if t is not None and t.strip()]
    for a in range(0, len(todo), chunk):
        rows = todo[a:a + chunk]
        fv = np.stack([ident.instance2fv(texts[i]) for i in rows]).astype(np.float64)
        best = (fv @ ptc + pc).argmax(axis=1)
        for i, k in zip(rows, best):
            out[i] = str(ident.nb_classes[k])
    return out


_SCORES = None


def _scores():
    global _SCORES
    if _SCORES is None:
        ident = _identifier()
        _SCORES = (ident.nb_ptc.astype("float64"), ident.nb_pc.astype("float64"))
    return _SCORES


def metadata_language(lang: str | None, known) -> str | None:
    """``lang`` if it has metadata, else its wordfreq alias if that has, else None."""
    if lang is None or lang in known:
        return lang
    alias = ALIASES.get(lang)
    return alias if alias in known else None
