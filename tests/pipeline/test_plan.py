"""Phases: map stages fuse; a global stage's map part and scan end a phase, apply opens the next."""

from __future__ import annotations

from pairsift.pipeline.plan import plan_phases
from pairsift.stages.base import GlobalStage, StageConfig


class TwoPassConfig(StageConfig):
    pass


class TwoPass(GlobalStage):
    """A global stage that needs two looks at the pool (like k-means, then ranks)."""

    name = "two_pass"
    Config = TwoPassConfig

    @classmethod
    def passes(cls, config) -> tuple[str, ...]:
        return ("kmeans", "ranks")


def _shape(phases):
    return [([(s.name, s.mode) for s in p.steps], p.scan, p.scan_pass, p.writes, p.input_phase, p.final)
            for p in phases]


def test_map_stages_fuse_into_one_phase():
    phases = plan_phases([("quality", StageConfig()), ("fault_injection", StageConfig())])
    assert _shape(phases) == [([("quality", "process"), ("fault_injection", "process")], None, 0, True, None, True)]
    assert phases[0].first and phases[0].label == "ingest+quality+fault_injection"


def test_global_stage_splits_phases():
    phases = plan_phases([("quality", None), ("exact_dedup", None), ("fault_injection", None)])
    assert _shape(phases) == [
        ([("quality", "process"), ("exact_dedup", "process")], 1, 0, True, None, False),
        ([("exact_dedup", "apply"), ("fault_injection", "process")], None, 0, True, 0, True),
    ]


def test_multi_pass_stage_gets_scan_only_phases():
    name = f"{__name__}:TwoPass"
    phases = plan_phases([("quality", None), (name, None), ("exact_dedup", None)])
    assert _shape(phases) == [
        ([("quality", "process"), (name, "process")], 1, 0, True, None, False),
        ([], 1, 1, False, 0, False),  # second look: reads p0, writes nothing
        ([(name, "apply"), ("exact_dedup", "process")], 2, 0, True, 0, False),
        ([("exact_dedup", "apply")], None, 0, True, 2, True),
    ]
    assert [p.label for p in phases] == [f"ingest+quality+{name}+kmeans", "ranks", f"{name}+exact_dedup+scan",
                                         "exact_dedup"]
    assert [p.last_pass for p in phases[:3]] == [False, True, True]


class Twice(TwoPass):
    name = "two_pass_twice"

    @classmethod
    def passes(cls, config):
        return ("a", "a")


def test_passes_must_be_named_once():
    import pytest

    with pytest.raises(ValueError, match="must name each pass once"):
        plan_phases([(f"{__name__}:Twice", None)])


def test_phase_batch_rows_takes_the_largest_hint_within_bounds():
    from pairsift.pipeline.worker import phase_batch_rows
    from pairsift.stages.base import Stage

    class Hint(Stage):
        def __init__(self, rows):
            super().__init__(StageConfig())
            self.rows = rows

        def batch_rows(self):
            return self.rows

    assert phase_batch_rows([]) == 256
    assert phase_batch_rows([Hint(None), Hint(64)]) == 256
    assert phase_batch_rows([Hint(1024), Hint(4096)]) == 4096
    assert phase_batch_rows([Hint(100_000)]) == 8192
