"""Stage base classes: the stage contract (see ARCHITECTURE.md, "The stage contract").

A **map stage** works on one batch at a time: ``setup()`` loads models once per worker and
``process(batch) -> batch`` adds columns and marks drops. A **global stage** needs the whole
pool once: ``scan(batch) -> partial`` per shard (small), ``merge(partials) -> state`` on the
driver, and ``apply(batch, state) -> batch``, a map stage again. The runner puts a barrier
between scan and apply; nothing else is special. Stage code never imports Ray.

A stage declares everything the engine needs, so the engine names no stage:

* ``name`` and ``Config`` (a :class:`StageConfig`; ``class MyStage(Stage[MyConfig])`` sets it
  and types ``self.config``). Defining the class registers it under ``name`` (no central list);
  ``mypkg.module:MyStage`` in a job spec imports it, and the ``pairsift.stages`` entry-point
  group names stages of other packages.
* ``resources()`` — a :class:`Resources` (CPUs, GPUs per worker), checked at preflight.
* ``scores`` — which added columns are scores (stats and report summarise them); by default
  every numeric column the stage adds is one.
* ``artifacts`` — folders it writes directly under the output (``--restart`` removes them),
  and ``report_section`` — its part of ``report.html``.
* ``caption_column`` — the column it writes that ``emit.caption_policy`` may put in the .txt.
* For global stages, ``passes`` — its looks at the pool, by name.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("pairsift")


#: The role of a config field (ARCHITECTURE.md, "Compute once, decide many times"):
#: ``computes`` — it changes the columns a stage computes (a model, an OCR engine, the metadata
#: list): the default; ``decides`` — it only changes which rows are dropped from those columns
#: (a threshold, a fraction, t): changing it reuses every computed column; ``runtime`` — it
#: changes neither (batch sizes, threads, devices, concurrency).
COMPUTES, DECIDES, RUNTIME = "computes", "decides", "runtime"


def decision(default: Any = ..., **kwargs: Any) -> Any:
    """A config field that only decides (see :data:`DECIDES`): ``min_score: float | None = decision(None)``."""
    return Field(default, json_schema_extra={"pairsift": DECIDES}, **kwargs)


def runtime(default: Any = ..., **kwargs: Any) -> Any:
    """A config field that changes neither what is computed nor what is decided."""
    return Field(default, json_schema_extra={"pairsift": RUNTIME}, **kwargs)


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys and wrong types are errors. Each field has a
    role (:func:`decision`, :func:`runtime`; the default is ``computes``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def field_roles(cls) -> dict[str, str]:
        roles = {}
        for name, f in cls.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            roles[name] = extra.get("pairsift", COMPUTES)
        return roles

    def part(self, role: str) -> dict[str, Any]:
        """The fields of one role, as JSON values."""
        dump = self.model_dump(mode="json")
        return {k: dump[k] for k, r in self.field_roles().items() if r == role and k in dump}


ConfigT = TypeVar("ConfigT", bound=StageConfig)


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs (as NeMo Curator's ``Resources``): CPUs and GPUs,
    fractions allowed (``gpus=0.25``: four workers share a GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def ray_options(self) -> dict[str, float]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def as_resources(value: Any) -> Resources:
    """A :class:`Resources` from what ``resources()`` returned (also the older
    ``{"num_cpus", "num_gpus"}`` dict)."""
    if isinstance(value, Resources):
        return value
    if isinstance(value, dict):
        return Resources(cpus=float(value.get("num_cpus", 1.0)), gpus=float(value.get("num_gpus", 0.0)))
    raise TypeError(f"resources() must return Resources, not {type(value).__name__}")


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the job it runs in."""

    seed: int = 0
    output: str = ""
    index: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def cluster(self) -> dict[str, float]:
        """What the job may use: ``{"CPU": n, "GPU": m}`` (empty before the executor starts)."""
        return dict(self.extras.get("cluster") or {})

    @property
    def granted(self) -> Resources | None:
        """The resources this worker was granted (None on the driver)."""
        r = self.extras.get("resources")
        return as_resources(r) if r else None


#: Registered stages by name: every Stage subclass with a ``name`` adds itself here.
REGISTERED: dict[str, type] = {}


def _register(cls: type) -> None:
    old = REGISTERED.get(cls.name)
    if old is None or (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__):
        REGISTERED[cls.name] = cls
        return
    builtin = cls.__module__.startswith("pairsift.stages.")
    if builtin and not old.__module__.startswith("pairsift.stages."):
        log.warning("stage name %r of %s.%s is a built-in stage's name: the built-in wins", cls.name,
                    old.__module__, old.__qualname__)
        REGISTERED[cls.name] = cls
    elif not builtin:
        log.warning("stage name %r is taken by %s.%s; %s.%s is only reachable by its import path", cls.name,
                    old.__module__, old.__qualname__, cls.__module__, cls.__qualname__)


class Stage(Generic[ConfigT]):
    """A map stage. Subclasses set ``name`` and ``Config`` (or subclass ``Stage[MyConfig]``)
    and implement ``process``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    config: ConfigT
    #: Added columns that are scores (summarised by ``pairsift stats`` and the report). None:
    #: every numeric column this stage adds.
    scores: ClassVar[tuple[str, ...] | None] = None
    #: Resources one worker of this stage needs; the runner sizes its pools from them.
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    #: Bump when the stage's computation changes for the same config (shipped data included):
    #: cached columns of an older version are never reused, and an output made by it is not the
    #: same job any more (its spec fingerprint changes), so it is not resumed.
    version: ClassVar[str] = "1"
    #: Whether the columns this stage computes are cached (off for stages that compute nothing
    #: worth keeping, or whose work must happen every run).
    cacheable: ClassVar[bool] = True
    #: Existing columns the computation rewrites (e.g. a normalised ``caption``): cached too.
    rewrites: ClassVar[tuple[str, ...]] = ()
    #: Folders this stage writes directly under the job's output (``finalize``'s artifacts,
    #: e.g. ``("metaclip",)``): recorded in ``_work/job.json`` so that ``--restart`` removes them.
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):  # class X(Stage[XConfig]) sets Config
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], StageConfig) and "Config" not in cls.__dict__:
                cls.Config = args[0]
        if cls.__dict__.get("name"):
            _register(cls)

    def __init__(self, config: ConfigT, context: StageContext | None = None):
        self.config = config
        self.context = context or StageContext()
        #: The input shard the worker is processing (set by the worker before each shard).
        self.shard: Any = None

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

    def resources(self) -> Resources:
        """What one worker needs for this configuration (CPUs, GPUs); ``self.context.cluster``
        says what the job has. Raise ConfigError for what cannot run there."""
        return Resources(cpus=self.num_cpus, gpus=self.num_gpus)

    @classmethod
    def needs_pixels(cls, config: StageConfig) -> bool:
        """Whether this configuration reads the ``image`` bytes. A phase whose stages need none
        gets no image bytes (the worker does not read them), and with URL lists the stages
        before the first one that needs pixels run before anything is downloaded. Default True:
        a stage that says nothing gets the bytes."""
        return True

    @classmethod
    def caption_column(cls, config: StageConfig) -> str | None:
        """The column this configuration writes that ``emit.caption_policy`` may put in each
        sample's .txt instead of the alt text (a recaption); None if it writes none."""
        return None

    @classmethod
    def report_section(cls, output: str, manifest: dict) -> str | None:
        """This stage's part of ``report.html`` (HTML, e.g. a chart of its artifact), or None."""
        return None

    @classmethod
    def stats_section(cls, output: str, con: Any) -> list[str]:
        """This stage's lines of ``pairsift stats`` beyond its score summaries; ``con`` is a
        DuckDB connection with the ``samples`` and ``rejected`` views."""
        return []

    def preflight(self) -> None:
        """Check what can be checked before any work starts (models present, files exist).

        Raise :class:`pairsift.pipeline.errors.ConfigError` with a message naming the problem.
        """

    def setup(self) -> None:
        """Load models; called once per worker before the first batch."""

    def process(self, batch: pa.Table) -> pa.Table:
        """Add this stage's columns and mark its drops: ``decide(compute(batch))``. A stage
        either implements ``process`` (then all of it is computed, and cached, from its
        ``computes`` fields) or splits it into ``compute`` and ``decide``."""
        return self.decide(self.compute(batch))

    def compute(self, batch: pa.Table) -> pa.Table:
        """The expensive part: add the columns this stage computes for the live rows (and drop
        rows it cannot compute, e.g. ``decode_error``). Its results are cached per row, keyed by
        the ``computes`` fields, the stages before and the input shard, and reused by any run
        whose spec changes only decisions."""
        raise NotImplementedError(f"stage {self.name!r} implements neither process nor compute")

    def decide(self, batch: pa.Table) -> pa.Table:
        """The cheap part: drop rows from the computed columns and the ``decides`` fields."""
        return batch

    def summary(self) -> dict:
        """Small per-job facts for the manifest (model names, thresholds)."""
        return {}

    def take_timings(self) -> dict[str, float]:
        """Seconds spent in parts of ``process`` since the last call (e.g. decode, infer); the
        worker adds them to the shard's timings as ``<stage>.<part>`` and resets them."""
        return {}


class GlobalStage(Stage[ConfigT]):
    """A stage that needs the whole pool.

    ``process`` (its map part, identity by default) runs with the stages before it. Then, for
    each of its ``passes`` (names, in order): ``scan(batch, pass_name, state)`` per batch and
    ``combine(partials, pass_name)`` per shard, in the workers (``self.shard`` is the shard;
    a combine may write spill files under ``self.work_dir``); ``merge(partials, pass_name,
    state)`` on the driver, which must stay small (histograms, counts, centroids — never one
    entry per sample); and, where the work is too big for one process, ``reduce_tasks`` lists
    tasks the executor runs in parallel (``reduce``, e.g. one range of spill partitions each)
    whose results ``reduced`` folds into the state. After the last pass, ``finalize`` writes the
    stage's artifacts and ``apply(batch, state)`` runs per batch as a map stage again (it may
    read per-shard decisions a reduce wrote, for ``self.shard``). Override ``is_global`` where
    only some configurations need the pool."""

    @classmethod
    def is_global(cls, config: StageConfig) -> bool:
        return True

    @classmethod
    def passes(cls, config: StageConfig) -> tuple[str, ...]:
        """The stage's looks at the pool, by name, in order."""
        return ("scan",)

    def compute(self, batch: pa.Table) -> pa.Table:
        """A global stage's map part computes nothing unless it says so."""
        return batch

    def scan_columns(self, pass_name: str) -> tuple[str, ...] | None:
        """The columns ``scan`` reads in this pass (a scan-only phase reads no others from the
        work shards); None: every column."""
        return None

    def scan(self, batch: pa.Table, pass_name: str, state: Any) -> Any:  # pragma: no cover - abstract
        """One batch's partial; ``state`` is what the previous pass merged (None for the first)."""
        raise NotImplementedError

    def combine(self, partials: list[Any], pass_name: str) -> Any:
        """One shard's partial from its batches' (default: the list as is)."""
        return partials

    def merge(self, partials: list[Any], pass_name: str, state: Any) -> Any:  # pragma: no cover - abstract
        """The pass's state from every shard's partial (on the driver: keep it small)."""
        raise NotImplementedError

    def reduce_tasks(self, pass_name: str, state: Any) -> list[Any]:
        """Work to run in parallel after ``merge`` (small descriptions, e.g. partition ranges)."""
        return []

    def reduce(self, pass_name: str, task: Any, state: Any) -> Any:  # pragma: no cover - abstract
        """Run one reduce task (in a worker); its result goes to ``reduced``."""
        raise NotImplementedError

    def reduced(self, pass_name: str, state: Any, results: list[Any]) -> Any:
        """The state after the pass's reduce tasks (default: unchanged)."""
        return state

    def apply(self, batch: pa.Table, state: Any) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, state: Any, output: str) -> dict:
        """Write the stage's job-level artifacts under ``output``; return manifest facts."""
        return {}

    @property
    def work_dir(self) -> str:
        """Scratch space of this stage in this job (spill files, decisions): under ``_work``,
        removed with it."""
        from pairsift.pipeline import layout

        return layout.stage_work_dir(self.context.output, f"{self.name}-{self.context.index}")
