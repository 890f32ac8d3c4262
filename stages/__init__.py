"""Stage registry: job specs name stages; this maps each name to its class.

Entries are import paths so that reading a job spec does not import torch or OCR engines;
a stage's module imports its heavy dependencies in ``setup()``. Later stages register here
under the names the job spec uses (``clip_score``, ``parrot``, ``semdedup``,
``concept_prune``, ``metaclip``, ``recaption``).
"""

from __future__ import annotations

import importlib
import importlib.util

REGISTRY: dict[str, str] = {
    "quality": "pairsift.stages.quality:QualityStage",
    "language": "pairsift.stages.language:LanguageStage",
    "exact_dedup": "pairsift.stages.exact_dedup:ExactDedupStage",
    "fault_injection": "pairsift.stages.faults:FaultInjectionStage",
    "clip_score": "pairsift.stages.clip_score:ClipScoreStage",
    "metaclip": "pairsift.stages.metaclip:MetaClipStage",
    "semdedup": "pairsift.stages.semdedup:SemDedupStage",
    "concept_prune": "pairsift.stages.concept_prune:ConceptPruneStage",
    "parrot": "pairsift.stages.parrot:ParrotStage",
    "recaption": "pairsift.stages.recaption:RecaptionStage",
}


def stage_names() -> list[str]:
    """Names of the stages whose modules are present."""
    names = []
    for name, target in REGISTRY.items():
        if importlib.util.find_spec(target.partition(":")[0]) is not None:
            names.append(name)
    return sorted(names)


def get_stage_class(name: str):
    """The stage class registered as ``name``, or named by an import path
    (``package.module:Class``, for stages that live outside pairsift); KeyError if none."""
    target = REGISTRY.get(name) or (name if ":" in name else None)
    if target is None:
        raise KeyError(name)
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"{name} ({e})") from None
    from pairsift.stages.base import Stage

    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise KeyError(f"{name} is not a pairsift Stage")
    return cls
