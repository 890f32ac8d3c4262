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


def detect(texts: Sequence[str | None]) -> list[str | None]:
    """The language of each text (None for a missing or blank text)."""
    ident = _identifier()
    out: list[str | None] = []
    for t in texts:
        if t is None or not t.strip():
            out.append(None)
            continue
        lang, _ = ident.classify(t)
        out.append(lang)
    return out


def metadata_language(lang: str | None, known) -> str | None:
    """``lang`` if it has metadata, else its wordfreq alias if that has, else None."""
    if lang is None or lang in known:
        return lang
    alias = ALIASES.get(lang)
    return alias if alias in known else None
