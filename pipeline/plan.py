"""Cut a job's stage list into phases separated by global-stage barriers.

Consecutive map stages fuse into one pass over each shard. A global stage first runs its map
part (``process``, e.g. computing the scores it will rank) with the stages before it; its
``scan`` runs at the end of that phase on the phase's output while it is in memory; ``merge``
runs on the driver at the barrier; ``apply`` opens the next phase. A stage that needs more
than one look at the pool (``passes > 1``, e.g. k-means then per-cluster ranks) gets
scan-only phases in between: they read the same shards, write nothing, and each pass's scan
sees the state merged from the pass before.
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
            names.append("scan" if self.scan_pass == 0 else f"scan{self.scan_pass + 1}")
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
        phases.append(Phase(len(phases), tuple(steps), scan=i, first=not phases, input_phase=last_writer()))
        for p in range(1, cls.passes(config)):
            phases.append(Phase(len(phases), (), scan=i, scan_pass=p, writes=False, input_phase=last_writer()))
        steps = [Step(i, name, "apply")]
    phases.append(Phase(len(phases), tuple(steps), first=not phases, final=True, input_phase=last_writer()))
    return phases
