"""The README's tables say what the code does: the decides/runtime field table of "Compute once,
decide many times" lists exactly each stage's declared fields."""

from __future__ import annotations

import re
from pathlib import Path

from pairsift.stages import get_stage_class
from pairsift.stages.base import DECIDES, RUNTIME

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> dict[str, tuple[set[str], set[str]]]:
    text = README.read_text()
    section = text[text.index("## Compute once, decide many times"):text.index("## Writing a stage")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_]+)` \|(.*)\|(.*)\|$", line)
        if m:
            fields = [set(re.findall(r"`([a-z_]+)`", col)) for col in (m.group(2), m.group(3))]
            rows[m.group(1)] = (fields[0], fields[1])
    return rows


def test_the_compute_decide_table_matches_the_configs():
    table = _table()
    assert table, "the table is missing"
    for name, (decides, runtime) in table.items():
        roles = get_stage_class(name).Config.field_roles()
        assert decides == {f for f, r in roles.items() if r == DECIDES}, name
        assert runtime == {f for f, r in roles.items() if r == RUNTIME}, name


def test_every_stage_with_decisions_or_runtime_fields_is_in_the_table():
    from pairsift.stages import stage_names

    table = _table()
    for name in stage_names():
        if name in ("fault_injection", "download"):
            continue  # a test tool; a fetch that is never cached
        roles = set(get_stage_class(name).Config.field_roles().values())
        if roles & {DECIDES, RUNTIME}:
            assert name in table, name
