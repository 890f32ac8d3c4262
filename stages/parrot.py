"""Stage ``parrot``: captions that spell the text in their image ("parrot captions").

Lin et al. 2023, "Parrot Captions Teach CLIP to Spot Text": about half of LAION-2B's images
carry text and most of their captions spell it, which teaches CLIP to read instead of see.
Rule: every live image is read by an OCR engine (``engine``, RapidOCR by default), detection
first: a cheap detection pass (longer side shrunk to ``gate_side``) decides whether the image
has text; where it accepted a box, or where it shrank the image and its text probability map
exceeds ``gate_min_prob`` without a box (text too small to resolve at that size: it is
unsure), the accurate detection plus recognition run. Stored per sample: ``ocr_text``
(recognised lines joined by spaces, in reading order; lines with fewer than two letters or
digits are discarded as detector false positives), ``ocr_boxes`` (lines with legible text),
``text_area`` (share of the image those boxes cover), ``cotr`` (the paper's co-emerging text
rate, Algorithm 1: share of the caption's distinct whitespace tokens that are OCR tokens,
case-sensitive; :mod:`pairsift.stages.cotr`), ``cotr_normalized`` and ``cotr_fuzzy``
(pairsift's lenient variants: normalised words, and near misses). ``policy`` keeps one of the
paper's subsets: ``cotr_below_0.3`` (CoTR < 0.3; the rest
is dropped as ``parrot``), ``cotr_zero`` (CoTR = 0), ``no_text`` (images without embedded
text, the paper's released 100M subset's rule "empty OCR results"; the rest is dropped as
``text_image``), or ``max_cotr`` (drop as ``parrot`` above the given ``max_cotr``); ``score``
picks which CoTR the CoTR policies read (the paper's by default). With ``clip_check`` the
paper's text-removal check is stored as ``clip_text_drop``: the CLIP image-caption cosine
similarity before minus after the *words* that the caption spells (under ``score``'s rule) are
painted over (word boxes from the engine; OpenCV inpainting); a large drop means the caption
matched the image through its text. 0 where the caption spells none of the text.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import Resources, Stage, StageConfig, decision, runtime
from pairsift.stages.cotr import SCORES, cotr, cotr_normalized, spells

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
    #: Which subset is kept: CoTR < 0.3, CoTR = 0, images without text, or CoTR <= ``max_cotr``.
    policy: Literal["cotr_below_0.3", "cotr_zero", "no_text", "max_cotr"] = decision("cotr_below_0.3")
    #: Which CoTR the CoTR policies read: the paper's, or pairsift's normalised / fuzzy variant.
    score: Literal["cotr", "cotr_normalized", "cotr_fuzzy"] = "cotr"
    #: Only with ``policy: max_cotr``: drop where the score exceeds it.
    max_cotr: float | None = decision(None, ge=0.0, le=1.0)
    #: ``no_text``: an image is a text image when its legible lines cover more than this share
    #: (0: any legible text, the paper's "empty OCR results").
    min_text_area: float = decision(0.0, ge=0.0, le=1.0)
    #: Longer side of the cheap detection pass; null: no cheap pass, accurate detection on all.
    gate_side: int | None = Field(640, ge=32)
    #: The cheap pass is unsure (and the accurate pass runs) where it shrank the image and its
    #: text probability map exceeds this without a box; null: only a box counts. 0.3 is
    #: RapidOCR's DB binarisation threshold.
    gate_min_prob: float | None = Field(0.3, ge=0.0, le=1.0)
    clip_check: bool = False
    clip: ClipModelConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = runtime("auto")

    @model_validator(mode="after")
    def _max_cotr_with_its_policy(self):
        if self.policy == "max_cotr" and self.max_cotr is None:
            raise ValueError("policy 'max_cotr' needs max_cotr (drop where the score exceeds it)")
        if self.policy != "max_cotr" and self.max_cotr is not None:
            raise ValueError(f"max_cotr is only read by policy 'max_cotr' (policy is {self.policy!r})")
        return self

    def drops_parrot(self, score: float) -> bool:
        """Whether a pair with CoTR ``score`` falls outside the kept subset (CoTR policies)."""
        if self.policy == "cotr_below_0.3":
            return score >= 0.3
        if self.policy == "cotr_zero":
            return score > 0.0
        if self.policy == "max_cotr":
            return score > self.max_cotr
        return False


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


def spelled_regions(caption: str | None, texts: list[str], boxes: np.ndarray,
                    words: list[list[tuple[str, np.ndarray]]] | None, score: str = "cotr") -> np.ndarray:
    """The quadrilaterals of the OCR words that ``caption`` spells (under ``score``'s rule): per
    line, its whitespace tokens that are caption words, each painted by the word boxes it is made
    of (``words``, from the engine), or by the whole line where the engine gave none for it."""
    out: list[np.ndarray] = []
    for i, text in enumerate(texts):
        toks = text.split()
        hit = {k for k, t in enumerate(toks) if spells(caption, t, score)}
        if not hit:
            continue
        line_words = words[i] if words is not None and i < len(words) else []
        # Which token each word box belongs to: its characters' position in the line's text.
        starts, pos = [], 0
        for t in toks:
            pos = text.index(t, pos)
            starts.append(pos)
            pos += len(t)
        located: set[int] = set()
        pos = 0
        for word, quad in line_words:
            at = text.find(word, pos)
            if at < 0:
                continue
            pos = at + len(word)
            k = max((j for j, st in enumerate(starts) if st <= at), default=0)
            if k in hit:
                out.append(np.asarray(quad, np.float32))
                located.add(k)
        if hit - located:  # no word box for a spelled token: its whole line
            out.append(np.asarray(boxes[i], np.float32))
    return np.stack(out) if out else np.zeros((0, 4, 2), np.float32)


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


class ParrotStage(Stage[ParrotConfig]):
    name = "parrot"
    version = "2"  # `cotr` is the paper's Algorithm 1
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
        c = self.config
        if c.device != "auto":
            return c.device == "cuda"
        if float(self.context.extras.get("cluster", {}).get("GPU", 0.0)) <= 0:
            return False
        return c.clip_check or self._engine_cuda()

    def resources(self) -> Resources:
        return Resources(cpus=self.num_cpus, gpus=self.GPU_SHARE if self._wants_gpu() else 0.0)

    def preflight(self) -> None:
        from pairsift.stages.ocr_engines import check_engine

        c = self.config
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

        c = self.config
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
        c = self.config
        return {"engine": c.engine, "policy": c.policy, "score": c.score, "max_cotr": c.max_cotr,
                "min_text_area": c.min_text_area, "gate_side": c.gate_side, "gate_min_prob": c.gate_min_prob,
                "clip": c.clip.model_dump() if c.clip_check and c.clip else None}

    # -- per sample ----------------------------------------------------------------------
    def has_text_cheaply(self, image: np.ndarray) -> bool:
        """The gate: whether the cheap detection pass found text, or is unsure and the accurate
        pass must look: it shrank the image (looked at fewer pixels than the image has) and its
        probability map exceeds ``gate_min_prob`` where it accepted no box. On an image it saw
        at full size, only a box counts: looking again would add no pixels."""
        c = self.config
        shrunk = c.gate_side is not None and max(image.shape[:2]) > c.gate_side
        gate = getattr(self.engine, "gate", None)
        if gate is None or c.gate_min_prob is None or not shrunk:  # boxes decide
            return len(self.engine.detect(image, max_side=c.gate_side)) > 0
        boxes, peak = gate(image, c.gate_side)
        return len(boxes) > 0 or peak > c.gate_min_prob

    def read_text(self, image: np.ndarray, with_words: bool = False):
        """Boxes and texts of the legible lines in ``image`` (and, ``with_words``, each line's
        word boxes): cheap detection first, then accurate detection and recognition only where
        the cheap pass found text or was unsure."""
        c = self.config
        empty = (np.zeros((0, 4, 2), np.float32), [])
        if c.gate_side is not None and not self.has_text_cheaply(image):
            return (*empty, []) if with_words else empty
        boxes = self.engine.detect(image)
        if len(boxes) == 0:
            return (boxes, [], []) if with_words else (boxes, [])
        words = None
        if with_words and hasattr(self.engine, "recognize_words"):
            texts, words = self.engine.recognize_words(image, boxes)
        else:
            texts = self.engine.recognize(image, boxes)
        # Lines with fewer than MIN_LINE_CHARS letters or digits are discarded: the detector fires
        # on solid blobs (circles, squares, eyes, coins) and the recogniser reads one glyph there.
        keep = [i for i, t in enumerate(texts) if sum(ch.isalnum() for ch in t) >= MIN_LINE_CHARS]
        if not with_words:
            return boxes[keep], [texts[i] for i in keep]
        return boxes[keep], [texts[i] for i in keep], [words[i] for i in keep] if words is not None else None

    def compute(self, batch: pa.Table) -> pa.Table:
        """OCR, the CoTR scores and (with ``clip_check``) the CLIP drop of every live row;
        images that do not decode are dropped (``decode_error``)."""
        c = self.config
        if self.engine is None and batch.num_rows:
            self.setup()
        n = batch.num_rows
        images = batch.column("image").to_pylist()
        captions = batch.column("caption").to_pylist()
        done = batch.column("drop_reason").to_pylist()
        ocr_text: list[str | None] = [None] * n
        n_boxes: list[int | None] = [None] * n
        area: list[float | None] = [None] * n
        scores: dict[str, list[float | None]] = {k: [None] * n for k in SCORES}
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
            if c.clip_check:
                boxes, texts, words = self.read_text(img, with_words=True)
            else:
                (boxes, texts), words = self.read_text(img), None
            ocr_text[i] = " ".join(texts)
            n_boxes[i] = len(texts)
            area[i] = text_area(img.shape[:2], boxes)
            scores["cotr"][i] = cotr(captions[i], ocr_text[i])
            scores["cotr_normalized"][i] = cotr_normalized(captions[i], ocr_text[i])
            scores["cotr_fuzzy"][i] = cotr_normalized(captions[i], ocr_text[i], fuzzy=True)
            if c.clip_check:
                spelled = spelled_regions(captions[i], texts, boxes, words, c.score)
                if len(spelled):
                    to_clip.append((i, img, spelled, captions[i]))
                    if len(to_clip) >= CLIP_BATCH:
                        clip_text_drop()
                else:
                    drop[i] = 0.0
        if to_clip:
            clip_text_drop()
        batch = set_column(batch, "ocr_text", ocr_text, pa.string())
        batch = set_column(batch, "ocr_boxes", n_boxes, pa.int32())
        batch = set_column(batch, "text_area", area, pa.float32())
        for name in SCORES:
            batch = set_column(batch, name, scores[name], pa.float32())
        if c.clip_check:
            batch = set_column(batch, "clip_text_drop", drop, pa.float32())
        return mark_dropped(batch, reasons, self.name)

    def decide(self, batch: pa.Table) -> pa.Table:
        """The policy, on the stored OCR columns: ``no_text`` drops text images
        (``text_image``), the CoTR policies drop parrots (``parrot``)."""
        c = self.config
        if not batch.num_rows:
            return batch
        live = live_mask(batch)
        boxes = batch.column("ocr_boxes").to_pylist()
        area = batch.column("text_area").to_pylist()
        score = batch.column(c.score).to_pylist()
        reasons: list[str | None] = [None] * batch.num_rows
        for i in np.flatnonzero(live):
            if boxes[i] is None:
                continue
            if c.policy == "no_text":
                if boxes[i] and area[i] > c.min_text_area:
                    reasons[i] = "text_image"
            elif c.drops_parrot(score[i]):
                reasons[i] = "parrot"
        return mark_dropped(batch, reasons, self.name)
