"""Tiny generative models built from configs (random weights, no download), saved with
``save_pretrained`` so the recaption backends load them with their real loading code:

* a Llama-style causal LM with a byte-level BPE tokenizer trained here on a few sentences
  and a chat template (rewrite and fuse modes);
* a ViT + GPT-2 ``VisionEncoderDecoderModel`` with a ViT image processor: a plain captioner
  that takes no prompt (as BLIP or GIT);
* a LLaVA (CLIP vision tower + Llama) with a ``LlavaProcessor`` and a chat template: a
  prompted VLM, the Recap-DataComp setup in miniature.

Random weights would now and then pick tokens that decode to nothing visible (whitespace,
control bytes, special tokens) eight times in a row, which the stage rightly records as an
empty generation; the builders zero those tokens' output rows so the tests see text.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
    "</s>{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
SENTENCES = [
    "a photo of a cat on a mat", "a dog running in the park", "write image captions differently",
    "Please merge and refine the information from the two given sentences.",
    "Sentence 1: Sentence 2: New Sentence:", "the red car parked by the sea =>",
    "Please generate a detailed caption of this image. Please be as descriptive as possible.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _visible_tokens_only(model, tok) -> None:
    """Zero the output-layer rows of the tokens that decode to nothing visible."""
    import torch

    from pairsift.stages.llm.prompts import clean_generation

    ids = [i for i in range(len(tok)) if i in tok.all_special_ids or not clean_generation(tok.decode([i]), False)]
    with torch.no_grad():
        model.get_output_embeddings().weight[ids] = 0.0


def _llama(tok, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_causal_lm(folder: Path) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama(tok))
    _visible_tokens_only(model, tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_vit_gpt2(folder: Path) -> Path:
    import torch
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    tok = build_tokenizer()
    tok.chat_template = None  # a plain captioner
    torch.manual_seed(0)
    enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                    image_size=32, patch_size=8)
    dec = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
    model = VisionEncoderDecoderModel(config=cfg)
    _visible_tokens_only(model.decoder, tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_llava(folder: Path) -> Path:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok = build_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama(tok, layers=1),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg)
    _visible_tokens_only(model, tok)
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
                   image_token="<image>").save_pretrained(folder)
    return folder
