"""What one worker does with one shard in one phase: read, run the fused stages, write,
commit. Plain Python: the runner wraps it in a Ray task.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairsift.pipeline import layout, storage
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.images import ImageRejected, make_trainable
from pairsift.pipeline.ledger import Ledger
from pairsift.pipeline.plan import Phase
from pairsift.pipeline.cache import DROP, ShardCaches, cache_root, compute_fingerprints
from pairsift.pipeline.imagestore import ImageStoreWriter, fetch_images
from pairsift.pipeline.table import INGEST_SCHEMA, LOCATOR_COLUMNS, live_mask, mark_dropped, set_column
from pairsift.stages import get_stage_class
from pairsift.stages.base import Stage, StageContext
from pairsift.pipeline.ingest import InputShard, input_schema, read_shard

log = logging.getLogger("pairsift.worker")
if os.environ.get("PAIRSIFT_LOG_LEVEL") and not log.handlers:  # inside a Ray worker
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(asctime)s pairsift.worker[%(process)d] %(message)s"))
    log.addHandler(_h)
    log.setLevel(os.environ["PAIRSIFT_LOG_LEVEL"])
    log.propagate = False

BATCH_SIZE = 256  # rows per batch unless a stage of the phase asks for more
MAX_BATCH_SIZE = 8192
_STAGES: dict[tuple, Stage] = {}


work_path = layout.work_path
rejected_path = layout.rejected_path

#: A stage that raises on every one of at least this many live rows of a shard is broken (a
#: bug, a missing model, a dead server): the job fails naming the shard. Fewer rows, all
#: failing, are hostile samples: each is dropped as ``error:<stage>`` and the job goes on.
BROKEN_STAGE_MIN_ROWS = 4


def get_stage(spec, index: int, extras: dict | None = None) -> Stage:
    """The job's stage ``index``, set up once per worker process.

    ``extras`` reaches the stage as ``context.extras``: the runner puts the Ray resources
    granted to this worker there (``resources``: num_cpus, num_gpus) and the cluster's
    totals (``cluster``: CPU, GPU)."""
    key = (spec.fingerprint(), spec.output, index)
    stage = _STAGES.get(key)
    if stage is None:
        entry = spec.stages[index]
        cls = get_stage_class(entry.name)
        ctx = StageContext(seed=spec.seed, output=spec.output, index=index, extras=dict(extras or {}))
        stage = cls(entry.config, ctx)
        stage.setup()
        _STAGES[key] = stage
    return stage


def _run_guarded(fn, batch: pa.Table, stage_name: str, errors: list[str]) -> pa.Table:
    """Run ``fn`` on the batch; if it raises, run it row by row and drop the rows that
    raise with reason ``error:<stage>`` (the cause goes to ``errors``, one entry a row)."""
    try:
        return fn(batch)
    except Exception as batch_exc:  # noqa: BLE001 - any stage bug must not lose the shard
        if batch.num_rows <= 1:
            errors.extend([f"{type(batch_exc).__name__}: {batch_exc}"] * batch.num_rows)
            return mark_dropped(batch, ["error:" + stage_name] * batch.num_rows, stage_name)
        parts = []
        for i in range(batch.num_rows):
            row = batch.slice(i, 1)
            if not live_mask(row)[0]:
                parts.append(row)
                continue
            parts.append(_run_guarded(fn, row, stage_name, errors))
        return pa.concat_tables(parts, promote_options="permissive")


def _leaf_paths(name: str, t: pa.DataType) -> list[str]:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaf_paths(f"{name}.list.element", t.value_type)
    if pa.types.is_struct(t):
        return [p for i in range(t.num_fields) for p in _leaf_paths(f"{name}.{t.field(i).name}", t.field(i).type)]
    return [name]


def phase_batch_rows(stages: list[Stage]) -> int:
    """Rows per batch for a phase: the largest hint of its stages, within [256, 8192]."""
    hints = [h for h in (s.batch_rows() for s in stages) if h]
    return min(max([BATCH_SIZE] + hints), MAX_BATCH_SIZE)


#: Columns every scan sees, whatever it declares: the row's identity and whether it is live.
ROW_COLUMNS = ("uid", "drop_reason", "drop_stage")


def _work_batches(path: str, rows: int, columns: list[str] | None = None):
    """Batches of a work shard an earlier phase wrote (only ``columns``, when given); the file
    is closed when done."""
    fs, p = storage.fs_path(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
        for rb in pf.iter_batches(rows, columns=columns):
            yield pa.Table.from_batches([rb], schema=schema)


def _codecs(schema: pa.Schema) -> dict[str, str]:
    """zstd for every Parquet column but the image bytes, which are compressed already."""
    return {p: ("NONE" if f.name == "image" else "ZSTD") for f in schema for p in _leaf_paths(f.name, f.type)}


def _size(path: str) -> int:
    try:
        fs, p = storage.fs_path(path)
        return int(fs.size(p) or 0) if fs.exists(p) and not fs.isdir(p) else 0
    except Exception:  # noqa: BLE001 - a figure for the benchmarks, never a failure
        return 0


def _io_facts(read: str, written: list[str], rejected: list[str]) -> dict[str, int]:
    """Bytes this task read and wrote (file sizes) and the worker process's peak RSS so far,
    for ``tests/benchmarks/bench_scale.py`` and the report's throughput table."""
    import resource

    return {"bytes_read": _size(read), "bytes_written": sum(_size(p) for p in written + rejected),
            "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _splits(stage: Stage) -> bool:
    """Whether the stage implements ``compute`` (and ``decide``) rather than its own ``process``."""
    return type(stage).process is Stage.process


def _probe_schema(spec, phase: Phase, in_schema: pa.Schema, states: dict[int, Any],
                  extras: dict | None) -> tuple[pa.Schema, dict[int, list[list[str]]], dict[int, pa.Schema]]:
    """The phase's output schema (its stages run on an empty batch of the input schema), the
    columns each stage added, with their Arrow types (for the manifest), and for each map
    step the schema of what it computes (the columns its ``compute`` — or ``process`` — adds,
    and those it rewrites): what the compute cache keeps.

    Unguarded on purpose: a stage that cannot handle an empty batch would otherwise have its
    columns silently cast away from every real batch. Its failure is a ConfigError naming it."""
    batch = in_schema.empty_table()
    added: dict[int, list[list[str]]] = {}
    computed: dict[int, pa.Schema] = {}
    own: dict[str, set[str]] = {}  # stage name -> the columns it added (a stage listed twice recomputes them)
    for step in phase.steps:
        stage = get_stage(spec, step.stage, extras)
        before = set(batch.column_names)
        try:
            if step.mode == "apply":
                batch = stage.apply(batch, states[step.stage])
            else:
                batch = stage.compute(batch) if _splits(stage) else stage.process(batch)
                mine = own.setdefault(step.name, set())
                computed[step.stage] = pa.schema([f for f in batch.schema if f.name not in before
                                                  or f.name in type(stage).rewrites or f.name in mine])
                mine.update(f.name for f in batch.schema if f.name not in before)
                if _splits(stage):
                    batch = stage.decide(batch)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"stage {step.name} (stages[{step.stage}]) fails on an empty batch, so its output "
                              f"columns are unknown: {type(e).__name__}: {e}") from e
        new = [[f.name, str(f.type)] for f in batch.schema if f.name not in before]
        if new:
            added.setdefault(step.stage, []).extend(new)
    if "image" in batch.column_names:
        batch = _trainable(batch)
    return batch.schema, added, computed


def _cached_step(stage: Stage, step, batch: pa.Table, cache, columns: pa.Schema, errors: list[str]) -> pa.Table:
    """Run a map step through the compute cache: rows found reuse their computed columns
    (and their compute drops), the other live rows are computed — only them — and kept for
    next time; then the stage decides on every row."""
    decide = stage.decide if _splits(stage) else (lambda b: b)
    compute = stage.compute if _splits(stage) else stage.process
    n = batch.num_rows
    live = live_mask(batch)
    uids = batch.column("uid").to_pylist()
    hit = cache.hits(uids) & live
    need = live & ~hit
    hit_idx, need_idx = np.flatnonzero(hit), np.flatnonzero(need)
    other_idx = np.flatnonzero(~hit & ~need)
    cache.reused += int(hit_idx.size)
    cache.computed += int(need_idx.size)
    pieces, reasons = [], [None] * n
    if need_idx.size:
        given = batch.take(pa.array(need_idx))
        sub = _run_guarded(compute, given, step.name, errors)
        _check_rewrites(stage, given, sub, columns)
        sub_reason = sub.column("drop_reason").to_pylist()
        for j, i in enumerate(need_idx):
            reasons[i] = sub_reason[j]
        own = [r is None or not r.startswith("error:") for r in sub_reason]  # compute's drops are results
        keep = sub.filter(pa.array(own))
        drops = [r for r, o in zip(sub_reason, own) if o]
        cache.add(_cache_rows(keep, columns, drops))
        pieces.append(_columns(sub, columns))
    if hit_idx.size:
        cached = cache.rows([uids[i] for i in hit_idx])
        for j, i in enumerate(hit_idx):
            reasons[i] = cached.column(DROP)[j].as_py()
        pieces.append(_columns(cached, columns))
    if other_idx.size:  # rows dropped before: their rewritten columns stay, the rest null
        rest = batch.take(pa.array(other_idx))
        pieces.append(pa.table([rest.column(f.name) if f.name in rest.column_names else pa.nulls(len(other_idx), f.type)
                                for f in columns], schema=columns))
    order = np.concatenate([need_idx, hit_idx, other_idx])
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    values = pa.concat_tables(pieces).take(pa.array(inverse)) if pieces else columns.empty_table()
    out = batch
    for f in columns:
        out = set_column(out, f.name, values.column(f.name))
    errs = [r if r and r.startswith("error:") else None for r in reasons]
    results = [r if r and not r.startswith("error:") else None for r in reasons]
    out = mark_dropped(out, errs, step.name)
    out = mark_dropped(out, results, stage.name)
    return _run_guarded(decide, out, step.name, errors)


def _check_rewrites(stage: Stage, given: pa.Table, sub: pa.Table, columns: pa.Schema) -> None:
    """A computation may change only the columns it declares (``rewrites``): anything else it
    changed would be lost when the cache serves the row. A stage that does is a bug to report,
    not a silent difference between a first run and a rerun."""
    live = pa.array(live_mask(sub))
    for name in given.column_names:  # the row's own columns (a stage listed twice recomputes its columns)
        if name not in INGEST_SCHEMA.names or name in ("drop_reason", "drop_stage", "image") \
                or name in columns.names or name not in sub.column_names:
            continue
        if not given.column(name).filter(live).equals(sub.column(name).filter(live)):
            raise ConfigError(f"stage {stage.name} changes column {name!r} in its computation without declaring it: "
                              f"add it to the stage's `rewrites` (so that the compute cache keeps it), or set "
                              f"`cacheable = False`")


def _columns(table: pa.Table, columns: pa.Schema) -> pa.Table:
    return pa.table([table.column(f.name).cast(f.type) if f.name in table.column_names
                     else pa.nulls(table.num_rows, f.type) for f in columns], schema=columns)


def _cache_rows(table: pa.Table, columns: pa.Schema, drops: list[str | None]) -> pa.Table:
    """The rows as the cache keeps them: uid, the computed columns, the compute's drop reason."""
    kept = _columns(table, columns)
    return kept.add_column(0, "uid", table.column("uid")).append_column(DROP, pa.array(drops, pa.string()))


def _needs_pixels(spec, phase: Phase) -> bool:
    """Whether a stage of the phase reads image bytes (its map part: ``apply`` reads stored
    columns)."""
    return any(get_stage_class(s.name).needs_pixels(spec.stages[s.stage].config)
               for s in phase.steps if s.mode == "process")


def _with_images(batches, shard: InputShard, spec, timings: Counter):
    """Work-shard batches with the live rows' image bytes fetched back (store or source)."""
    for batch in batches:
        t0 = time.perf_counter()
        images = fetch_images(batch, shard, spec.input, spec.output)
        timings["fetch_images"] += time.perf_counter() - t0
        yield set_column(batch, "image", images, pa.binary())


def _trainable(batch: pa.Table) -> pa.Table:
    """The final phase's last step, for every stage list: each live image open_clip's loader
    cannot read as is (GIF, BMP, TIFF, ...) becomes a PNG here (``transcoded``), and one that
    cannot be re-opened is dropped as ``decode_error`` by stage ``emit`` instead of failing
    the emit. JPEG/PNG/WebP bytes pass through untouched."""
    n = batch.num_rows
    transcoded = [False] * n
    if n and "image" in batch.column_names:
        images = batch.column("image").to_pylist()
        live = live_mask(batch)
        reasons: list[str | None] = [None] * n
        changed = False
        for i in range(n):
            if not live[i] or images[i] is None:
                continue
            try:
                data, _ = make_trainable(images[i])
            except ImageRejected as e:
                reasons[i] = e.reason
                continue
            if data is not images[i]:
                images[i], transcoded[i], changed = data, True, True
        if changed:  # new bytes exist nowhere else: no locator, so the image store keeps them
            batch = set_column(batch, "image", images, pa.binary())
            for col in LOCATOR_COLUMNS:
                if col in batch.column_names:
                    old = batch.column(col).to_pylist()
                    batch = set_column(batch, col, [None if t else v for v, t in zip(old, transcoded)], pa.int64())
        if any(reasons):
            batch = mark_dropped(batch, reasons, "emit")
    if "transcoded" in batch.column_names:  # checked in an earlier phase already
        transcoded = [a or b for a, b in zip(batch.column("transcoded").to_pylist(), transcoded)]
    return set_column(batch, "transcoded", transcoded, pa.bool_())


class _Aligner:
    """Casts every batch to one schema: the phase's schema probed on an empty batch."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        extra = [c for c in batch.column_names if self.schema.get_field_index(c) < 0]
        if extra:  # silently casting them away would lose a stage's output
            raise ConfigError(f"column(s) {', '.join(extra)} appear on real batches but not on the empty batch the "
                              f"worker probes the phase's schema with: the stage that adds them must add them to "
                              f"empty batches too")
        cols = []
        for f in self.schema:
            if f.name in batch.column_names:
                col = batch.column(f.name)
                cols.append(col if col.type == f.type else col.cast(f.type))
            else:
                cols.append(pa.nulls(batch.num_rows, f.type))
        return pa.table(cols, schema=self.schema)


def run_phase_shard(spec, phase: Phase, shard: InputShard, states: dict[int, Any], scan_state: Any = None,
                    extras: dict | None = None) -> dict:
    """Process one shard through one phase and commit it. Returns the shard's summary.

    ``states`` holds the merged state of each global stage this phase applies;
    ``scan_state`` what the previous pass merged, for a stage's second and later scans."""
    out = spec.output
    name = shard.name
    log.info("phase %s [%s]: shard %s (%s) started", phase.index, phase.label, name, shard.path)
    timings: Counter = Counter()
    errors: list[str] = []
    source_errors: list[str] = []
    live_seen: Counter = Counter()  # per step: live rows it was given
    failed: Counter = Counter()  # per step: rows it raised on

    def steps(batch: pa.Table) -> pa.Table:
        for k, step in enumerate(phase.steps):
            stage = get_stage(spec, step.stage, extras)
            log.debug("shard %s: stage %s (%s) on %d rows", name, step.name, step.mode, batch.num_rows)
            t0 = time.perf_counter()
            live_seen[k] += int(live_mask(batch).sum())
            before = len(errors)
            cache = caches.get(step.stage) if step.mode == "process" and type(stage).cacheable \
                and len(computed.get(step.stage, ())) else None
            if step.mode == "apply":
                state = states[step.stage]
                batch = _run_guarded(lambda b: stage.apply(b, state), batch, step.name, errors)
            elif cache is not None:
                batch = _cached_step(stage, step, batch, cache, computed[step.stage], errors)
            else:
                batch = _run_guarded(stage.process, batch, step.name, errors)
            failed[k] += len(errors) - before
            timings[step.name] += time.perf_counter() - t0
        if "image" in batch.column_names:  # bytes in memory: make them trainable once, here
            t0 = time.perf_counter()
            batch = _trainable(batch)
            timings["trainable"] += time.perf_counter() - t0
        return batch

    used = [s.stage for s in phase.steps] + ([phase.scan] if phase.scan is not None else [])
    for i in used:  # the shard a stage's combine / apply works for (spill files, per-shard decisions)
        get_stage(spec, i, extras).shard = shard
    rows_per_batch = phase_batch_rows([get_stage(spec, i, extras) for i in used])
    load = not phase.first and _needs_pixels(spec, phase)  # fetch the image bytes back for this phase
    if phase.first:
        in_schema = input_schema(shard, spec.input)  # INGEST_SCHEMA + input.keep_columns
        batches = read_shard(shard, spec.input, rows_per_batch, source_errors)
    else:
        src = work_path(out, phase.input_phase, name)
        fs, p = storage.fs_path(src)
        with fs.open(p, "rb") as f:
            in_schema = pq.read_schema(f)
        columns = None
        if not phase.steps and phase.scan is not None:  # a scan-only pass reads what its scan declares
            wanted = get_stage(spec, phase.scan, extras).scan_columns(phase.pass_name)
            if wanted is not None:
                columns = [c for c in dict.fromkeys([*ROW_COLUMNS, *wanted]) if c in in_schema.names]
                in_schema = pa.schema([in_schema.field(c) for c in columns])
        batches = _work_batches(src, rows_per_batch, columns)
        if load:
            if "image" not in in_schema.names:
                in_schema = in_schema.append(pa.field("image", pa.binary()))
            batches = _with_images(batches, shard, spec, timings)
    schema, added, computed = _probe_schema(spec, phase, in_schema, states, extras)
    caches = ShardCaches(cache_root(spec), compute_fingerprints(spec), [e.name for e in spec.stages], shard)
    align = _Aligner(schema)
    # Work shards carry columns only; rejected rows carry neither pixels nor where they were.
    work_schema = pa.schema([f for f in schema if f.name != "image"])
    store = ImageStoreWriter(out, name, phase.index) if "image" in schema.names else None

    scan_stage = get_stage(spec, phase.scan, extras) if phase.scan is not None else None
    partials = []
    rows_in = kept = live_in = 0
    reasons: Counter = Counter()
    keep_path = work_path(out, phase.index, name)
    rej_schema = pa.schema([f for f in schema if f.name not in ("image", "transcoded", *LOCATOR_COLUMNS)])

    with ExitStack() as stack:
        wkeep = wrej = None
        if phase.writes:
            wkeep = pq.ParquetWriter(stack.enter_context(storage.atomic_open(keep_path)), work_schema,
                                     compression=_codecs(work_schema))
        if phase.final:
            frej = stack.enter_context(storage.atomic_open(rejected_path(out, name)))
            wrej = pq.ParquetWriter(frej, rej_schema, compression="zstd")
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            timings["read"] += time.perf_counter() - t0
            rows_in += batch.num_rows
            live_in += int(live_mask(batch).sum())
            batch = align(steps(batch))
            if scan_stage is not None:
                t0 = time.perf_counter()
                partials.append(scan_stage.scan(batch, phase.pass_name, scan_state))
                timings["scan"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if store is not None:
                store.add_unlocated(batch)
            if wrej is not None:
                live = pa.array(live_mask(batch))
                kept_batch = batch.filter(live).select(work_schema.names)
                rej = batch.filter(pc.invert(live)).select(rej_schema.names)
                kept += kept_batch.num_rows
                for st, r in zip(rej.column("drop_stage").to_pylist(), rej.column("drop_reason").to_pylist()):
                    reasons[f"{st}\t{r}"] += 1
                wkeep.write_table(kept_batch)
                wrej.write_table(rej)
            else:
                kept += int(live_mask(batch).sum())
                if wkeep is not None:
                    wkeep.write_table(batch.select(work_schema.names))
            timings["write"] += time.perf_counter() - t0
        if wkeep is not None:
            wkeep.close()
        if wrej is not None:
            wrej.close()
        stored = store.close() if store is not None else 0
    reuse = caches.close()

    for step in phase.steps:  # the stages' own breakdown (decode / infer / ...)
        for part, secs in get_stage(spec, step.stage, extras).take_timings().items():
            timings[f"{step.name}.{part}"] += secs
    for k, step in enumerate(phase.steps):
        if failed[k] >= BROKEN_STAGE_MIN_ROWS and failed[k] >= live_seen[k]:
            raise JobError(f"stage {step.name} failed on every one of the {failed[k]} samples of shard {shard.path} "
                           f"(phase {phase.label}): {errors[0] if errors else ''}")
    partial = scan_stage.combine(partials, phase.pass_name) if scan_stage is not None else None
    summary = {
        "shard": name,
        "source": shard.path,
        "rows": rows_in,
        "kept": kept,
        "drops": dict(reasons),
        "errors": errors[:20],
        "error_count": len(errors),
        "source_errors": source_errors,
        "columns": {str(k): v for k, v in added.items()},
        "cache": reuse,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "io": {**_io_facts(shard.path if phase.first else work_path(out, phase.input_phase, name),
                           [keep_path] if phase.writes else [], [rejected_path(out, name)] if phase.final else []),
               "image_bytes_stored": stored},
    }
    Ledger(out).commit(phase.step_name, name, summary, partial)
    log.info("phase %s [%s]: shard %s committed: %d rows, %d kept", phase.index, phase.label, name, rows_in, kept)
    return summary
