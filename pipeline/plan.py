"""Cut a job's stage list into phases separated by global-stage barriers.

Consecutive map stages fuse into one pass over each shard. A global stage's ``scan`` runs at
the end of the phase before it (on that phase's output, while it is in memory), its
``merge`` on the driver at the barrier, and its ``apply`` opens the next phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pairsift.stages import get_stage_class
from pairsift.stages.base import GlobalStage


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
    first: bool = False
    final: bool = False

    @property
    def step_name(self) -> str:
        return f"p{self.index}"

    @property
    def label(self) -> str:
        names = (["ingest"] if self.first else []) + [s.name for s in self.steps]
        if self.scan is not None:
            names.append("scan")
        return "+".join(names) or "copy"


def plan_phases(stage_names: list[str]) -> list[Phase]:
    phases: list[Phase] = []
    steps: list[Step] = []
    for i, name in enumerate(stage_names):
        if issubclass(get_stage_class(name), GlobalStage):
            phases.append(Phase(len(phases), tuple(steps), scan=i, first=not phases))
            steps = [Step(i, name, "apply")]
        else:
            steps.append(Step(i, name, "process"))
    phases.append(Phase(len(phases), tuple(steps), scan=None, first=not phases, final=True))
    return phases
