"""Cut a job's stage list into phases separated by global-stage barriers.

Consecutive map stages fuse into one pass over each shard. A global stage first runs its map
part (``process``, e.g. computing the scores it will rank) with the stages before it; its
``scan`` runs at the end of that phase on the phase's output while it is in memory; ``merge``
runs on the driver at the barrier; ``apply`` opens the next phase. A stage that needs more
than one look at the pool (``passes > 1``, e.g. k-means then per-cluster ranks) gets
scan-only phases in between: they read the same shards, write nothing, and each pass's scan
sees the state merged from the pass before. Passes have names (``GlobalStage.passes``), which
label the phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pairsift.stages import get_stage_class


@dataclass(frozen=True)
class Step:
    stage: int  # index into the job's stage list
    name: str
    mode: str  # "process" | "apply"


@dataclass(frozen=True)
class Phase:
    index: int
    steps: tuple[Step, ...] = field(default=())
    scan: int | None = None  # stage index whose scan runs on this phase's output
    scan_pass: int = 0  # which pass of that stage's scan
    pass_name: str = ""  # that pass's name (GlobalStage.passes)
    last_pass: bool = True  # whether it is the stage's last pass (then its apply opens the next phase)
    first: bool = False
    final: bool = False
    writes: bool = True  # scan-only phases read their input and write nothing
    input_phase: int | None = None  # the phase whose shards this one reads (None: the sources)

    @property
    def step_name(self) -> str:
        return f"p{self.index}"

    @property
    def label(self) -> str:
        names = (["ingest"] if self.first else []) + [s.name for s in self.steps]
        if self.scan is not None:
            names.append(self.pass_name or "scan")
        return "+".join(names) or "copy"


def plan_phases(stages: list) -> list[Phase]:
    """Phases for ``stages``: a list of (name, config) pairs (or stage specs with them)."""
    phases: list[Phase] = []
    steps: list[Step] = []

    def last_writer() -> int | None:
        writers = [p.index for p in phases if p.writes]
        return writers[-1] if writers else None

    for i, entry in enumerate(stages):
        name, config = (entry.name, entry.config) if hasattr(entry, "config") else entry
        cls = get_stage_class(name)
        steps.append(Step(i, name, "process"))
        if not cls.is_global(config):
            continue
        names = tuple(cls.passes(config))
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{name}: passes() must name each pass once, got {names!r}")
        phases.append(Phase(len(phases), tuple(steps), scan=i, pass_name=names[0], last_pass=len(names) == 1,
                            first=not phases, input_phase=last_writer()))
        for p in range(1, len(names)):
            phases.append(Phase(len(phases), (), scan=i, scan_pass=p, pass_name=names[p], last_pass=p == len(names) - 1,
                                writes=False, input_phase=last_writer()))
        steps = [Step(i, name, "apply")]
    phases.append(Phase(len(phases), tuple(steps), first=not phases, final=True, input_phase=last_writer()))
    return phases
