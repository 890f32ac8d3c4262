"""Stage registry: job specs name stages; this maps each name to its class.

Entries are import paths so that reading a job spec does not import torch or OCR engines;
a stage's module imports its heavy dependencies in ``setup()``. Later stages register here
under the names the job spec uses (``clip_score``, ``parrot``, ``semdedup``,
``concept_prune``, ``metaclip``, ``recaption``).
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "quality": "pairsift.stages.quality:QualityStage",
    "exact_dedup": "pairsift.stages.exact_dedup:ExactDedupStage",
}


def stage_names() -> list[str]:
    return sorted(REGISTRY)


def get_stage_class(name: str):
    """The stage class registered as ``name``; KeyError if there is none."""
    target = REGISTRY[name]
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
