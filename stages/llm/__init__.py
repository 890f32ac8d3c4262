"""Text generation clients for the ``recaption`` stage: one small interface, three backends.

A :class:`Backend` turns :class:`GenRequest` s (a prompt, optionally an image) into
:class:`Generation` s (a text, or an error) in the same order. ``check()`` runs in the
stage's preflight and raises :class:`~pairsift.pipeline.errors.ConfigError` for what can be
known before any work (a missing package, endpoint or model); ``load()`` runs once per
worker in the stage's ``setup()``; ``generate()`` never raises for a failed request: the
failure is that request's ``error``. The backends:

* ``openai`` (:mod:`.openai_backend`): any OpenAI-compatible server (vLLM, SGLang, Ollama,
  a hosted API), concurrent requests from a bounded pool, timeouts, retries with backoff;
* ``transformers`` (:mod:`.transformers_backend`): a local model on CPU or GPU;
* ``vllm`` (:mod:`.vllm_backend`): offline batch inference with ``vllm.LLM`` on a GPU.

Heavy imports (torch, transformers, openai, vllm) happen in ``load()`` and ``check()``, never
at import time, so reading a job spec stays cheap.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Sequence


@dataclass(frozen=True)
class GenRequest:
    """One generation: the user prompt, the image (encoded bytes) for captioning, and the
    sampling seed (used when temperature > 0; derived from hash(seed, uid) by the stage)."""

    prompt: str
    image: bytes | None = None
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """What came back for one request: ``text`` (raw, not cleaned) or ``error``."""

    text: str | None = None
    error: str | None = None


class Backend:
    """The interface every recaption backend implements."""

    name: ClassVar[str] = ""

    #: Whether prompts go through the model's chat template / the chat API; resolved by
    #: ``load()`` where the config leaves it open (``chat: null``).
    uses_chat: bool = True

    def check(self) -> None:
        """Preflight: raise ConfigError naming the key for a configuration that cannot work."""

    def load(self) -> None:
        """Load the model / open the client; once per worker."""

    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release threads, connections, engines."""


def image_mime(data: bytes) -> tuple[bytes, str]:
    """``data`` as bytes an image API accepts (JPEG, PNG, WebP pass through; GIF, BMP,
    TIFF, AVIF become PNG) and its MIME type."""
    from pairsift.pipeline.images import to_trainable

    out, ext = to_trainable(data)
    return out, {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[ext]


def image_data_url(data: bytes) -> str:
    """A ``data:`` URL carrying the image as base64, as the OpenAI chat API takes images."""
    out, mime = image_mime(data)
    return f"data:{mime};base64,{base64.b64encode(out).decode('ascii')}"


def chat_messages(request: GenRequest) -> list[dict]:
    """The OpenAI chat messages for one request (also what vLLM's ``LLM.chat`` takes): one
    user turn; with an image, a content list with the image first, as LLaVA-style models
    were trained; without one, a plain string (the widest-supported form)."""
    if request.image is None:
        return [{"role": "user", "content": request.prompt}]
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
        {"type": "text", "text": request.prompt},
    ]}]


def derive_int(*parts) -> int:
    """A 63-bit integer from ``parts`` (e.g. seed, uid, rewrite index): the source of every
    per-sample random choice, the same on any worker and any machine."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(h.digest(), "big") >> 1


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, on one line, at most ``limit`` characters."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
