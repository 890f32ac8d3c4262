"""OCR engines behind one small interface, chosen by name in a job spec.

An engine does two things, so that a caller can run the cheap one first:

* ``detect(image, max_side=None) -> boxes``: text regions of an RGB ``uint8`` array (H, W, 3)
  as a float32 array (N, 4, 2) of quadrilaterals (clockwise from top-left, in the pixels of
  the image given), in reading order. ``max_side`` asks for a cheap pass: the detector works
  on the image shrunk so that its longer side is at most ``max_side`` (never enlarged); None
  is the engine's own, most accurate setting.
* ``recognize(image, boxes) -> texts``: one string per box ("" where nothing legible).

Two optional methods refine that (a caller falls back to the two above without them):

* ``gate(image, max_side) -> (boxes, peak)``: the cheap pass of ``detect`` plus the highest
  text probability the detector saw anywhere in the image (its evidence of text, also where it
  accepted no box), so that a caller can look again where the cheap pass is unsure.
* ``recognize_words(image, boxes) -> (texts, words)``: ``recognize`` plus, per box, its words
  as ``(word, quadrilateral)`` pairs in image pixels, for painting out single words (RapidOCR:
  runs of Latin letters and digits between spaces, split again where the recogniser's character
  columns leave a wide gap, so a word may come in pieces; single Han/kana characters).

Engines: ``rapidocr`` (default; PP-OCR detection, orientation and recognition models that
ship inside the ``rapidocr`` wheel, run with onnxruntime: its CUDA provider on a GPU worker,
the CPU otherwise) and ``tesseract`` (Debian's ``tesseract-ocr`` binary, run as a process).
Another engine plugs in by registering its class in :data:`ENGINES`, or by import path
(``package.module:Class``) in the job spec.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from pairsift.pipeline.errors import ConfigError

NO_BOXES = np.zeros((0, 4, 2), dtype=np.float32)


@runtime_checkable
class OcrEngine(Protocol):
    name: str

    def detect(self, image: np.ndarray, max_side: int | None = None) -> np.ndarray: ...

    def recognize(self, image: np.ndarray, boxes: np.ndarray) -> list[str]: ...


def _shrink(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """``image`` shrunk so its longer side is at most ``max_side``, and the scale used."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0
    import cv2

    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), s


class RapidOcrEngine:
    """RapidOCR 3.x: ``RapidOCR`` with detection only for ``detect``; its orientation
    classifier and recognizer on perspective crops of the boxes for ``recognize``.

    Texts whose recognition score is below ``text_score`` (RapidOCR's own default 0.5) count
    as "" (nothing legible)."""

    name: ClassVar[str] = "rapidocr"
    supports_cuda: ClassVar[bool] = True

    @classmethod
    def check(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
            import rapidocr
        except ImportError as e:
            raise ConfigError(f"parrot.engine: 'rapidocr' needs the rapidocr and onnxruntime packages ({e})") from None
        models = os.path.join(os.path.dirname(rapidocr.__file__), "models")
        if not os.path.isdir(models) or not any(f.endswith(".onnx") for f in os.listdir(models)):
            raise ConfigError(f"parrot.engine: rapidocr's bundled models are missing from {models}")

    @staticmethod
    def cuda_available() -> bool:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()

    def __init__(self, threads: int = 1, device: str = "cpu", text_score: float = 0.5, use_cls: bool = True):
        from rapidocr import RapidOCR

        self.text_score = text_score
        self.use_cls = use_cls
        self.device = device
        self._ocr = RapidOCR(params={
            "Global.log_level": "error",  # "no text found" is not worth a warning per image
            "Global.text_score": text_score,
            "EngineConfig.onnxruntime.intra_op_num_threads": max(1, int(threads)),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            "EngineConfig.onnxruntime.use_cuda": device == "cuda",
        })
        # Load the detector now (not on the first image) and remember its own resolution.
        self._ocr(np.zeros((32, 32, 3), dtype=np.uint8), use_det=True, use_cls=False, use_rec=False)
        self._det = self._ocr.text_det
        self._default_limit = (self._det.limit_type, self._det.limit_side_len)

    def detect(self, image: np.ndarray, max_side: int | None = None) -> np.ndarray:
        return self.gate(image, max_side)[0]

    def gate(self, image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
        """``detect`` and the maximum of the DB detector's text probability map (0..1): where it
        exceeds the binarisation threshold (0.3) but no region scored high enough to become a
        box, the detector saw something text-like that it could not resolve at this size."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        # DB detection resizes internally: "min" enlarges the shorter side to the limit (the
        # accurate default, 736), "max" only shrinks the longer side (the cheap pass).
        self._det.limit_type, self._det.limit_side_len = ("max", max_side) if max_side else self._default_limit
        session, peak = self._det.session, [0.0]

        def run(x):  # the same call RapidOCR makes, keeping the probability map's maximum
            out = session(x)
            peak[0] = max(peak[0], float(np.max(out))) if np.size(out) else peak[0]
            return out

        self._det.session = run
        try:
            out = self._ocr(bgr, use_det=True, use_cls=False, use_rec=False)
        finally:
            self._det.session = session
            self._det.limit_type, self._det.limit_side_len = self._default_limit
        boxes = getattr(out, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return NO_BOXES, peak[0]
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2), peak[0]

    def _crops(self, image: np.ndarray, boxes: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        from rapidocr.utils.process_img import get_rotate_crop_image

        bgr = np.ascontiguousarray(image[:, :, ::-1])
        crops, idx = [], []
        for i, box in enumerate(boxes):
            box = np.asarray(box, dtype=np.float32).copy()
            w = max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3]))
            h = max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))
            if w < 2 or h < 2:
                continue
            crops.append(get_rotate_crop_image(bgr, box))
            idx.append(i)
        return crops, idx

    def recognize(self, image: np.ndarray, boxes: np.ndarray) -> list[str]:
        return self._recognize(image, boxes, False)[0]

    def recognize_words(self, image: np.ndarray, boxes: np.ndarray) -> tuple[list[str], list[list[tuple[str, np.ndarray]]]]:
        """``recognize`` with word boxes: RapidOCR's own (``return_word_box``), computed from the
        recogniser's character columns and mapped back through each line's crop."""
        return self._recognize(image, boxes, True)

    def _recognize(self, image: np.ndarray, boxes: np.ndarray, with_words: bool):
        texts: list[str] = [""] * len(boxes)
        words: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(len(boxes))]
        crops, idx = self._crops(image, boxes)
        if not crops:
            return texts, words
        upright = self._ocr.cls_and_rotate(crops)[0] if self.use_cls else crops
        self._ocr.return_word_box = with_words
        try:
            rec = self._ocr.recognize_txt(upright)
        finally:
            self._ocr.return_word_box = False
        for i, txt, score in zip(idx, rec.txts, rec.scores):
            if score >= self.text_score:
                texts[i] = txt.strip()
        if with_words:
            # Word boxes from the crops as cut (RapidOCR does the same), mapped through each box.
            located = self._ocr.cal_rec_boxes(crops, np.asarray(boxes, np.float32)[idx].copy(), rec, False)
            for i, line in zip(idx, located.word_results):
                if texts[i]:
                    words[i] = [(w, np.asarray(q, dtype=np.float32).reshape(4, 2)) for w, _, q in line
                                if q is not None and str(w).strip()]
        return texts, words


class TesseractEngine:
    """Tesseract 5 (Debian ``tesseract-ocr``), run as the ``tesseract`` command.

    Tesseract has no separate detector: ``detect`` runs its page layout analysis and
    recognition (``--psm 11``, sparse text) and keeps the word boxes whose confidence is at
    least ``min_conf``; ``recognize`` answers from that pass for the same image and boxes,
    and runs single-line recognition (``--psm 7``) on the crops of any other boxes."""

    name: ClassVar[str] = "tesseract"
    supports_cuda: ClassVar[bool] = False
    APT_PACKAGE: ClassVar[str] = "tesseract-ocr"

    @classmethod
    def check(cls, lang: str = "eng") -> None:
        exe = shutil.which("tesseract")
        if exe is None:
            raise ConfigError(f"parrot.engine: 'tesseract' needs the tesseract command: apt-get install {cls.APT_PACKAGE}")
        try:
            out = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise ConfigError(f"parrot.engine: tesseract does not run ({e}); reinstall {cls.APT_PACKAGE}") from None
        langs = set((out.stdout + out.stderr).split())
        if lang not in langs:
            raise ConfigError(f"parrot.engine: tesseract has no '{lang}' language data "
                              f"(apt-get install {cls.APT_PACKAGE}-{lang})")

    def __init__(self, threads: int = 1, device: str = "cpu", lang: str = "eng", min_conf: float = 50.0):
        self.lang = lang
        self.min_conf = min_conf
        self._exe = shutil.which("tesseract") or "tesseract"
        self._env = {**os.environ, "OMP_THREAD_LIMIT": str(max(1, int(threads)))}
        self._last: tuple[int, tuple] | None = None
        self._last_texts: dict[tuple, str] = {}

    def _run(self, image: np.ndarray, psm: int, tsv: bool) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        args = [self._exe, "stdin", "stdout", "-l", self.lang, "--psm", str(psm)] + (["tsv"] if tsv else [])
        out = subprocess.run(args, input=buf.getvalue(), capture_output=True, timeout=120, env=self._env)
        if out.returncode != 0:
            raise RuntimeError(f"tesseract failed: {out.stderr.decode(errors='replace')[-500:]}")
        return out.stdout.decode("utf-8", errors="replace")

    def detect(self, image: np.ndarray, max_side: int | None = None) -> np.ndarray:
        small, s = _shrink(image, max_side)
        boxes, texts = [], {}
        for line in self._run(small, 11, tsv=True).splitlines()[1:]:
            f = line.split("\t")
            if len(f) < 12 or f[0] != "5" or not f[11].strip():
                continue
            if float(f[10]) < self.min_conf:
                continue
            x, y, w, h = (int(v) / s for v in f[6:10])
            quad = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32)
            boxes.append(quad)
            texts[self._key(quad)] = f[11].strip()
        self._last = (id(image), image.shape)
        self._last_texts = texts
        return np.stack(boxes) if boxes else NO_BOXES

    @staticmethod
    def _key(box: np.ndarray) -> tuple:
        return tuple(np.round(np.asarray(box, dtype=np.float32).ravel(), 1).tolist())

    def recognize(self, image: np.ndarray, boxes: np.ndarray) -> list[str]:
        known = self._last_texts if self._last == (id(image), image.shape) else {}
        texts = []
        for box in boxes:
            text = known.get(self._key(box))
            if text is None:
                x0, y0 = np.floor(box.min(axis=0)).astype(int)
                x1, y1 = np.ceil(box.max(axis=0)).astype(int)
                crop = image[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
                text = self._run(crop, 7, tsv=False).strip() if crop.size and min(crop.shape[:2]) >= 4 else ""
            texts.append(text)
        return texts


    def recognize_words(self, image: np.ndarray, boxes: np.ndarray) -> tuple[list[str], list[list[tuple[str, np.ndarray]]]]:
        """``recognize``; Tesseract's boxes are words already, so each box is its own word."""
        texts = self.recognize(image, boxes)
        return texts, [[(t, np.asarray(b, np.float32))] if t else [] for t, b in zip(texts, boxes)]


#: Engines by the name a job spec uses.
ENGINES: dict[str, type] = {"rapidocr": RapidOcrEngine, "tesseract": TesseractEngine}


def engine_class(name: str) -> type:
    """The engine class registered as ``name`` or named by import path; ConfigError if none."""
    if name in ENGINES:
        return ENGINES[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"parrot.engine: cannot import {name!r} ({e})") from None
    raise ConfigError(f"parrot.engine: unknown OCR engine {name!r}; known: {', '.join(sorted(ENGINES))} "
                      f"(or an import path package.module:Class)")


def check_engine(name: str) -> None:
    """Raise ConfigError when engine ``name`` cannot run here (what to install, in the message)."""
    cls = engine_class(name)
    check = getattr(cls, "check", None)
    if check is not None:
        check()


def make_engine(name: str, threads: int = 1, device: str = "cpu") -> OcrEngine:
    return engine_class(name)(threads=threads, device=device)
