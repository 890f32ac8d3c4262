"""``pairsift stats OUT --what-if 'clip_score.min_score=0.3'``: the funnel another decision would
give, from the stored columns, without running a job (ARCHITECTURE.md, "Compute once, decide
many times").

Every row of the output (``metadata/`` and ``rejected/``, read with DuckDB) is decided again,
stage by stage, by the stages' own code with the changed configuration: a map stage's
``decide``, a global stage's passes and ``apply`` (through the engine's in-memory driver) — no
stage computes anything, no model is loaded. Only ``decides`` fields may change; a ``computes``
field needs a run (``pairsift run`` reuses the cache for everything else).

What stays as it was: drops that are facts about the data (``decode_error``,
``missing_image``, download and read failures, ``error:<stage>``) — a decision cannot undo them.
What cannot be known: a row the new decisions let reach a stage it never reached (a loosened
upstream threshold) has no computed columns there; it is counted as ``not computed`` and left
out of the stages after (so their counts are lower bounds).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from pairsift.pipeline import layout
from pairsift.pipeline.errors import ConfigError

#: Drop reasons that are facts about the data, which no decision changes.
FACTS = {"decode_error", "missing_image", "decompression_bomb", "download_failed", "source_truncated",
         "source_corrupt", "member_too_large", "missing_caption", "caption_not_utf8"}
NOT_COMPUTED = "what_if:not_computed"
ROWS_PER_SHARD = 65536


def parse_override(text: str) -> tuple[str, str, Any]:
    """``stage.field=value`` (``stage`` a name, or ``name#2`` for its second entry, or its
    index in the job's stage list); the value is read as YAML."""
    left, sep, value = text.partition("=")
    stage, dot, name = left.strip().rpartition(".")
    if not sep or not dot or not stage or not name:
        raise ConfigError(f"--what-if {text!r}: expected stage.field=value, e.g. clip_score.min_score=0.3")
    try:
        return stage, name, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--what-if {text!r}: the value is not valid YAML: {e}") from None


def _stage_index(spec, ref: str) -> int:
    names = [s.name for s in spec.stages]
    if ref.isdigit() and int(ref) < len(names):
        return int(ref)
    name, _, nth = ref.partition("#")
    hits = [i for i, n in enumerate(names) if n == name]
    k = int(nth) - 1 if nth.isdigit() else 0
    if not hits or k >= len(hits):
        raise ConfigError(f"--what-if: the job has no stage {ref!r} (its stages: {', '.join(names)})")
    return hits[k]


def changed_spec(spec, overrides: list[tuple[str, str, Any]]):
    """The job's stages with the overrides applied; only ``decides`` fields may change."""
    from pairsift.stages import get_stage_class
    from pairsift.stages.base import DECIDES

    configs = [s.config for s in spec.stages]
    for ref, field, value in overrides:
        i = _stage_index(spec, ref)
        cls = get_stage_class(spec.stages[i].name)
        roles = cls.Config.field_roles()
        if field not in roles:
            raise ConfigError(f"--what-if: {spec.stages[i].name} has no field {field!r} ({', '.join(roles)})")
        if roles[field] != DECIDES:
            raise ConfigError(f"--what-if: {spec.stages[i].name}.{field} changes what is computed ({roles[field]}), "
                              f"not only what is decided: run the job with it (`pairsift run` reuses the cache for "
                              f"everything else)")
        try:
            configs[i] = cls.Config.model_validate({**configs[i].model_dump(), field: value})
        except Exception as e:  # pydantic's message names the problem
            raise ConfigError(f"--what-if {spec.stages[i].name}.{field}={value!r}: {e}") from None
    return configs


def _rows(output: str) -> pa.Table:
    """Every row of the output, kept and rejected (Arrow reads the float16 embeddings as they are)."""
    import pyarrow.parquet as pq

    parts = []
    for sub in ("metadata", "rejected"):
        folder = layout.rows_dir(output, kept=sub == "metadata")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".parquet"):
                parts.append(pq.read_table(os.path.join(folder, name)))
    if not parts:
        raise ConfigError(f"{output} holds no rows (metadata/ and rejected/ are empty)")
    return pa.concat_tables(parts, promote_options="permissive")


def _origin(spec, stages: list[str], table: pa.Table) -> np.ndarray:
    """Index of the stage that dropped each row in the run (-1: ingest; len: kept or emit)."""
    first = {}
    for i, name in enumerate(stages):
        first.setdefault(name, i)
    out = []
    for st in table.column("drop_stage").to_pylist():
        if st is None or st == "emit":
            out.append(len(stages))
        elif st == "ingest":
            out.append(-1)
        else:
            out.append(first.get(st, len(stages)))
    return np.asarray(out, np.int64)


def what_if(output: str, overrides: list[str]) -> dict[str, Any]:
    """The funnel of the run and the funnel the overrides would give."""
    from pairsift.pipeline.runner import run_global_stage
    from pairsift.pipeline.spec import parse_job
    from pairsift.stages import get_stage_class
    from pairsift.stages.base import GlobalStage, StageContext

    path = layout.manifest_file(output)
    if not os.path.isfile(path):
        raise ConfigError(f"{output} has no manifest.json: --what-if needs a finished job")
    with open(path) as f:
        manifest = json.load(f)
    spec = parse_job(manifest["spec"])
    configs = changed_spec(spec, [parse_override(o) for o in overrides])
    names = [s.name for s in spec.stages]
    table = _rows(output)
    origin = _origin(spec, names, table)
    reasons = table.column("drop_reason").to_pylist()
    # start over: every row live but those ingest (or a fact) dropped before any stage
    new_reason: list[str | None] = [r if o < 0 else None for r, o in zip(reasons, origin)]
    new_stage: list[str | None] = ["ingest" if o < 0 else None for o in origin]
    unknown = 0
    work = tempfile.mkdtemp(prefix="pairsift-whatif-")
    for i, name in enumerate(names):
        live = np.array([r is None for r in new_reason])
        # rows that never reached this stage in the run have nothing computed for it
        missing = np.flatnonzero(live & (origin < i))
        for j in missing:
            new_reason[j], new_stage[j] = NOT_COMPUTED, name
        unknown += missing.size
        # drops by this stage that are facts stay
        for j in np.flatnonzero(live & (origin == i)):
            r = reasons[j]
            if r in FACTS or (r or "").startswith("error:"):
                new_reason[j], new_stage[j] = r, names[origin[j]]
        live_idx = np.flatnonzero(np.array([r is None for r in new_reason]))
        if not live_idx.size:
            continue
        rows = table.take(pa.array(live_idx))
        rows = rows.set_column(rows.schema.get_field_index("drop_reason"), "drop_reason",
                               pa.nulls(rows.num_rows, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("drop_stage"), "drop_stage",
                               pa.nulls(rows.num_rows, pa.string()))
        cls = get_stage_class(name)
        stage = cls(configs[i], StageContext(seed=spec.seed, output=work, index=i))
        if cls.is_global(configs[i]):
            assert isinstance(stage, GlobalStage)  # no setup(): deciding loads no model
            shards = [[rows.slice(a, ROWS_PER_SHARD)] for a in range(0, rows.num_rows, ROWS_PER_SHARD)]
            _, decided, _ = run_global_stage(stage, shards, work)
        else:
            decided = stage.decide(rows)
        got_reason = decided.column("drop_reason").to_pylist()
        got_stage = decided.column("drop_stage").to_pylist()
        for j, r, st in zip(live_idx, got_reason, got_stage):
            if r is not None:
                new_reason[j], new_stage[j] = r, st
    return {"stages": names, "actual": _funnel(names, table.column("drop_stage").to_pylist(), reasons),
            "what_if": _funnel(names, new_stage, new_reason), "not_computed": int(unknown),
            "overrides": overrides, "rows": table.num_rows}


def _funnel(names: list[str], stages: list, reasons: list) -> list[dict]:
    by: dict[str, Counter] = {}
    for st, r in zip(stages, reasons):
        if r is not None:
            by.setdefault(st or "?", Counter())[r] += 1
    remaining = len(reasons)
    out = []
    for name in dict.fromkeys(["ingest", *names, *sorted(s for s in by if s not in names and s != "ingest")]):
        c = by.get(name, Counter())
        dropped = sum(c.values())
        out.append({"stage": name, "in": remaining, "dropped": dropped, "out": remaining - dropped,
                    "reasons": dict(c.most_common())})
        remaining -= dropped
    return out


def format_what_if(result: dict) -> str:
    from pairsift.pipeline.stats import format_table

    rows = []
    for a, w in zip(result["actual"], result["what_if"]):
        top = ", ".join(f"{r} {n:,}" for r, n in list(w["reasons"].items())[:3])
        rows.append((a["stage"], a["dropped"], w["dropped"], w["out"], top))
    lines = [f"what if {'; '.join(result['overrides'])} ({result['rows']:,} rows, decided again from the stored "
             f"columns; no model was run):", format_table(["stage", "dropped (run)", "dropped (what-if)",
                                                            "out (what-if)", "what-if reasons"], rows),
             "", f"kept: {result['actual'][-1]['out']:,} in the run, {result['what_if'][-1]['out']:,} with the change"]
    if result["not_computed"]:
        lines.append(f"{result['not_computed']:,} row(s) would reach a stage they never reached, which computed "
                     f"nothing for them: counted as {NOT_COMPUTED} (the counts after are lower bounds; "
                     f"`pairsift run` with the change computes only those rows)")
    return "\n".join(lines)

