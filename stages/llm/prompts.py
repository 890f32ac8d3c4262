"""Prompt templates of the recaption stage, the in-context examples, and generation clean-up.

* ``caption`` — Recap-DataComp-1B (Li et al., "What If We Recaption Billions of Web Images
  with LLaMA-3?", 2024) asked its LLaVA-1.5-LLaMA3-8B captioner, with greedy decoding and at
  most 128 new tokens, "Please generate a detailed caption of this image. Please be as
  descriptive as possible." — :data:`CAPTION_PROMPT`. A custom prompt may add the alt text
  with ``{caption}``.
* ``rewrite`` — LaCLIP (Fan et al., "Improving CLIP Training with Language Rewrites",
  NeurIPS 2023) has an LLM rewrite each alt text by in-context learning: "write image
  captions differently," followed by three ``source => target`` examples drawn at random
  from a pool, then ``alt text =>``; several rewrites per caption, each from its own draw
  of examples — :data:`REWRITE_PROMPT`. Here the draw is deterministic: rewrite ``k`` of
  sample ``uid`` takes its examples from hash(seed, uid, k).
* ``fuse`` — CapsFusion (Yu et al., "CapsFusion: Rethinking Image-Text Data at Scale",
  CVPR 2024) has an LLM merge the alt text (real-world knowledge, poor grammar) with a
  synthetic caption (good structure, few details) into one sentence, with the instruction
  in :data:`FUSE_PROMPT` (their released inference prompt). VeCLIP (Lai et al., "VeCLIP:
  Improving CLIP Training via Visual-enriched Captions", 2023) fuses the same way.

Templates are Python format strings with the fields ``{caption}`` (the alt text),
``{synthetic}`` (the caption to fuse with) and ``{examples}`` (the rendered examples);
literal braces are written ``{{`` and ``}}``.
"""

from __future__ import annotations

import hashlib
import json
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pairsift.stages.llm import derive_int

CAPTION_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."

REWRITE_PROMPT = "write image captions differently,\n\n{examples}{caption} =>"
#: How each in-context example is written into ``{examples}`` (LaCLIP's format).
EXAMPLE_FORMAT = "{source} => {target}\n\n"

FUSE_PROMPT = (
    "Please merge and refine the information from the two given sentences. "
    "Sentence 1 provides detailed real-world knowledge, yet it suffers from flaws in sentence "
    "structure and grammar. Sentence 2 exhibits nice sentence structure, but lacking in-depth "
    "real-world details and may contain false information. Please combine them into a new "
    "sentence, ensuring a well-structured sentence while retaining the detailed real-world "
    "information provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
    "Sentence 1: {caption}\nSentence 2: {synthetic}\nNew Sentence:"
)

DEFAULT_PROMPTS = {"caption": CAPTION_PROMPT, "rewrite": REWRITE_PROMPT, "fuse": FUSE_PROMPT}
#: Fields each mode may use, and those its template must use.
ALLOWED_FIELDS = {"caption": {"caption"}, "rewrite": {"caption", "examples"}, "fuse": {"caption", "synthetic"}}
REQUIRED_FIELDS = {"caption": set(), "rewrite": {"caption"}, "fuse": {"caption", "synthetic"}}


@dataclass(frozen=True)
class Example:
    """One in-context example: an alt text and the rewrite the model should imitate."""

    source: str
    target: str


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names in a format string; ValueError for a malformed one or for
    positional, indexed or formatted fields."""
    fields = set()
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"field {{{name}}} is not a name (write literal braces as {{{{ and }}}})")
        if spec or conv:
            raise ValueError(f"field {{{name}}} may not carry a format spec or conversion")
        fields.add(name)
    return fields


def check_template(template: str, mode: str) -> None:
    """ValueError naming the problem when ``template`` cannot serve ``mode``."""
    fields = template_fields(template)
    unknown = fields - ALLOWED_FIELDS[mode]
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for mode {mode!r}; "
                         f"allowed: {sorted(ALLOWED_FIELDS[mode])}")
    missing = REQUIRED_FIELDS[mode] - fields
    if missing:
        raise ValueError(f"mode {mode!r} needs the field(s) {sorted(missing)} in its prompt")


def prompt_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def load_examples(spec) -> list[Example]:
    """The example pool from a config value: a list of ``{source, target}`` mappings, or the
    path of a ``.json`` file holding such a list or a ``.jsonl`` file with one per line.
    ValueError naming the problem for anything else."""
    if spec is None:
        return []
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"examples file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        origin = str(path)
    else:
        items, origin = spec, "examples"
    if not isinstance(items, list):
        raise ValueError(f"{origin}: expected a list of {{source, target}} objects")
    out = []
    for i, item in enumerate(items):
        src = item.get("source") if isinstance(item, dict) else None
        tgt = item.get("target") if isinstance(item, dict) else None
        if not isinstance(src, str) or not isinstance(tgt, str) or not src.strip() or not tgt.strip():
            raise ValueError(f"{origin}[{i}]: each example needs non-empty string 'source' and 'target'")
        out.append(Example(" ".join(src.split()), " ".join(tgt.split())))
    return out


def examples_sha256(examples: list[Example]) -> str:
    blob = json.dumps([[e.source, e.target] for e in examples], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def draw_examples(pool: list[Example], k: int, seed: int, uid: str, index: int) -> list[Example]:
    """``k`` distinct examples for rewrite ``index`` of sample ``uid``: a partial
    Fisher-Yates shuffle driven by hash(seed, uid, index, step), so the draw depends on
    nothing but those (not on the worker, the batch, or Python's random state)."""
    n = len(pool)
    k = min(k, n)
    swapped: dict[int, int] = {}
    picks = []
    for j in range(k):
        r = j + derive_int(seed, uid, index, "example", j) % (n - j)
        picks.append(swapped.get(r, r))
        swapped[r] = swapped.get(j, j)
    return [pool[i] for i in picks]


def render(template: str, caption: str | None = None, synthetic: str | None = None,
           examples: list[Example] | None = None) -> str:
    """The prompt for one request."""
    values = {
        "caption": caption or "",
        "synthetic": synthetic or "",
        "examples": "".join(EXAMPLE_FORMAT.format(source=e.source, target=e.target) for e in examples or ()),
    }
    return template.format(**{k: v for k, v in values.items() if k in template_fields(template)})


def clip_text(text: str, max_chars: int) -> str:
    """Whitespace collapsed and cut to ``max_chars`` (at a word boundary where one is near)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars * 0.8 else cut


def clean_generation(text: str | None, first_line: bool) -> str:
    """A generation as a caption: with ``first_line`` (plain-completion prompts, where a base
    model goes on with the next ``x => y`` example after its answer, as LaCLIP parsed it)
    only the first non-empty line; control characters removed, whitespace collapsed,
    wrapping quotes stripped. Empty when nothing is left."""
    if not text:
        return ""
    if first_line:
        lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
        text = lines[0] if lines else ""
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
