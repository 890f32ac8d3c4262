"""Stage ``parrot``: captions that spell the text in their image ("parrot captions").

Lin et al. 2023, "Parrot Captions Teach CLIP to Spot Text": about half of LAION-2B's images
carry text and most of their captions spell it, which teaches CLIP to read instead of see.
Rule: every live image is read by an OCR engine (``engine``, RapidOCR by default), detection
first: a cheap detection pass (longer side shrunk to ``gate_side``) decides whether the image
has text at all, and only where it does does the accurate detection plus recognition run.
Stored per sample: ``ocr_text`` (recognised lines joined by spaces, in reading order; lines
with fewer than two letters or digits are discarded as detector false positives),
``ocr_boxes`` (lines with legible text), ``text_area`` (share of the image those boxes cover),
``cotr`` (co-emerging text rate: share of the caption's distinct words that are also OCR
words; the normalisation is in :mod:`pairsift.stages.cotr`) and ``cotr_fuzzy`` (the same with
near-miss words counted). A pair is dropped as ``parrot`` when ``cotr`` (``cotr_fuzzy`` when
``fuzzy``) exceeds ``max_cotr``; with ``drop_text_images`` every image whose ``text_area``
exceeds ``min_text_area`` is dropped as ``text_image`` (the paper's strictest subset keeps
only images without text). With ``clip_check`` the paper's text-removal check is stored as
``clip_text_drop``: the CLIP image-caption cosine similarity before minus after the text
regions that the caption spells are painted over (OpenCV inpainting); a large drop means the
caption matched the image through its text. 0 where the caption spells none of the text.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import mark_dropped, set_column
from pairsift.stages.base import Stage, StageConfig
from pairsift.stages.cotr import caption_words, matched_words, words

#: The CLIP similarity is computed at most this many images at a time.
CLIP_BATCH = 32
#: A recognised line needs this many letters or digits to count as text.
MIN_LINE_CHARS = 2
#: Text boxes are dilated by this share of their height before inpainting (strokes, shadows).
INPAINT_MARGIN = 0.15


class ClipModelConfig(StageConfig):
    """The CLIP model of the job's ``clip_score`` stage (same keys)."""

    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"


class ParrotConfig(StageConfig):
    engine: str = "rapidocr"
    max_cotr: float = Field(0.5, ge=0.0, le=1.0)
    fuzzy: bool = True
    drop_text_images: bool = False
    min_text_area: float = Field(0.0, ge=0.0, le=1.0)
    #: Longer side of the cheap detection pass; null: no cheap pass, accurate detection on all.
    gate_side: int | None = Field(640, ge=32)
    clip_check: bool = False
    clip: ClipModelConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 array of encoded image bytes, EXIF orientation applied. Transparent images
    are flattened onto black or white, whichever contrasts with their visible pixels (white
    text on a transparent background must not vanish on white)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"))
            alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
            visible = rgba[:, :, :3][rgba[:, :, 3] > 0]
            luma = float((visible @ np.array([0.299, 0.587, 0.114])).mean()) if len(visible) else 0.0
            bg = 255.0 if luma < 128 else 0.0
            return (rgba[:, :, :3] * alpha + bg * (1 - alpha)).round().astype(np.uint8)
        return np.asarray(img.convert("RGB"))


def box_mask(shape: tuple[int, int], boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """uint8 mask (255 inside) of the union of quadrilateral ``boxes``, each grown by
    ``margin`` times its height."""
    import cv2

    mask = np.zeros(shape, dtype=np.uint8)
    for box in boxes:
        box = np.asarray(box, dtype=np.float32)
        if margin:
            h = max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))
            c = box.mean(axis=0)
            d = box - c
            n = np.linalg.norm(d, axis=1, keepdims=True)
            box = c + d * (1 + margin * h / np.maximum(n, 1e-6))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 255)
    return mask


def text_area(shape: tuple[int, int], boxes: np.ndarray, max_side: int = 512) -> float:
    """Share of an image of ``shape`` (h, w) covered by the union of ``boxes``, measured on a
    raster whose longer side is at most ``max_side``."""
    if len(boxes) == 0:
        return 0.0
    h, w = shape
    s = min(1.0, max_side / max(h, w))
    mask = box_mask((max(1, round(h * s)), max(1, round(w * s))), np.asarray(boxes, dtype=np.float32) * s)
    return float(np.count_nonzero(mask)) / mask.size


def remove_text(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``image`` with the regions of ``boxes`` painted over by OpenCV inpainting (Telea)."""
    import cv2

    mask = box_mask(image.shape[:2], boxes, INPAINT_MARGIN)
    radius = max(3, int(round(0.01 * max(image.shape[:2]))))
    return cv2.inpaint(np.ascontiguousarray(image), mask, radius, cv2.INPAINT_TELEA)


class ClipSimilarity:
    """Cosine similarity of open_clip image and caption embeddings, through ``clip_score``'s
    loader (:mod:`pairsift.stages.clip_models`: the same model names and offline checks,
    QuickGELU for weights trained with it) and the same model calls (images as RGB, batches
    of ``CLIP_BATCH``, one torch thread a call on CPU: the numbers do not depend on the CPU
    count)."""

    def __init__(self, model: str, pretrained: str | None, device: str = "cpu", threads: int = 1):
        from pairsift.stages import clip_models

        self.loaded = clip_models.load(model, pretrained or None, device=device, where="parrot.clip")
        self.embedder = clip_models.PairEmbedder(self.loaded, threads)

    def __call__(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        from PIL import Image

        if not images:
            return np.zeros(0, dtype=np.float32)
        pixels = [self.loaded.image_tensor(Image.fromarray(a)) for a in images]
        image, text = self.embedder.embed(pixels, self.loaded.tokenizer(captions), CLIP_BATCH)
        return (image * text).sum(-1)


def check_clip(clip: ClipModelConfig) -> None:
    """ConfigError naming ``parrot.clip.*`` unless the model and its weights can be loaded
    here: ``clip_score``'s preflight checks (:mod:`pairsift.stages.clip_models`), so the same
    forms work (open_clip architectures, ``hf-hub:``, ``local-dir:``, model config files; tags,
    ``hf-hub:`` weights, checkpoint files) and missing weights are fetched, or, offline or
    unreachable, refused with the fix, never waited on."""
    from pairsift.stages import clip_models

    weights = clip_models.resolve(clip.model, clip.pretrained or None, "parrot.clip")
    clip_models.ensure_weights(weights, "parrot.clip")
    clip_models.check_tokenizer_files(clip.model, "parrot.clip")


class ParrotStage(Stage):
    name = "parrot"
    Config = ParrotConfig
    GPU_SHARE = 0.25  # OCR workers per GPU: 4

    def __init__(self, config, context=None):
        super().__init__(config, context)
        self.engine = None
        self.clip: ClipSimilarity | None = None

    # -- configuration -------------------------------------------------------------------
    def _engine_cuda(self) -> bool:
        """Whether the OCR engine can run on a GPU here."""
        from pairsift.stages.ocr_engines import engine_class

        cls = engine_class(self.config.engine)
        cuda = getattr(cls, "cuda_available", None)
        return bool(getattr(cls, "supports_cuda", False) and cuda is not None and cuda())

    def _wants_gpu(self) -> bool:
        c: ParrotConfig = self.config
        if c.device != "auto":
            return c.device == "cuda"
        if float(self.context.extras.get("cluster", {}).get("GPU", 0.0)) <= 0:
            return False
        return c.clip_check or self._engine_cuda()

    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.GPU_SHARE if self._wants_gpu() else 0.0}

    def preflight(self) -> None:
        from pairsift.stages.ocr_engines import check_engine

        c: ParrotConfig = self.config
        check_engine(c.engine)
        if c.device == "cuda" and not c.clip_check and not self._engine_cuda():
            raise ConfigError(f"parrot.device: 'cuda' but OCR engine {c.engine!r} has no CUDA support here "
                              f"(rapidocr needs the onnxruntime-gpu package)")
        if c.clip_check:
            if c.clip is None:
                raise ConfigError("parrot.clip: clip_check needs the CLIP model, e.g. clip: {model: ViT-B-32, "
                                  "pretrained: laion2b_s34b_b79k} (the same as the job's clip_score stage)")
            check_clip(c.clip)

    def setup(self) -> None:
        from pairsift.stages.ocr_engines import make_engine

        c: ParrotConfig = self.config
        granted = self.context.extras.get("resources", {})
        threads = max(1, int(granted.get("num_cpus", self.num_cpus)))
        gpu = float(granted.get("num_gpus", 0.0)) > 0 if granted else self._wants_gpu()
        self.engine = make_engine(c.engine, threads=threads, device="cuda" if gpu and self._engine_cuda() else "cpu")
        if c.clip_check:
            assert c.clip is not None
            device = "cpu"
            if gpu:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.clip = ClipSimilarity(c.clip.model, c.clip.pretrained, device)

    def summary(self) -> dict:
        c: ParrotConfig = self.config
        return {"engine": c.engine, "max_cotr": c.max_cotr, "fuzzy": c.fuzzy, "gate_side": c.gate_side,
                "clip": c.clip.model_dump() if c.clip_check and c.clip else None}

    # -- per sample ----------------------------------------------------------------------
    def read_text(self, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Boxes and texts of the legible lines in ``image``: cheap detection first, then
        accurate detection and recognition only where the cheap pass found text."""
        c: ParrotConfig = self.config
        if c.gate_side is not None and len(self.engine.detect(image, max_side=c.gate_side)) == 0:
            return np.zeros((0, 4, 2), np.float32), []
        boxes = self.engine.detect(image)
        if len(boxes) == 0:
            return boxes, []
        texts = self.engine.recognize(image, boxes)
        # Lines with fewer than MIN_LINE_CHARS letters or digits are discarded: the detector fires
        # on solid blobs (circles, squares, eyes, coins) and the recogniser reads one glyph there.
        keep = [i for i, t in enumerate(texts) if sum(ch.isalnum() for ch in t) >= MIN_LINE_CHARS]
        return boxes[keep], [texts[i] for i in keep]

    def process(self, batch: pa.Table) -> pa.Table:
        c: ParrotConfig = self.config
        if self.engine is None and batch.num_rows:
            self.setup()
        n = batch.num_rows
        images = batch.column("image").to_pylist()
        captions = batch.column("caption").to_pylist()
        done = batch.column("drop_reason").to_pylist()
        ocr_text: list[str | None] = [None] * n
        n_boxes: list[int | None] = [None] * n
        area: list[float | None] = [None] * n
        cotr_exact: list[float | None] = [None] * n
        cotr_fuzzy: list[float | None] = [None] * n
        drop: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        to_clip: list[tuple[int, np.ndarray, np.ndarray, str]] = []

        def clip_text_drop() -> None:  # before minus after, a chunk at a time (decoded pixels)
            caps = [t[3] for t in to_clip]
            before = self.clip([t[1] for t in to_clip], caps)
            after = self.clip([remove_text(t[1], t[2]) for t in to_clip], caps)
            for (i, *_), b, a in zip(to_clip, before, after):
                drop[i] = float(b - a)
            to_clip.clear()

        for i in range(n):
            if done[i] is not None or images[i] is None:
                continue
            try:
                img = decode_rgb(images[i])
            except Exception:  # noqa: BLE001 - Pillow raises many types on bad bytes
                reasons[i] = "decode_error"
                continue
            boxes, texts = self.read_text(img)
            ocr_text[i] = " ".join(texts)
            n_boxes[i] = len(texts)
            area[i] = text_area(img.shape[:2], boxes)
            cap = caption_words(captions[i])
            ocr = set(words(ocr_text[i]))
            cotr_exact[i] = len(matched_words(cap, ocr, False)) / len(cap) if cap and ocr else 0.0
            cotr_fuzzy[i] = len(matched_words(cap, ocr, True)) / len(cap) if cap and ocr else 0.0
            score = cotr_fuzzy[i] if c.fuzzy else cotr_exact[i]
            if score > c.max_cotr:
                reasons[i] = "parrot"
            elif c.drop_text_images and n_boxes[i] and area[i] > c.min_text_area:
                reasons[i] = "text_image"
            if c.clip_check:
                spelled = [j for j, t in enumerate(texts) if matched_words(cap, set(words(t)), c.fuzzy)]
                if spelled:
                    to_clip.append((i, img, boxes[spelled], captions[i]))
                    if len(to_clip) >= CLIP_BATCH:
                        clip_text_drop()
                else:
                    drop[i] = 0.0
        if to_clip:
            clip_text_drop()
        batch = set_column(batch, "ocr_text", ocr_text, pa.string())
        batch = set_column(batch, "ocr_boxes", n_boxes, pa.int32())
        batch = set_column(batch, "text_area", area, pa.float32())
        batch = set_column(batch, "cotr", cotr_exact, pa.float32())
        batch = set_column(batch, "cotr_fuzzy", cotr_fuzzy, pa.float32())
        if c.clip_check:
            batch = set_column(batch, "clip_text_drop", drop, pa.float32())
        return mark_dropped(batch, reasons, self.name)
