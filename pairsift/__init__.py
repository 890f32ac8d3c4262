"""pairsift: curate web-scale image-text pairs for CLIP-style training.

The engine lives in :mod:`pairsift.pipeline` (``pipeline/`` in the repository), the stages in
:mod:`pairsift.stages` (``stages/``) and the MetaCLIP metadata in :mod:`pairsift.metadata`.
"""

__version__ = "0.1.0"
