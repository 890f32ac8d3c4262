"""Stage ``recaption``: new captions from a VLM or an LLM, next to the original alt text.

Three recipes, one stage. ``caption``: a vision-language model describes the image
(Recap-DataComp-1B, Li et al., "What If We Recaption Billions of Web Images with
LLaMA-3?", 2024: LLaVA-1.5-LLaMA3-8B, greedy, 128 new tokens, their prompt by default).
``rewrite``: an LLM rewrites the alt text by in-context learning from ``num_examples``
``source => target`` pairs drawn from ``examples``, ``num_rewrites`` times with a fresh
draw each (LaCLIP, Fan et al., "Improving CLIP Training with Language Rewrites", NeurIPS
2023; reference ``rewrite/llama_rewrite.py``: 3 examples, temperature 0.9, top-p 0.95, 77
new tokens, and four rewrites per caption, each from its own pool of examples — ChatGPT,
Bard, MSCOCO, human — which ``example_pools`` expresses: rewrite k draws from pool k). ``fuse``: an LLM merges the alt text with a synthetic caption from ``fuse_column``
(e.g. the output of an earlier ``caption`` pass) into one sentence that keeps the alt text's
real-world knowledge (CapsFusion, Yu et al., CVPR 2024; likewise VeCLIP, Lai et al., 2023).
Rule: every live row gets ``recaption`` (a string; a list of strings when
``num_rewrites > 1``, failed rewrites left out), ``recaption_model`` (the model asked) and
``recaption_error`` (why a generation failed or came back empty, else null); the column names
follow ``output_column``. The original ``caption`` is never touched and no row is ever dropped:
a failed generation keeps its sample with a null recaption. Every random choice (examples,
sampling seeds) derives from hash(seed, uid, rewrite index). The backend (``openai``,
``transformers``, ``vllm``; see :mod:`pairsift.stages.llm`) only changes how the requests are
served. Emit's ``caption_policy`` decides which text goes into the training ``.txt``.

Defaults are the mode's paper's (:data:`MODE_DEFAULTS`): caption — Recap-DataComp's greedy
decoding, 128 new tokens, one caption; rewrite — LaCLIP's sampling (temperature 0.9, top-p
0.95), 77 new tokens, four rewrites; fuse — greedy, 128 new tokens, one caption (CapsFusion
ran its fine-tuned fuser with its own settings; these are pairsift's).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.table import BASE_SCHEMA, live_mask, set_column
from pairsift.stages.base import Resources, Stage, StageConfig, runtime
from pairsift.stages.llm import Backend, GenRequest, derive_int
from pairsift.stages.llm import prompts as P


#: Per mode, the generation settings its paper used, taken where a job leaves them out.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Recap-DataComp-1B (Li et al. 2024): LLaVA-1.5-LLaMA3-8B, greedy, 128 new tokens.
    "caption": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128, "num_rewrites": 1},
    # LaCLIP (rewrite/llama_rewrite.py): temperature 0.9, top_p 0.95, max_gen_len 77; four
    # rewrites per caption (its ChatGPT, Bard, MSCOCO and human example pools).
    "rewrite": {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 77, "num_rewrites": 4},
    "fuse": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128, "num_rewrites": 1},
}


class RecaptionConfig(StageConfig):
    mode: Literal["caption", "rewrite", "fuse"]
    backend: Literal["vllm", "openai", "transformers"]
    #: A Hugging Face id or local model folder (transformers, vllm), or the served model name (openai).
    model: str
    #: openai: the server's base URL, e.g. ``http://host:8000/v1``.
    endpoint: str | None = runtime(None)
    #: openai: name of the environment variable holding the API key (none for local servers).
    api_key_env: str | None = runtime(None)
    #: Prompt template (``{caption}``, ``{synthetic}``, ``{examples}``); null: the mode's paper's prompt.
    prompt: str | None = None
    #: rewrite: in-context examples, a list of {source, target} or a .json / .jsonl file of them.
    examples: str | list[dict[str, str]] | None = None
    #: rewrite: several pools (each like ``examples``); rewrite k draws from pool k mod len (LaCLIP).
    example_pools: list[str | list[dict[str, str]]] | None = Field(None, min_length=1)
    #: rewrite: examples per prompt (LaCLIP used 3).
    num_examples: int = Field(3, ge=0)
    #: Generations per sample; more than 1 makes ``recaption`` a list<string> (default: the mode's).
    num_rewrites: int = Field(1, ge=1, le=32)
    #: fuse: the column holding the synthetic caption to fuse with the alt text.
    fuse_column: str | None = None
    #: Where the result goes; ``<output_column>_model`` and ``<output_column>_error`` beside it.
    output_column: str = "recaption"
    #: Use the chat template / chat API (null: whenever the model or server has one).
    chat: bool | None = None
    #: Default: the mode's paper's (:data:`MODE_DEFAULTS`), as are temperature, top_p and num_rewrites.
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    #: Nucleus sampling (used when temperature > 0).
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    #: Requests in flight per worker (openai: connection pool; transformers: batch size).
    concurrency: int = runtime(8, ge=1)
    timeout_s: float = runtime(60.0, gt=0)
    retries: int = runtime(3, ge=0)
    #: The alt text and the fused caption are cut to this many characters in the prompt.
    max_input_chars: int = Field(1000, ge=16)
    #: transformers: ``from_pretrained`` arguments; vllm: ``vllm.LLM`` arguments.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    #: GPUs per worker (null: 1 for vllm, 1 for transformers when the cluster has GPUs, else 0).
    num_gpus: float | None = runtime(None, ge=0)
    #: openai: ask the server in preflight whether it serves ``model``.
    check_endpoint: bool = runtime(True)

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") in MODE_DEFAULTS:
            data = {**MODE_DEFAULTS[data["mode"]], **data}
        return data


def make_backend(c: RecaptionConfig, seed: int = 0) -> Backend:
    """The configured backend, not yet loaded."""
    if c.backend == "openai":
        from pairsift.stages.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(c.model, c.endpoint, c.api_key_env, max_new_tokens=c.max_new_tokens,
                             temperature=c.temperature, top_p=c.top_p, chat=c.chat, concurrency=c.concurrency,
                             timeout_s=c.timeout_s, retries=c.retries, check_endpoint=c.check_endpoint)
    if c.backend == "transformers":
        from pairsift.stages.llm.transformers_backend import TransformersBackend

        return TransformersBackend(c.model, vision=c.mode == "caption", max_new_tokens=c.max_new_tokens,
                                   temperature=c.temperature, top_p=c.top_p, chat=c.chat, batch_size=c.concurrency,
                                   model_kwargs=c.engine_args)
    from pairsift.stages.llm.vllm_backend import VllmBackend

    return VllmBackend(c.model, max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                       chat=c.chat, engine_args=c.engine_args, seed=seed)


def recaption_summaries(con) -> list[tuple]:
    """Per recaption column (``X`` with ``X_model`` and ``X_error``) of the kept samples: how
    many were asked, recaptioned and failed, the commonest failure, and the mean words of the
    alt text and of the recaption (the first one, for lists of rewrites)."""
    types = {r[0]: r[1] for r in con.execute("DESCRIBE samples").fetchall()}
    out = []
    for model_col in sorted(c for c in types if c.endswith("_model")):
        col = model_col[: -len("_model")]
        if col not in types or f"{col}_error" not in types:
            continue
        text = f"{col}[1]" if types[col].endswith("[]") else col
        row = con.execute(
            f"SELECT count({model_col}), count({col}), count({col}_error), "
            f"avg(len(string_split(caption, ' '))), avg(len(string_split({text}, ' '))) FROM samples"
        ).fetchone()
        top = con.execute(f"SELECT split_part({col}_error, ':', 1) AS kind, count(*) AS n FROM samples "
                          f"WHERE {col}_error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind LIMIT 1").fetchone()
        out.append((col, row[0], row[1], row[2], f"{top[0]} ({top[1]:,})" if top else None, row[3], row[4]))
    return out



class RecaptionStage(Stage[RecaptionConfig]):
    name = "recaption"

    @classmethod
    def needs_pixels(cls, config: RecaptionConfig) -> bool:
        return config.mode == "caption"  # rewrite and fuse read text only

    @classmethod
    def caption_column(cls, config: RecaptionConfig) -> str | None:
        return config.output_column  # emit.caption_policy may put it in the .txt

    @classmethod
    def stats_section(cls, output: str, con) -> list[str]:
        from pairsift.pipeline.stats import format_table

        rows = recaption_summaries(con)
        if not rows:
            return []
        return ["", "recaptions (kept samples):",
                format_table(["column", "asked", "recaptioned", "failed", "top failure", "words alt", "words new"], rows)]

    def __init__(self, config: RecaptionConfig, context=None):
        super().__init__(config, context)
        self.template = config.prompt if config.prompt is not None else P.DEFAULT_PROMPTS[config.mode]
        self.backend: Backend | None = None
        self._pools: list[list[P.Example]] | None = None
        self._generate_s = 0.0

    # -- configuration -------------------------------------------------------------------
    @property
    def pools(self) -> list[list[P.Example]]:
        """The example pools: ``example_pools``, or ``examples`` as the one pool (maybe empty)."""
        if self._pools is None:
            c = self.config
            specs = c.example_pools if c.example_pools is not None else [c.examples]
            self._pools = [P.load_examples(spec) for spec in specs]
        return self._pools

    @property
    def examples(self) -> list[P.Example]:
        """Every example of every pool, in order."""
        return [e for pool in self.pools for e in pool]

    def output_type(self) -> pa.DataType:
        return pa.list_(pa.string()) if self.config.num_rewrites > 1 else pa.string()

    def resources(self) -> Resources:
        c = self.config
        if c.num_gpus is not None:
            gpus = c.num_gpus
        elif c.backend == "vllm":
            gpus = float(c.engine_args.get("tensor_parallel_size", 1))
        elif c.backend == "transformers":
            gpus = 1.0 if self.context.extras.get("cluster", {}).get("GPU", 0) else 0.0
        else:
            gpus = 0.0
        cluster = self.context.extras.get("cluster")
        if gpus > 0 and cluster is not None and not cluster.get("GPU"):  # Ray would wait forever
            raise ConfigError(f"recaption.num_gpus: the {c.backend} backend asks for {gpus:g} GPU(s) per worker "
                              f"and the Ray cluster has none (backend: openai needs none)")
        return Resources(cpus=self.num_cpus, gpus=gpus)

    def preflight(self) -> None:
        c = self.config
        try:
            P.check_template(self.template, c.mode)
        except ValueError as e:
            raise ConfigError(f"recaption.prompt: {e}") from None
        if c.mode == "fuse" and not c.fuse_column:
            raise ConfigError("recaption.fuse_column: fuse mode needs the column holding the caption to fuse "
                              "with the alt text (e.g. the output_column of an earlier caption pass)")
        if c.mode != "fuse" and c.fuse_column:
            raise ConfigError("recaption.fuse_column: only fuse mode reads a second caption")
        protected = set(BASE_SCHEMA.names)
        for col in (c.output_column, f"{c.output_column}_model", f"{c.output_column}_error"):
            if col in protected or col == c.fuse_column:
                raise ConfigError(f"recaption.output_column: {c.output_column!r} would overwrite column {col!r}")
        for key in ("examples", "example_pools"):
            if getattr(c, key) is not None and c.mode != "rewrite":
                raise ConfigError(f"recaption.{key}: only rewrite mode uses in-context examples")
        if c.examples is not None and c.example_pools is not None:
            raise ConfigError("recaption.example_pools: give examples (one pool) or example_pools, not both")
        key = "example_pools" if c.example_pools is not None else "examples"
        try:
            pools = self.pools
        except ValueError as e:
            raise ConfigError(f"recaption.{key}: {e}") from None
        if c.example_pools is not None and not all(pools):
            raise ConfigError("recaption.example_pools: every pool needs at least one example")
        varied = len(pools) > 1 or len(pools[0]) > 1
        if c.num_rewrites > 1 and c.temperature == 0 and not (c.mode == "rewrite" and varied and c.num_examples):
            raise ConfigError(f"recaption.num_rewrites: {c.num_rewrites} greedy generations from one prompt are "
                              f"identical; set temperature > 0 (or, in rewrite mode, give examples to draw from)")
        if c.mode == "caption" and c.chat is False and c.backend != "transformers":
            raise ConfigError("recaption.chat: caption mode sends images, which only the chat API carries")
        make_backend(c, self.context.seed).check()

    # -- running -------------------------------------------------------------------------
    def setup(self) -> None:
        self.backend = make_backend(self.config, self.context.seed)
        self.backend.load()

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        n = batch.num_rows
        if c.mode == "fuse" and c.fuse_column not in batch.column_names:
            raise KeyError(f"recaption.fuse_column: no column {c.fuse_column!r}; "
                           f"an earlier stage must write it (e.g. recaption with output_column: {c.fuse_column})")
        rows = np.flatnonzero(live_mask(batch)) if n else np.array([], dtype=int)
        uids = batch.column("uid").to_pylist()
        captions = batch.column("caption").to_pylist()
        images = batch.column("image").to_pylist() if c.mode == "caption" and len(rows) else [None] * n
        synthetic = batch.column(c.fuse_column).to_pylist() if c.mode == "fuse" else [None] * n

        models: list[str | None] = [None] * n
        texts: list[list[str]] = [[] for _ in range(n)]
        errors: list[list[str]] = [[] for _ in range(n)]
        requests: list[GenRequest] = []
        owners: list[tuple[int, int]] = []
        for i in rows:
            models[i] = c.model
            syn = _first_text(synthetic[i])
            problem = self._missing_input(captions[i], images[i], syn)
            if problem:
                errors[i].append(problem)
                continue
            for k in range(c.num_rewrites):
                requests.append(self.request(uids[i], captions[i], images[i], syn, k))
                owners.append((i, k))

        if requests:
            if self.backend is None:
                self.setup()
            first_line = c.mode != "caption" and not self.backend.uses_chat
            t0 = time.perf_counter()
            generations = self.backend.generate(requests)
            self._generate_s += time.perf_counter() - t0
            for (i, k), gen in zip(owners, generations):
                label = f"rewrite {k}: " if c.num_rewrites > 1 else ""
                if gen.error is not None:
                    errors[i].append(label + gen.error)
                    continue
                text = P.clean_generation(gen.text, first_line)
                if text:
                    texts[i].append(text)
                else:
                    errors[i].append(label + "empty generation")

        if c.num_rewrites > 1:
            values: list = [t or None for t in texts]
        else:
            values = [t[0] if t else None for t in texts]
        batch = set_column(batch, c.output_column, values, self.output_type())
        batch = set_column(batch, f"{c.output_column}_model", models, pa.string())
        return set_column(batch, f"{c.output_column}_error", ["; ".join(e) or None for e in errors], pa.string())

    def take_timings(self) -> dict[str, float]:
        """Seconds spent waiting for the backend since the last call (``recaption.generate``)."""
        out, self._generate_s = {"generate": self._generate_s}, 0.0
        return out

    def _missing_input(self, caption: str | None, image: bytes | None, synthetic: str | None) -> str | None:
        c = self.config
        if c.mode == "caption":
            return None if image else "no image to caption"
        if not caption or not caption.strip():
            return f"no caption to {c.mode}"
        if c.mode == "fuse" and not synthetic:
            return f"no {c.fuse_column} to fuse"
        return None

    def request(self, uid: str, caption: str | None, image: bytes | None, synthetic: str | None,
                k: int) -> GenRequest:
        """Generation ``k`` of sample ``uid``: its prompt (examples drawn by hash(seed, uid,
        k) from pool k mod the number of pools), its image in caption mode, and its sampling seed."""
        c = self.config
        seed = self.context.seed
        examples = []
        if c.mode == "rewrite" and c.num_examples:
            pools = self.pools
            examples = P.draw_examples(pools[k % len(pools)], c.num_examples, seed, uid, k)
        prompt = P.render(self.template,
                          caption=P.clip_text(caption, c.max_input_chars) if caption else None,
                          synthetic=P.clip_text(synthetic, c.max_input_chars) if synthetic else None,
                          examples=examples)
        return GenRequest(prompt=prompt, image=image if c.mode == "caption" else None,
                          seed=derive_int(seed, uid, k, "sample") % (2**31 - 1))

    def summary(self) -> dict:
        c = self.config
        facts = {
            "mode": c.mode,
            "backend": c.backend,
            "model": c.model,
            "endpoint": c.endpoint,
            "prompt": self.template,
            "prompt_sha256": P.prompt_sha256(self.template),
            "chat": "auto" if c.chat is None else c.chat,
            "max_new_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "num_rewrites": c.num_rewrites,
            "columns": {"text": c.output_column, "model": f"{c.output_column}_model",
                        "error": f"{c.output_column}_error", "type": str(self.output_type())},
        }
        if c.mode == "fuse":
            facts["fuse_column"] = c.fuse_column
        if c.mode == "rewrite":
            pools = self.pools
            pool = self.examples
            facts["examples"] = {"source": c.examples if isinstance(c.examples, str) else ("inline" if pool else None),
                                 "count": len(pool), "per_prompt": min([c.num_examples] + [len(q) for q in pools]),
                                 "sha256": P.examples_sha256(pool) if pool else None}
            if c.example_pools is not None:
                facts["examples"]["source"] = [q if isinstance(q, str) else "inline" for q in c.example_pools]
                facts["examples"]["pools"] = [len(q) for q in pools]
        return facts


def _first_text(value) -> str | None:
    """The caption to fuse with: a string, or the first non-empty string of a list."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, str) and v.strip():
                return v.strip()
    return None
