"""The job spec: a YAML file validated in full before any work starts.

```yaml
name: quickstart
seed: 0
input:  {format: webdataset|parquet|urls|folder, path: <file, dir or glob>,
         url_column: url, caption_column: caption}
output: <dir>
ray:    {address: null, num_cpus: null}
stages:
  - quality:     {min_side: 64}
  - exact_dedup: {}
emit:   {shard_size: 10000}
```

Unknown keys, wrong types, unknown stages and missing inputs raise :class:`ConfigError`
naming the key path; the CLI turns that into exit code 2 before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from pairsift.pipeline.errors import ConfigError
from pairsift.stages import get_stage_class, stage_names
from pairsift.stages.base import StageConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    format: Literal["webdataset", "parquet", "urls", "folder"]
    path: str
    url_column: str = "url"
    #: Caption column (parquet, URL lists) or WebDataset extension; default ``caption`` for
    #: tables and ``txt`` for WebDataset tars and folders.
    caption_column: str | None = None
    #: Parquet column holding encoded image bytes (plain binary, or a struct with ``bytes``).
    image_column: str = "image"
    #: Parquet source columns carried into the rows as they are (e.g. precomputed embeddings).
    keep_columns: list[str] = Field(default_factory=list)
    #: Samples per input shard where the input has no shards of its own (folders, URL lists).
    shard_size: int = Field(1000, ge=1)
    #: img2dataset settings for ``format: urls``.
    download_timeout: float = Field(10.0, gt=0)
    download_retries: int = Field(0, ge=0)
    download_threads: int = Field(16, ge=1)
    #: Largest image (tar member, file, Parquet cell, download) and largest caption or
    #: ``.json`` ingest reads, in bytes; a larger one is dropped unread as ``member_too_large``.
    max_image_bytes: int = Field(64 * 2**20, ge=1)
    max_text_bytes: int = Field(2**20, ge=1)

    @model_serializer(mode="wrap")
    def _omit_default_limits(self, handler):
        """The size caps are dumped only when set: specs from before them keep their
        fingerprint (their output is the same unless a member is over a cap)."""
        d = handler(self)
        for name in ("max_image_bytes", "max_text_bytes"):
            if isinstance(d, dict) and d.get(name) == type(self).model_fields[name].default:
                d.pop(name)
        return d

    @property
    def caption_field(self) -> str:
        if self.caption_column:
            return self.caption_column
        return "txt" if self.format in ("webdataset", "folder") else "caption"


class RaySpec(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    #: GPUs a local Ray declares (None: what Ray detects). Ignored when joining a cluster.
    num_gpus: int | None = Field(None, ge=0)


class EmitSpec(_Strict):
    shard_size: int = Field(10000, ge=1)
    #: Keep the intermediate Parquet shards (with image bytes) after a successful job.
    keep_work: bool = False
    #: What each sample's .txt holds: the original caption, the ``recaption`` column, or a
    #: per-sample mix (the original with probability ``p_original``, by hash(seed, uid)).
    caption_policy: Literal["original", "recaption", "mix"] = "original"
    p_original: float = Field(0.8, ge=0.0, le=1.0)  # Recap-CLIP's best mix: 80% alt text
    #: False: write no training shards; the kept rows go to ``metadata/`` and, as an
    #: img2dataset-ready URL list, to ``urls/`` (with ``input.format: urls``: a caption-only
    #: pool, curated on its text before anything is downloaded — MetaCLIP's workflow).
    images: bool = True

    @model_serializer(mode="wrap")
    def _omit_default_images(self, handler):
        """``images`` is dumped only when false: specs from before it keep their fingerprint."""
        d = handler(self)
        if isinstance(d, dict) and d.get("images") is True:
            d.pop("images")
        return d


class StageSpec(BaseModel):
    """One validated stage entry: its registered name and typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    name: str
    config: StageConfig

    def dump(self) -> dict[str, Any]:
        return {self.name: self.config.model_dump(mode="json")}


class JobSpec(_Strict):
    name: str
    seed: int = 0
    input: InputSpec
    output: str
    ray: RaySpec = RaySpec()
    stages: list[StageSpec] = Field(default_factory=list)
    emit: EmitSpec = EmitSpec()
    #: The compute cache: a folder (shared by several outputs), "" for none; default OUT/_cache.
    cache: str | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, value: Any) -> list[StageSpec]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("must be a list of {stage_name: {options}} entries")
        out = []
        for i, entry in enumerate(value):
            if isinstance(entry, StageSpec):
                out.append(entry)
                continue
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"[{i}] must be one {{stage_name: {{options}}}} mapping, got {entry!r}")
            (name, options), = entry.items()
            try:
                stage_cls = get_stage_class(name)
            except KeyError as e:
                from pairsift.stages import IMPORT_ERRORS

                broken = "".join(f"; {m} failed to import: {err}" for m, err in sorted(IMPORT_ERRORS.items()))
                detail = "" if str(e.args[0]) == name else f" ({e.args[0]})"
                raise ValueError(
                    f"[{i}] unknown stage {name!r}{detail if ':' in name else ''}; known stages: "
                    f"{', '.join(stage_names())}{broken}"
                ) from None
            try:
                config = stage_cls.Config.model_validate(options or {})
            except ValidationError as e:
                raise ValueError(f"[{i}].{name}: " + _format_errors(e, prefix="")) from None
            out.append(StageSpec(name=name, config=config))
        return out

    @model_validator(mode="after")
    def _caption_policy_needs_recaptions(self) -> "JobSpec":
        if self.emit.caption_policy != "original" and self.caption_column() is None:
            raise ValueError(f"emit.caption_policy: {self.emit.caption_policy!r} needs a stage writing the "
                             f"'recaption' column or another caption column (a recaption stage)")
        return self

    @model_validator(mode="after")
    def _pixels_for_url_rows(self) -> "JobSpec":
        """URL-list rows carry no image: the stage their reader names
        (:data:`pairsift.pipeline.urllists.PIXELS_FROM`, ``download``) fetches it. Unless the job
        lists it itself, it goes after the longest run of leading stages that need no pixels
        (``needs_pixels``: MetaCLIP, language ID, caption rewrites, ...), so that those stages —
        and their passes over the pool — run on the URL rows and only the rows they keep are
        downloaded. Its settings not given in the stage come from ``input.download_*`` and
        ``input.max_image_bytes``. With ``emit.images: false`` (a caption-only pool) nothing is
        downloaded, and a stage that reads image bytes is refused."""
        from pairsift.pipeline.urllists import PIXELS_FROM

        supplier = get_stage_class(PIXELS_FROM)
        classes = [get_stage_class(s.name) for s in self.stages]
        listed = [i for i, c in enumerate(classes) if c is supplier]
        fmt = self.input.format
        if fmt != "urls":
            if listed:
                i = listed[0]
                raise ValueError(f"stages[{i}].{self.stages[i].name}: input.format {fmt!r} has its images; only "
                                 f"URL lists (input.format: urls) are downloaded")
            return self
        if not self.emit.images:
            if listed:
                i = listed[0]
                raise ValueError(f"stages[{i}].{self.stages[i].name}: emit.images is false (a caption-only pool), "
                                 f"so nothing is downloaded; remove the stage, or set emit.images: true")
            for i, (s, c) in enumerate(zip(self.stages, classes)):
                if c.needs_pixels(s.config):
                    raise ValueError(f"stages[{i}].{s.name} reads image bytes, and a caption-only pool (input.format: "
                                     f"urls with emit.images: false) has none: remove it, or set emit.images: true "
                                     f"to download the images of the rows the text stages keep")
            return self
        if len(listed) > 1:
            raise ValueError(f"stages[{listed[1]}].{self.stages[listed[1]].name}: listed twice (stages[{listed[0]}] "
                             f"already fetches the images)")
        if listed:
            k = listed[0]
            for i in range(k):
                if classes[i].needs_pixels(self.stages[i].config):
                    raise ValueError(f"stages[{i}].{self.stages[i].name} reads image bytes, but comes before "
                                     f"stages[{k}].{self.stages[k].name}, which fetches them")
            self.stages[k] = StageSpec(name=self.stages[k].name, config=supplier.for_input(self.input,
                                                                                            self.stages[k].config))
        else:
            k = next((i for i, (s, c) in enumerate(zip(self.stages, classes)) if c.needs_pixels(s.config)),
                     len(self.stages))
            self.stages.insert(k, StageSpec(name=supplier.name, config=supplier.for_input(self.input)))
        return self

    def caption_column(self) -> str | None:
        """The column ``emit.caption_policy`` takes recaptions from: the one the last stage that
        writes a caption column writes (``Stage.caption_column``)."""
        from pairsift.stages import get_stage_class

        found = None
        for s in self.stages:
            col = get_stage_class(s.name).caption_column(s.config)
            found = col or found
        return found

    def dump(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"stages"})
        if d.get("cache") is None:
            d.pop("cache", None)
        if not d["input"].get("keep_columns"):  # absent when unused: older specs keep their fingerprint
            d["input"].pop("keep_columns", None)
        d["stages"] = [s.dump() for s in self.stages]
        return d

    def fingerprint(self) -> str:
        """Hash of everything that determines the output (not where it goes or how many
        CPUs ran it): a rerun with the same fingerprint resumes; another is refused."""
        d = self.dump()
        d.pop("output")
        d.pop("ray")
        d.pop("cache", None)
        d["emit"].pop("keep_work", None)
        versions = {}  # a stage whose computation changed since (its `version`): not the same job
        for st in self.stages:
            from pairsift.stages import get_stage_class

            v = get_stage_class(st.name).version
            if v != "1":
                versions[st.name] = v
        if versions:
            d["stage_versions"] = versions
        if d["emit"].get("caption_policy") == "original":  # specs from before the policy existed
            d["emit"].pop("caption_policy")
            d["emit"].pop("p_original", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(e: ValidationError, prefix: str) -> str:
    lines = []
    for err in e.errors():
        loc = prefix + ".".join(str(p) for p in err["loc"] if p not in ("function-before",))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def load_job(path: str | os.PathLike, output: str | None = None, num_cpus: int | None = None) -> JobSpec:
    """Read and validate a job spec; paths in it are relative to the spec file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {e.start})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job spec is a mapping with name, input, output, stages")
    if output is not None:
        raw["output"] = output
    if num_cpus is not None:
        raw.setdefault("ray", {})
        if isinstance(raw["ray"], dict):
            raw["ray"]["num_cpus"] = num_cpus
    return parse_job(raw, base_dir=path.parent, origin=str(path))


def parse_job(raw: dict, base_dir: str | os.PathLike = ".", origin: str = "job spec") -> JobSpec:
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin}: " + _format_errors(e, prefix="").replace("; ", f"\n{origin}: ")) from None
    base = Path(base_dir)
    spec.input.path = _resolve(spec.input.path, base)
    spec.output = _resolve(spec.output, base)
    if spec.cache:
        spec.cache = _resolve(spec.cache, base)
    return spec


def _resolve(p: str, base: Path) -> str:
    if "://" in p or os.path.isabs(p):
        return p
    literal = not any(ch in p for ch in "*?[") or (base / p).exists()  # a folder named br[1] is no glob
    return str((base / p).resolve()) if literal else str(base.resolve() / p)
