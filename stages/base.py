"""Stage base classes (DESIGN.md, "shard in, shard out").

A **map stage** works on one batch at a time: ``setup()`` loads models once per worker and
``process(batch) -> batch`` adds columns and marks drops. A **global stage** needs the whole
pool once: ``scan(batch) -> partial`` per shard (small), ``merge(partials) -> state`` on the
driver, and ``apply(batch, state) -> batch``, a map stage again. The runner puts a barrier
between scan and apply; nothing else is special. Stage code never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the job it runs in."""

    seed: int = 0
    output: str = ""
    index: int = 0
    extras: dict = field(default_factory=dict)


class Stage:
    """A map stage. Subclasses set ``name`` and ``Config`` and implement ``process``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    #: Resources one worker of this stage needs; the runner sizes its pools from them.
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    #: Folders this stage writes directly under the job's output (``finalize``'s artifacts,
    #: e.g. ``("metaclip",)``): recorded in ``_work/job.json`` so that ``--restart`` removes them.
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StageConfig, context: StageContext | None = None):
        self.config = config
        self.context = context or StageContext()

    @classmethod
    def is_global(cls, config: StageConfig) -> bool:
        """Whether this configuration needs the whole pool (scan/merge/apply)."""
        return False

    @classmethod
    def passes(cls, config: StageConfig) -> int:
        """How many scans over the pool a global stage needs before ``apply``."""
        return 1

    def batch_rows(self) -> int | None:
        """Rows this stage would like per batch (e.g. a model batch, or a matcher that gains
        from large calls); the worker takes the largest hint of a phase's stages, at least
        256 and at most 8192 rows. None: no preference."""
        return None

    def resources(self) -> dict[str, float]:
        """Ray resources one worker needs for this configuration (CPUs, GPUs)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def preflight(self) -> None:
        """Check what can be checked before any work starts (models present, files exist).

        Raise :class:`pairsift.pipeline.errors.ConfigError` with a message naming the problem.
        """

    def setup(self) -> None:
        """Load models; called once per worker before the first batch."""

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self) -> dict:
        """Small per-job facts for the manifest (model names, thresholds)."""
        return {}

    def take_timings(self) -> dict[str, float]:
        """Seconds spent in parts of ``process`` since the last call (e.g. decode, infer); the
        worker adds them to the shard's timings as ``<stage>.<part>`` and resets them."""
        return {}


class GlobalStage(Stage):
    """A stage that needs the whole pool: ``process`` (its map part, identity by default)
    runs with the stages before it, then ``scan`` per batch, ``combine`` per shard, ``merge``
    on the driver, and ``apply`` per batch. Override ``is_global`` where only some
    configurations need the pool, and ``passes`` (with ``scan_pass``/``merge_pass``) where
    one look is not enough."""

    @classmethod
    def is_global(cls, config: StageConfig) -> bool:
        return True

    def process(self, batch: pa.Table) -> pa.Table:
        return batch

    def scan(self, batch: pa.Table) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def scan_pass(self, batch: pa.Table, pass_index: int, state: Any) -> Any:
        """Scan of pass ``pass_index``; ``state`` is what the pass before merged."""
        return self.scan(batch)

    def merge_pass(self, partials: list[Any], pass_index: int, state: Any) -> Any:
        return self.merge(partials)

    def combine(self, partials: list[Any]) -> Any:
        """Combine the partials of one shard's batches into the shard's partial.

        Defaults to ``merge``'s input format: a list kept as is."""
        return partials

    def merge(self, partials: list[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, batch: pa.Table, state: Any) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, state: Any, output: str) -> dict:
        """Write the stage's job-level artifacts under ``output``; return manifest facts."""
        return {}

