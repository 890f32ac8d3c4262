"""``transformers`` backend: a local Hugging Face model on CPU or GPU.

Text modes (rewrite, fuse) load ``AutoModelForCausalLM`` (or ``AutoModelForSeq2SeqLM`` for
encoder-decoder models) and its tokenizer; prompts go through the tokenizer's chat template
when it has one (``chat: null``) or as plain text. Caption mode loads
``AutoModelForImageTextToText``: a model whose processor has a chat template (LLaVA,
Qwen2-VL, SmolVLM, ...) gets the image and the prompt as one user turn, as Recap-DataComp
prompted LLaVA; a plain captioner without one (BLIP, GIT, ViT-GPT2) captions the image
unprompted. Greedy decoding runs ``concurrency`` requests per ``generate()`` call, left
padded; sampling (temperature > 0, nucleus ``top_p``) runs one request at a time, seeded with
the request's seed, so every sample's text depends on its own seed only. A batch that raises is rerun
request by request, so one bad image costs one sample.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Sequence

from pairsift.pipeline.errors import ConfigError
from pairsift.stages.llm import Backend, GenRequest, Generation, short_error


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model: str, vision: bool, *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, chat: bool | None = None, batch_size: int = 8, model_kwargs: dict | None = None,
                 device: str | None = None):
        self.model_name = model
        self.vision = vision
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.chat = chat
        self.batch_size = max(1, batch_size)
        self.model_kwargs = dict(model_kwargs or {})
        self.device = device
        self.uses_chat = bool(chat)
        self._model = None
        self._tokenizer = None  # text modes, and the decoder's tokenizer in caption mode
        self._processor = None  # caption mode: a multimodal processor, or an image processor
        self._prompted = False  # caption mode: the prompt reaches the model

    # -- configuration -------------------------------------------------------------------
    def check(self) -> None:
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError("recaption.backend: transformers is not installed (pip install transformers)")
        from transformers import AutoConfig
        from transformers.models.auto import modeling_auto as ma

        trust = bool(self.model_kwargs.get("trust_remote_code"))
        try:
            config = AutoConfig.from_pretrained(self.model_name, trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 - any failure to find the model is the config's
            raise ConfigError(f"recaption.model: cannot load {self.model_name!r} "
                              f"(a local model folder or a cached Hugging Face id): {short_error(e)}") from None
        if trust:
            return
        if self.vision:
            ok = config.model_type in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            what = "an image-text-to-text model (LLaVA, Qwen2-VL, BLIP, GIT, VisionEncoderDecoder, ...)"
        else:
            ok = (config.model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  or config.model_type in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
            what = "a causal or sequence-to-sequence language model"
        if not ok:
            raise ConfigError(f"recaption.model: {self.model_name!r} is a {config.model_type!r} model; "
                              f"this mode needs {what}")

    # -- loading -------------------------------------------------------------------------
    def load(self) -> None:
        import torch
        import transformers as tf

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = dict(self.model_kwargs)
        if self.vision:
            model = tf.AutoModelForImageTextToText.from_pretrained(self.model_name, **kwargs)
            processor = tf.AutoProcessor.from_pretrained(self.model_name, trust_remote_code=bool(kwargs.get("trust_remote_code")))
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                self._processor, self._tokenizer = processor, processor.tokenizer
                has_template = bool(getattr(processor, "chat_template", None))
            else:  # e.g. VisionEncoderDecoder: an image processor and the decoder's tokenizer
                self._processor = tf.AutoImageProcessor.from_pretrained(self.model_name)
                self._tokenizer = tf.AutoTokenizer.from_pretrained(self.model_name)
                has_template = False
            if self.chat and not has_template:
                raise ValueError(f"recaption.chat is true but {self.model_name} has no chat template")
            self._prompted = has_template and self.chat is not False
            self.uses_chat = self._prompted
        else:
            config = tf.AutoConfig.from_pretrained(self.model_name, trust_remote_code=bool(kwargs.get("trust_remote_code")))
            cls = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
            model = cls.from_pretrained(self.model_name, **kwargs)
            self._tokenizer = tf.AutoTokenizer.from_pretrained(self.model_name)
            has_template = bool(getattr(self._tokenizer, "chat_template", None))
            if self.chat and not has_template:
                raise ValueError(f"recaption.chat is true but {self.model_name} has no chat template")
            self.uses_chat = has_template if self.chat is None else self.chat
        tok = self._tokenizer
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batches generate after the prompt
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
        self._model = model.to(device).eval()
        self._device = device

    # -- generating ----------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:
        if self._model is None:
            self.load()
        sampling = self.temperature > 0
        size = 1 if sampling else self.batch_size
        out: list[Generation] = []
        for start in range(0, len(requests), size):
            chunk = list(requests[start:start + size])
            try:
                out.extend(Generation(text=t) for t in self._run(chunk, sampling))
            except Exception as e:  # noqa: BLE001 - isolate the request that fails
                if len(chunk) == 1:
                    out.append(Generation(error=short_error(e)))
                else:
                    out.extend(self.generate(chunk[i:i + 1])[0] for i in range(len(chunk)))
        return out

    def _run(self, chunk: list[GenRequest], sampling: bool) -> list[str]:
        import torch

        inputs = self._inputs(chunk)
        if self.vision:  # pixel values in the model's dtype (bf16 / fp16 checkpoints on GPU)
            inputs = inputs.to(self._device, dtype=self._model.dtype)
        else:
            inputs = inputs.to(self._device)
        gen = {"max_new_tokens": self.max_new_tokens, "do_sample": sampling}
        if sampling:
            gen["temperature"] = self.temperature
            gen["top_p"] = self.top_p
            torch.manual_seed(chunk[0].seed)
        tok = self._tokenizer
        if tok is not None and tok.pad_token_id is not None:
            gen["pad_token_id"] = tok.pad_token_id
        with torch.inference_mode():
            ids = self._model.generate(**inputs, **gen)
        if "input_ids" in inputs and not self._model.config.is_encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1]:]  # decoder-only: the prompt comes back first
        return tok.batch_decode(ids, skip_special_tokens=True)

    def _inputs(self, chunk: list[GenRequest]):
        if not self.vision:
            prompts = [r.prompt for r in chunk]
            if self.uses_chat:
                prompts = self._tokenizer.apply_chat_template(
                    [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True, tokenize=False)
                return self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            return self._tokenizer(prompts, return_tensors="pt", padding=True)
        images = [_decode_image(r.image) for r in chunk]
        if self._prompted:
            convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.prompt}]}]
                     for r in chunk]
            texts = self._processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
            return self._processor(text=texts, images=images, return_tensors="pt", padding=True)
        return self._processor(images=images, return_tensors="pt")

    def close(self) -> None:
        self._model = self._processor = self._tokenizer = None


def _decode_image(data: bytes | None):
    """RGB Pillow image, EXIF orientation applied."""
    from PIL import Image, ImageOps

    if data is None:
        raise ValueError("no image")
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img).convert("RGB")
