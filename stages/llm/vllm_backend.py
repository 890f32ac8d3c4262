"""``vllm`` backend: offline batch inference with ``vllm.LLM``, one engine per GPU worker.

Every ``generate()`` call hands the whole batch to the engine at once (vLLM schedules it
with continuous batching, so ``concurrency`` does not apply). Chat prompts go through
``LLM.chat`` as OpenAI-style messages, images as base64 ``data:`` URLs exactly as the
``openai`` backend sends them to a vLLM server; plain prompts through ``LLM.generate``.
Each request has its own ``SamplingParams`` (its seed when temperature > 0). A batch the
engine rejects (e.g. one prompt longer than the context) is rerun request by request, so
the bad request alone gets the error. ``engine_args`` go to ``vllm.LLM`` as they are
(``load_format: dummy`` loads random weights with no download, for smoke tests).

:func:`build_requests` and :func:`parse_outputs` are plain functions of plain data, tested
without vLLM or a GPU.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from pairsift.pipeline.errors import ConfigError
from pairsift.stages.llm import Backend, GenRequest, Generation, chat_messages, short_error


def sampling_kwargs(request: GenRequest, max_new_tokens: int, temperature: float, top_p: float = 1.0) -> dict:
    """``vllm.SamplingParams`` keyword arguments of one request."""
    kw: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature, "n": 1}
    if temperature > 0:
        kw["seed"] = request.seed
        if top_p < 1.0:
            kw["top_p"] = top_p
    return kw


def build_requests(requests: Sequence[GenRequest], chat: bool, max_new_tokens: int,
                   temperature: float, top_p: float = 1.0) -> tuple[list, list[dict]]:
    """The engine inputs (one conversation per request for ``LLM.chat``, one prompt string
    per request for ``LLM.generate``) and each request's sampling keyword arguments."""
    if not chat and any(r.image is not None for r in requests):
        raise ValueError("images need chat prompts (the model's chat template places them)")
    inputs = [chat_messages(r) if chat else r.prompt for r in requests]
    return inputs, [sampling_kwargs(r, max_new_tokens, temperature, top_p) for r in requests]


def parse_outputs(outputs: Sequence[Any], expected: int) -> list[Generation]:
    """``vllm.RequestOutput`` s (``.outputs[0].text``, ``.finish_reason``) as Generations, in
    request order; a missing output or completion is that request's error."""
    if len(outputs) != expected:
        raise ValueError(f"the engine returned {len(outputs)} outputs for {expected} requests")
    out = []
    for ro in outputs:
        completions = getattr(ro, "outputs", None) or []
        if not completions:
            out.append(Generation(error="malformed response: no completion"))
            continue
        text = getattr(completions[0], "text", None)
        if not isinstance(text, str):
            out.append(Generation(error="malformed response: completion has no text"))
            continue
        out.append(Generation(text=text))
    return out


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 chat: bool | None = None, engine_args: dict | None = None, seed: int = 0):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.chat = chat
        self.engine_args = dict(engine_args or {})
        self.seed = seed
        self.uses_chat = True if chat is None else chat
        self._llm = None
        self._sampling_params = None

    def check(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("recaption.backend: vllm is not installed here; it needs a CUDA GPU "
                              "(pip install vllm on the GPU workers), or use backend: openai against a "
                              "vLLM server, or backend: transformers")

    def load(self) -> None:
        from vllm import LLM, SamplingParams

        self._llm = LLM(model=self.model, **{"seed": self.seed, **self.engine_args})
        self._sampling_params = SamplingParams
        if self.chat is None:
            self.uses_chat = bool(getattr(self._llm.get_tokenizer(), "chat_template", None))

    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:
        if self._llm is None:
            self.load()
        if not requests:
            return []
        try:
            return self._run(requests)
        except Exception as e:  # noqa: BLE001 - find the request the engine refused
            if len(requests) == 1:
                return [Generation(error=short_error(e))]
            return [g for r in requests for g in self.generate([r])]

    def _run(self, requests: Sequence[GenRequest]) -> list[Generation]:
        inputs, kwargs = build_requests(requests, self.uses_chat, self.max_new_tokens, self.temperature, self.top_p)
        params = [self._sampling_params(**kw) for kw in kwargs]
        if self.uses_chat:
            outputs = self._llm.chat(inputs, sampling_params=params, use_tqdm=False)
        else:
            outputs = self._llm.generate(inputs, sampling_params=params, use_tqdm=False)
        return parse_outputs(outputs, len(requests))

    def close(self) -> None:
        self._llm = None
