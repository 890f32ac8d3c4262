"""Stage ``clip_score``: CLIP image-text similarity, and the filters built on it.

The score every CLIP data recipe starts with: LAION-400M/5B keep pairs whose OpenAI ViT-B/32
cosine similarity is at least 0.28 (Schuhmann et al. 2021, 2022); DataComp's CLIP-score
baseline keeps the top 30% of the pool by ViT-L/14 score (Gadre et al. 2023); DFN swaps in a
filtering network of the same shape (Fang et al. 2023). Rule: each live pair's image (decoded
with Pillow and converted to RGB, as open_clip_train's loader feeds training, then preprocessed
by open_clip's own inference ``preprocess`` for the model) and caption (tokenized by open_clip's tokenizer for the model, which truncates captions longer than
the context) are embedded, both embeddings are L2-normalised, and ``clip_score`` is their dot
product (float32). With ``save_embeddings`` the normalised embeddings are kept as ``image_emb``
and ``text_emb`` (float16). ``min_score`` drops pairs scoring below it (reason ``clip_score``);
``top_fraction`` f keeps exactly round(f * N) of the N live pairs of the whole pool, the ones
with the highest score, ties broken by the smaller ``uid`` (reason ``clip_score`` for the rest);
neither: score only. An image Pillow cannot decode is dropped with ``decode_error``. The
model runs with the activation its weights were trained with: QuickGELU for OpenAI's CLIP
(Radford et al. 2021) and every tag open_clip marks ``quick_gelu``
(:func:`pairsift.stages.clip_models.quick_gelu`). On CPU the scores do not depend on the
number of CPUs: every model call runs with one torch thread on a fixed batch
(:class:`pairsift.stages.clip_models.PairEmbedder`). ``decode: gpu`` decodes JPEGs in batches
with torchvision on the model's device and resizes them there
(:class:`pairsift.stages.clip_models.TensorPreprocess`); everything else, and whatever
torchvision refuses, is decoded by Pillow as with ``decode: cpu`` (so the drops are the same,
the scores within ~1e-3: torchvision's antialiased bicubic is not Pillow's).

With ``top_fraction`` the stage is global, with two passes that keep the driver small at any
pool size (the histogram-then-narrow-pass of ``concept_prune``): ``histogram`` counts the live
scores in 2^20 order-preserving bins and finds the bin holding the cut-off; ``cut`` gathers only
that bin's (score, uid) pairs and picks the exact cut-off pair; ``apply`` drops everything below
it — the same decisions as sorting the whole pool. Models, weights and the cache check live in
:mod:`pairsift.stages.clip_models`.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import field_validator, model_serializer, model_validator

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages import clip_models
from pairsift.stages.topcut import TopFractionCut
from pairsift.stages.base import GlobalStage, Resources, StageConfig, decision, runtime

log = logging.getLogger("pairsift.clip_score")


class ClipScoreConfig(StageConfig):
    #: open_clip architecture name, ``hf-hub:org/repo``, ``local-dir:/path``, or a model config .json.
    model: str = "ViT-B-32"
    #: open_clip tag, ``hf-hub:org/repo[/file]``, a checkpoint file, or ``random``.
    pretrained: str | None = "laion2b_s34b_b79k"
    batch_size: int = runtime(256, ge=1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = runtime("auto")
    min_score: float | None = decision(None)
    top_fraction: float | None = decision(None, gt=0, le=1)
    save_embeddings: bool = True
    #: CPUs one worker asks for (default: all the job's CPUs on a CPU job, CPUs / GPUs on a GPU job).
    cpus_per_worker: int | None = runtime(None, ge=1)
    #: Threads decoding and preprocessing images (default: the worker's CPUs).
    decode_threads: int | None = runtime(None, ge=1)
    #: ``cpu``: Pillow decodes, open_clip's preprocess resizes (as open_clip_train's loader);
    #: ``gpu``: JPEGs decoded in batches by torchvision on the model's device (nvJPEG on CUDA;
    #: libjpeg-turbo where the model runs on CPU) and resized there
    #: (:class:`pairsift.stages.clip_models.TensorPreprocess`); other images through Pillow.
    decode: Literal["cpu", "gpu"] = "cpu"

    @model_serializer(mode="wrap")
    def _omit_default_decode(self, handler):
        """``decode`` is dumped only when set: specs from before it keep their fingerprint."""
        d = handler(self)
        if isinstance(d, dict) and d.get("decode") == "cpu":
            d.pop("decode")
        return d

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        return os.path.abspath(v) if clip_models.is_config_file(v) else v

    @field_validator("pretrained")
    @classmethod
    def _pretrained_path(cls, v: str | None) -> str | None:
        return os.path.abspath(v) if v and os.path.isfile(v) else v

    @model_validator(mode="after")
    def _one_filter(self):
        if self.min_score is not None and self.top_fraction is not None:
            raise ValueError("min_score and top_fraction: give at most one")
        return self


class ClipScoreStage(TopFractionCut, GlobalStage[ClipScoreConfig]):
    name = "clip_score"
    version = "2"  # QuickGELU for OpenAI weights, RGB before the transform, one-thread CPU calls

    def __init__(self, config, context=None):
        super().__init__(config, context)
        self._loaded: clip_models.LoadedModel | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._embedder: clip_models.PairEmbedder | None = None
        self._on_device: clip_models.TensorPreprocess | None = None  # decode: gpu
        self._quick_gelu: bool | None = None
        self._dim: int | None = None
        self._timings: Counter = Counter()

    @classmethod
    def is_global(cls, config: ClipScoreConfig) -> bool:
        return config.top_fraction is not None

    # ------------------------------------------------------------------ driver side

    def preflight(self) -> None:
        c = self.config
        weights = clip_models.resolve(c.model, c.pretrained)
        clip_models.ensure_weights(weights)
        clip_models.check_tokenizer_files(c.model)
        self._dim = clip_models.embed_dim(c.model)
        self._quick_gelu = clip_models.quick_gelu(c.model, c.pretrained)

    def resources(self) -> Resources:
        c = self.config
        cluster = self.context.extras.get("cluster") or {}
        cpus = max(1, int(cluster.get("CPU", 1)))
        gpus = int(cluster.get("GPU", 0))
        cap = min(cpus, c.cpus_per_worker or os.cpu_count() or cpus)
        if c.device == "cuda" and gpus < 1:
            raise ConfigError("clip_score.device: cuda, but the Ray cluster has no GPU")
        if c.device != "cpu" and gpus >= 1:  # one worker per GPU
            return Resources(cpus=float(max(1, min(cap, cpus // gpus))), gpus=1.0)
        # On CPU one worker takes the job's CPUs: its model threads (one torch thread each) and
        # its decode threads use them (reading happens inside the same task).
        return Resources(cpus=float(cap), gpus=0.0)

    def batch_rows(self) -> int:
        return self.config.batch_size  # the worker hands over whole model batches

    def summary(self) -> dict:
        c = self.config
        if self._quick_gelu is None:
            self._quick_gelu = clip_models.quick_gelu(c.model, c.pretrained)
        return {"model": c.model, "pretrained": c.pretrained, "quick_gelu": self._quick_gelu,
                "min_score": c.min_score, "top_fraction": c.top_fraction}

    # ------------------------------------------------------------------ worker side

    def setup(self) -> None:
        """Nothing heavy: the model loads on the first batch with live rows, so workers that
        only run ``apply`` (or see no live rows) never load it."""

    def _ensure_model(self) -> clip_models.LoadedModel:
        if self._loaded is not None:
            return self._loaded
        import torch

        c = self.config
        granted = self.context.extras.get("resources") or {}
        cpus = int(granted.get("num_cpus") or 0)
        if cpus:
            torch.set_num_threads(cpus)  # this thread's torch work (other stages of the phase)
        device = c.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("clip_score.device is cuda but this worker sees no CUDA device")
        precision = c.precision if c.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
        t0 = time.perf_counter()
        self._loaded = clip_models.load(c.model, c.pretrained, device=device, precision=precision)
        self._dim = self._loaded.embed_dim
        workers = cpus or torch.get_num_threads()
        self._embedder = clip_models.PairEmbedder(self._loaded, workers)
        threads = c.decode_threads or workers
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-decode")
        if c.decode == "gpu":
            self._on_device = clip_models.TensorPreprocess(self._loaded.preprocess, self._loaded.device)
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        log.info("clip_score: loaded %s (%s) on %s, %s, %s, %s, %d decode threads%s, in %.1f s",
                 c.model, c.pretrained, device, precision, "QuickGELU" if self._loaded.quick_gelu else "GELU",
                 f"{workers} model threads of 1 torch thread" if device == "cpu" else "one model thread",
                 threads, f", JPEGs decoded by torchvision on {device}" if self._on_device else "",
                 time.perf_counter() - t0)
        return self._loaded

    def _embed_dim(self) -> int:
        if self._dim is None:
            self._dim = clip_models.embed_dim(self.config.model)
        return self._dim

    def take_timings(self) -> dict[str, float]:
        out, self._timings = dict(self._timings), Counter()
        return out

    def _prepare(self, data: bytes):
        """Decode and preprocess one image as open_clip_train's loader does (RGB first, then
        the transform; runs in the decode threads, Pillow and the resize release the GIL).
        Returns (tensor or None, seconds)."""
        t0 = time.perf_counter()
        try:
            with Image.open(BytesIO(data)) as img:
                x = self._loaded.image_tensor(img)
        except Exception:  # noqa: BLE001 - any decode failure is the sample's drop reason
            x = None
        return x, time.perf_counter() - t0

    def _prepare_on_device(self, data: bytes):
        """:meth:`_prepare` with the tensor moved to the model's device (``decode: gpu``'s
        Pillow path, for images torchvision does not decode)."""
        x, secs = self._prepare(data)
        return (x.to(self._loaded.device) if x is not None else None), secs

    def _decode_on_device(self, images: list[bytes]) -> list[Future]:
        """``decode: gpu``: the batch's JPEGs decoded and preprocessed on the model's device,
        the rest (other formats, what torchvision refuses) by Pillow in the decode threads;
        futures in :meth:`_prepare`'s shape, in order."""
        t0 = time.perf_counter()
        tensors = self._on_device.decode(images)
        share = (time.perf_counter() - t0) / max(1, sum(x is not None for x in tensors))
        out = []
        for x, data in zip(tensors, images):
            if x is None:
                out.append(self._pool.submit(self._prepare_on_device, data))
            else:
                done: Future = Future()
                done.set_result((x, share))
                out.append(done)
        return out

    def _embed(self, images: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ok mask, image embeddings, text embeddings) of the pairs, normalised, float32."""
        m = self._ensure_model()
        if self._on_device is not None:
            futures = self._decode_on_device(images)
        else:
            futures = [self._pool.submit(self._prepare, d) for d in images]
        t0 = time.perf_counter()
        tokens = m.tokenizer(captions)
        self._timings["tokenize"] += time.perf_counter() - t0
        if m.device.type == "cuda":
            return self._embed_cuda(m, futures, tokens)
        return self._embed_cpu(futures, tokens)

    def _embed_cpu(self, futures: list, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CPU: the decoded pairs, in order, cut into model calls of ``CPU_BATCH`` (at most
        ``batch_size``) pairs, each run with one torch thread, as many side by side as the
        worker has CPUs (:class:`clip_models.PairEmbedder`): the numbers do not depend on the
        CPU count. A call starts as soon as its images are decoded."""
        import torch

        m = self._loaded
        size = min(self.config.batch_size, clip_models.CPU_BATCH)
        ok = np.zeros(len(futures), dtype=bool)
        wait = [0.0]

        def batches():
            pixels, rows = [], []
            for i, f in enumerate(futures):
                t0 = time.perf_counter()
                x, secs = f.result()
                wait[0] += time.perf_counter() - t0
                self._timings["decode"] += secs
                if x is None:
                    continue
                ok[i] = True
                pixels.append(x)
                rows.append(i)
                if len(pixels) == size:
                    yield torch.stack(pixels), tokens[rows]
                    pixels, rows = [], []
            if pixels:
                yield torch.stack(pixels), tokens[rows]

        t0 = time.perf_counter()
        parts = self._embedder.run(batches())
        self._timings["decode_wait"] += wait[0]
        self._timings["infer_wait"] += time.perf_counter() - t0 - wait[0]
        self._timings["infer"] += sum(p[2] for p in parts)  # thread seconds
        if not parts:
            return ok, np.zeros((0, m.embed_dim), np.float32), np.zeros((0, m.embed_dim), np.float32)
        return ok, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _embed_cuda(self, m: clip_models.LoadedModel, futures: list, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CUDA: the GPU encodes the captions (``batch_size`` at a time) while the CPU threads
        decode the images, then the decoded images in batches of ``batch_size``."""
        import torch
        import torch.nn.functional as F

        bs = self.config.batch_size

        def encode(fn, x: torch.Tensor, dtype=None) -> torch.Tensor:
            """Model batches of ``batch_size``, moved to the device (then cast: cheaper there)."""
            out = []
            for i in range(0, len(x), bs):
                chunk = x[i:i + bs].to(m.device, non_blocking=True)
                out.append(F.normalize(fn(chunk if dtype is None else chunk.to(dtype)).float(), dim=-1))
            return torch.cat(out) if out else torch.empty(0, m.embed_dim)

        with torch.inference_mode():
            t0 = time.perf_counter()
            text = encode(m.model.encode_text, tokens)
            self._timings["infer"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            prepared = [f.result() for f in futures]
            self._timings["decode_wait"] += time.perf_counter() - t0
            self._timings["decode"] += sum(s for _, s in prepared)
            ok = np.array([x is not None for x, _ in prepared], dtype=bool)
            t0 = time.perf_counter()
            if ok.any():
                pixels = torch.stack([x for x, _ in prepared if x is not None])
                image = encode(m.model.encode_image, pixels, m.input_dtype)
            else:
                image = torch.empty(0, m.embed_dim)
            text = text[torch.from_numpy(ok).to(text.device)]
            image, text = image.cpu().numpy(), text.cpu().numpy()
            self._timings["infer"] += time.perf_counter() - t0
        return ok, image, text

    def compute(self, batch: pa.Table) -> pa.Table:
        """Scores (and embeddings) of the live pairs; images that do not decode are dropped."""
        c = self.config
        n = batch.num_rows
        live = live_mask(batch)
        images = batch.column("image").to_pylist()
        reasons: list[str | None] = [None] * n
        todo = []
        for i in range(n):
            if live[i]:
                if images[i] is None:
                    reasons[i] = "missing_image"
                else:
                    todo.append(i)
        scores = np.zeros(n, dtype=np.float32)
        scored = np.zeros(n, dtype=bool)
        dim = self._embed_dim()
        img_emb = np.zeros((n, dim), dtype=np.float16)
        txt_emb = np.zeros((n, dim), dtype=np.float16)
        if todo:
            captions = batch.column("caption").to_pylist()
            ok, image, text = self._embed([images[i] for i in todo], [captions[i] or "" for i in todo])
            rows = np.asarray(todo)[ok]
            scores[rows] = (image * text).sum(axis=1)
            scored[rows] = True
            img_emb[rows] = image.astype(np.float16)
            txt_emb[rows] = text.astype(np.float16)
            for i in np.asarray(todo)[~ok]:
                reasons[i] = "decode_error"
        batch = set_column(batch, "clip_score", pa.array(scores, mask=~scored), pa.float32())
        if c.save_embeddings:
            mask = pa.array(~scored)
            for name, emb in (("image_emb", img_emb), ("text_emb", txt_emb)):
                arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim, mask=mask)
                batch = set_column(batch, name, arr)
        return mark_dropped(batch, reasons, self.name)

    def decide(self, batch: pa.Table) -> pa.Table:
        """``min_score``: drop the live pairs scoring below it (NaN too)."""
        c = self.config
        if c.min_score is None or not batch.num_rows:
            return batch
        live = live_mask(batch)
        scores = batch.column("clip_score").to_pylist()
        reasons = [self.name if ok and s is not None and not s >= c.min_score else None
                   for ok, s in zip(live, scores)]
        return mark_dropped(batch, reasons, self.name)

    # ------------------------------------------------------------------ top_fraction (stages/topcut.py)

    cut_column = "clip_score"
    cut_reason = "clip_score"

    @property
    def cut_fraction(self) -> float:
        return self.config.top_fraction
