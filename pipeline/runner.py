"""The shard runner (see ARCHITECTURE.md, "Shard in, shard out").

``run_job(spec)``: preflight everything (nothing written until it passes), start the
executor (Ray, or in-process) and check every stage's resources against it, take the output's
lock, then for each phase run one task per uncommitted shard (tasks carry shard paths and
small summaries, never pixels), merge the global stages' partials at each barrier
(:func:`barrier`), emit the training shards and publish ``manifest.json`` last. A rerun of the
same spec on the same output skips every committed task; a different spec, or the same spec
over a changed input set, is refused unless ``restart``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from pairsift.pipeline import layout, storage
from pairsift.pipeline.emit import CaptionPolicy, plan_emit, write_emit_shard
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.executor import Executor, LocalExecutor, RayExecutor
from pairsift.pipeline.imagestore import remove_stores
from pairsift.pipeline.ledger import Ledger
from pairsift.pipeline.manifest import build_manifest, format_summary
from pairsift.pipeline.plan import Phase, plan_phases
from pairsift.pipeline.safety import JobLock, check_output, input_identity, owned_to_remove
from pairsift.pipeline.spec import JobSpec
from pairsift.pipeline.urlout import URLS, write_url_shard
from pairsift.pipeline.worker import run_phase_shard
from pairsift.stages import get_stage_class
from pairsift.stages.base import GlobalStage, StageContext, as_resources
from pairsift.pipeline.ingest import InputShard, discover

log = logging.getLogger("pairsift")

EXECUTORS = {"ray": RayExecutor, "local": LocalExecutor}


@dataclass
class JobResult:
    output: str
    manifest: dict
    ray_init_s: float = 0.0
    run_s: float = 0.0
    phase_summaries: dict = field(default_factory=dict)


def preflight(spec: JobSpec, restart: bool = False) -> list:
    """Everything that can fail on configuration, before anything is written: each stage's
    own checks, the inputs, the output folder (never where the job reads, never someone
    else's files), and whether the output holds another job or the same job over other inputs.

    The output may hold an earlier run of the same job (same ``name``) with another spec (a new
    threshold, a new model): that is a rerun — :func:`run_job` starts it over, and the compute
    cache keeps every column whose computation did not change. Another job's output is refused
    unless ``restart``."""
    stages = []
    for i, entry in enumerate(spec.stages):
        stage = get_stage_class(entry.name)(entry.config, StageContext(seed=spec.seed, output=spec.output, index=i))
        stage.preflight()
        stages.append(stage)
    check_output(spec)
    if spec.input.format != "urls":
        discover(spec.input)  # raises ConfigError for missing inputs or columns
    else:
        from pairsift.pipeline.urllists import check_url_lists

        check_url_lists(spec.input)
    job_file = layout.job_file(spec.output)
    if storage.exists(job_file) and not restart:
        old = storage.read_json(job_file)
        if old.get("fingerprint") != spec.fingerprint() and old.get("name") != spec.name:
            raise ConfigError(
                f"output {spec.output} holds a different job ({old.get('name')!r}, spec "
                f"{old.get('fingerprint')}); this spec is {spec.fingerprint()}. Use another "
                f"--output, or --restart to discard the old output."
            )
        if old.get("fingerprint") != spec.fingerprint():
            return stages  # the same job with another spec: a rerun
        inputs = input_identity(spec.input)
        if old.get("inputs") is not None and old["inputs"] != inputs:
            was, now = old["inputs"], inputs
            raise ConfigError(
                f"the input {spec.input.path} changed since this output was started ({was.get('files')} files, "
                f"{was.get('bytes')} bytes then; {now['files']} files, {now['bytes']} bytes now): resuming would mix "
                f"shards of two input sets. Restore the input, or --restart to start over on the new one.")
    return stages


def check_resources(stages: list, cluster: dict) -> None:
    """Every stage's resource request, checked against the cluster before any work: a stage
    that asks for more than the cluster has would make Ray wait forever."""
    for i, stage in enumerate(stages):
        ask = as_resources(stage.resources())  # a stage raises ConfigError for what it cannot run with
        for what, want, have in (("CPU", ask.cpus, cluster.get("CPU", 0.0)), ("GPU", ask.gpus, cluster.get("GPU", 0.0))):
            if want > have + 1e-9:
                raise ConfigError(f"stages[{i}].{stage.name}: each worker asks for {want:g} "
                                  f"{what}(s) and the cluster has {have:g}")


def run_job(spec: JobSpec, restart: bool = False, executor: Executor | str | None = None) -> JobResult:
    """Run a job: preflight, start the executor (``"ray"``, the default, or ``"local"``: every
    task in this process) and check every stage's resources (nothing written until all of
    that passed), take the output's lock, then run the phases and emit."""
    t_start = time.perf_counter()
    stages = preflight(spec, restart)
    JobLock(spec.output).check_free()  # before starting Ray: a second run is refused at once
    if executor is None or isinstance(executor, str):
        executor = EXECUTORS[executor or "ray"]()
    executor.start(spec)
    cluster = executor.cluster()
    for stage in stages:  # stages size their workers from what the cluster has
        stage.context = replace(stage.context, extras={**stage.context.extras, "cluster": cluster})
    check_resources(stages, cluster)
    with JobLock(spec.output):
        if not restart and storage.exists(layout.job_file(spec.output)):
            old = storage.read_json(layout.job_file(spec.output))
            if old.get("fingerprint") != spec.fingerprint():  # the same job, another spec: start over
                log.warning("output %s holds an earlier run of %r with another spec: starting over (computed "
                            "columns are reused from the cache where their computation is unchanged)",
                            spec.output, spec.name)
                restart = True
        if restart:  # only what a pairsift job recorded writing here (the compute cache stays)
            for path in owned_to_remove(spec.output):
                storage.remove_tree(path)
        artifacts = sorted({a for st in stages for a in type(st).artifacts}
                           | (set() if spec.emit.images else {URLS}))  # a caption-only job's URL lists
        storage.write_json(layout.job_file(spec.output),
                           {"name": spec.name, "fingerprint": spec.fingerprint(), "spec": spec.dump(),
                            "inputs": input_identity(spec.input), "artifacts": artifacts})
        storage.write_json(layout.driver_file(spec.output),
                           {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        result = _execute(spec, stages, executor, cluster)
    result.ray_init_s = executor.ray_init_s
    result.run_s = time.perf_counter() - t_start
    return result


def _input_shards(spec: JobSpec, executor: Executor) -> list[InputShard]:
    if spec.input.format == "urls":  # the lists' rows; a stage fetches the images in the workers
        from pairsift.pipeline.urllists import list_url_shards

        return list_url_shards(spec)
    return discover(spec.input)


def merge_pass(stage: GlobalStage, pass_name: str, partials, state: Any, run_reduce) -> Any:
    """The driver's side of one pass: ``merge`` the shards' partials, run the pass's reduce
    tasks (``run_reduce(tasks, state) -> results``) and fold their results in."""
    state = stage.merge(partials, pass_name, state)
    tasks = stage.reduce_tasks(pass_name, state)
    if tasks:
        state = stage.reduced(pass_name, state, run_reduce(tasks, state))
    return state


def run_global_stage(stage: GlobalStage, shards: list[list[Any]], output: str | None = None) -> tuple[Any, Any, dict]:
    """Drive one global stage over in-memory shards (lists of Arrow batches) the way a job
    does — every pass's scan and combine per shard, the merge and reduce tasks, ``finalize``,
    then ``apply`` — in this process, with partials and states pickled as they are between
    processes. For tests, notebooks and stepping through a stage under a debugger. Returns
    (the applied state, the applied batches concatenated, finalize's facts)."""
    import pickle

    import pyarrow as pa

    def roundtrip(x: Any) -> Any:
        return pickle.loads(pickle.dumps(x))

    storage.remove_tree(stage.work_dir)  # a fresh start: no spill file of an earlier drive
    state = None
    for name in type(stage).passes(stage.config):
        partials = []
        for k, batches in enumerate(shards):
            stage.shard = _MemoryShard(f"{k:06d}")
            partials.append(roundtrip(stage.combine([stage.scan(b, name, state) for b in batches], name)))
        state = merge_pass(stage, name, partials, state,
                           lambda tasks, st: [roundtrip(stage.reduce(name, t, st)) for t in tasks])
    facts = stage.finalize(state, output or stage.context.output)
    state = roundtrip(state)
    out = []
    for k, batches in enumerate(shards):
        stage.shard = _MemoryShard(f"{k:06d}")
        out.extend(stage.apply(b, state) for b in batches)
    return state, pa.concat_tables(out, promote_options="permissive"), facts


@dataclass(frozen=True)
class _MemoryShard:
    name: str
    path: str = "<memory>"


class _Partials:
    """The shards' partials of a pass, read from the ledger one at a time as a merge iterates
    (a merge that folds them as it goes never holds them all)."""

    def __init__(self, ledger: Ledger, step: str, names: list[str]):
        self.ledger, self.step, self.names = ledger, step, names

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        for name in self.names:
            yield self.ledger.partial(self.step, name)


class Barriers:
    """The driver's side of the global stages: after each phase that ends in a stage's scan,
    merge the shards' partials; after a stage's last pass, finalize it (artifacts, facts) and
    keep its state for the phase that applies it."""

    def __init__(self, spec: JobSpec, stages: list, executor: Executor):
        self.spec, self.stages, self.executor = spec, stages, executor
        self.applied: dict[int, Any] = {}  # stage index -> handle of its merged state
        self.scans: dict[int, Any] = {}  # stage index -> state of its previous pass
        # Each stage's own facts (models, prompts, thresholds); a global stage's finalize adds more.
        self.facts: dict[str, dict] = {f"{i}:{st.name}": f for i, st in enumerate(stages) if (f := st.summary())}

    def task_states(self, phase: Phase) -> tuple[tuple[int, ...], tuple]:
        """(indices of the stages the phase applies, handles: previous scan state, then one
        state per applied stage)."""
        applied = tuple(s.stage for s in phase.steps if s.mode == "apply")
        handles = (self.executor.put(self.scans.get(phase.scan)),) + tuple(self.applied[i] for i in applied)
        return applied, handles

    def after(self, phase: Phase, partials: list[Any], cluster: dict) -> None:
        """The barrier after ``phase``: merge, run the pass's reduce tasks, and after the
        stage's last pass finalize it and keep its state for its apply."""
        if phase.scan is None:
            return
        stage = self.stages[phase.scan]
        assert isinstance(stage, GlobalStage)
        name = phase.pass_name

        def run_reduce(tasks: list, state: Any) -> list:
            """In parallel; each committed to the ledger, so a resumed job skips it."""
            ledger = Ledger(self.spec.output)
            step = f"{phase.step_name}-reduce"
            named = [_ReduceTask(f"{i:06d}", t) for i, t in enumerate(tasks)]
            todo = [t for t in named if not ledger.committed(step, t.name)]
            handle = self.executor.put(state)
            self.executor.map(
                _reduce_and_commit, todo,
                lambda t: (self.spec, phase.scan, name, step, t, {"cluster": cluster}, handle),
                {"num_cpus": 1.0}, f"{stage.name} [{name}]: reduce", count_rows=lambda r: 0)
            return [ledger.partial(step, t.name) for t in named]

        state = merge_pass(stage, name, partials, self.scans.get(phase.scan), run_reduce)
        if not phase.last_pass:
            self.scans[phase.scan] = state
            return
        key = f"{phase.scan}:{stage.name}"
        self.facts[key] = {**self.facts.get(key, {}), **(stage.finalize(state, self.spec.output) or {})}
        self.applied[phase.scan] = self.executor.put(state)


@dataclass(frozen=True)
class _ReduceTask:
    name: str
    task: Any


def _reduce_and_commit(spec, index: int, pass_name: str, step: str, item: _ReduceTask, extras: dict, state) -> dict:
    """One reduce task of a global stage's pass, in a worker; its result goes to the ledger."""
    from pairsift.pipeline.worker import get_stage

    result = get_stage(spec, index, extras).reduce(pass_name, item.task, state)
    Ledger(spec.output).commit(step, item.name, {"task": item.name}, result)
    return {"task": item.name}


def _execute(spec: JobSpec, stages: list, executor: Executor, cluster: dict) -> JobResult:
    """The phases, the barriers between them and the emit, for a job that holds its lock."""
    ledger = Ledger(spec.output)
    shards = _input_shards(spec, executor)
    phases = plan_phases(spec.stages)
    plan = {"shards": len(shards), "phases": [{"step": p.step_name, "label": p.label} for p in phases],
            "emit_tasks": None}
    storage.write_json(layout.plan_file(spec.output), plan)
    barriers = Barriers(spec, stages, executor)
    summaries: dict[int, list[dict]] = {}
    phase_times: list[dict] = []

    for phase in phases:
        todo = [s for s in shards if not ledger.committed(phase.step_name, s.name)]
        desc = f"phase {phase.index + 1}/{len(phases)} [{phase.label}]"
        if len(todo) < len(shards):
            log.info("%s: %d of %d shards already committed", desc, len(shards) - len(todo), len(shards))
        t0 = time.perf_counter()
        resources = _phase_resources(stages, phase)
        extras = {"resources": resources, "cluster": cluster}
        applied, handles = barriers.task_states(phase)
        ran = executor.map(_phase_and_commit, todo, lambda sh: (spec, phase, sh, applied, extras, *handles),
                           resources, desc, count_rows=lambda r: r["rows"])
        summaries[phase.index] = [ledger.summary(phase.step_name, s.name) for s in shards]
        phase_times.append({**_phase_timing(phase, summaries[phase.index], time.perf_counter() - t0, len(todo)),
                            **_nodes(ran)})
        if phase.scan is not None:  # the barrier: merge on the driver, reduce tasks on the executor
            t0 = time.perf_counter()
            barriers.after(phase, _Partials(ledger, phase.step_name, [s.name for s in shards]), cluster)
            phase_times[-1]["barrier_seconds"] = round(time.perf_counter() - t0, 3)
            phase_times[-1]["driver_rss_peak_mb"] = _driver_rss_mb()
        if not spec.emit.keep_work:  # work shards no later phase reads
            needed = {p.input_phase for p in phases[phase.index + 1 :]} | {phases[-1].index}
            for p in phases[: phase.index + 1]:
                if p.writes and p.index not in needed:
                    storage.remove_tree(layout.phase_dir(spec.output, p.index))

    final = phases[-1]
    kept = [(layout.work_path(spec.output, final.index, s.name), summ["kept"], s)
            for s, summ in zip(shards, summaries[final.index])]
    tasks = plan_emit(kept, spec.emit.shard_size)
    storage.write_json(layout.plan_file(spec.output), {**plan, "emit_tasks": len(tasks)})
    todo = [t for t in tasks if not ledger.committed("emit", t.name)]
    t0 = time.perf_counter()
    captions_from = CaptionPolicy(spec.emit.caption_policy, spec.emit.p_original, spec.seed,
                                  column=spec.caption_column() or "recaption")
    ran = executor.map(_emit_and_commit, todo, lambda t: (spec.output, t, captions_from, spec.input,
                                                          spec.emit.images),
                       {"num_cpus": 1.0}, "emit", count_rows=lambda r: r["samples"])
    emitted = [ledger.summary("emit", t.name) for t in tasks]
    phase_times.append({"phase": "emit", "seconds": round(time.perf_counter() - t0, 3), "shards": len(tasks),
                        "shards_run": len(todo), "samples": sum(e["samples"] for e in emitted),
                        "bytes_written": sum(e.get("bytes", 0) for e in emitted), "driver_rss_peak_mb": _driver_rss_mb()})
    phase_times[-1].update(_nodes(ran))

    # Read errors are found where the sources are read: the first phase.
    source_errors = [s.get("source_errors", []) for s in summaries[phases[0].index]]
    columns = _stage_columns(stages, phases, summaries)
    manifest = build_manifest(spec, shards, summaries[final.index], emitted, barriers.facts, phase_times,
                              ray_init_s=executor.ray_init_s, source_errors=source_errors, columns=columns)
    storage.write_json(layout.manifest_file(spec.output), manifest)  # last: the job is complete
    _write_report(spec.output)
    if not spec.emit.keep_work:
        storage.remove_tree(layout.phase_dir(spec.output, final.index))
        for stage in stages:  # spill files and decisions of the global stages
            if isinstance(stage, GlobalStage):
                storage.remove_tree(stage.work_dir)
        remove_stores(spec.output)
    return JobResult(spec.output, manifest, phase_summaries=summaries)


def _stage_columns(stages: list, phases: list[Phase], summaries: dict[int, list[dict]]) -> list[dict]:
    """The columns each stage added (from the workers' schema probes), and which are scores:
    those the stage declares in ``scores``, or by default every numeric column it adds."""
    added: dict[int, dict[str, str]] = {}
    for phase in phases:
        for summ in summaries.get(phase.index, [])[:1]:
            for idx, cols in (summ.get("columns") or {}).items():
                added.setdefault(int(idx), {}).update({c: t for c, t in cols})
    out = []
    for idx in sorted(added):
        stage = stages[idx]
        declared = type(stage).scores
        for name, type_ in added[idx].items():
            numeric = type_.startswith(("int", "uint", "float", "double", "halffloat"))
            out.append({"name": name, "stage": stage.name, "type": type_,
                        "score": (name in declared) if declared is not None else numeric})
    return out


def _phase_and_commit(spec, phase, shard, applied: tuple, extras: dict, scan_state, *states) -> dict:
    return run_phase_shard(spec, phase, shard, dict(zip(applied, states)), scan_state, extras)


def _write_report(output: str) -> None:
    if "://" in output:
        return  # the report reads local files; `pairsift report` can build it from a local copy
    from pairsift.pipeline.report import build_report

    try:
        build_report(output)
    except Exception as e:  # a report problem must not fail a finished job
        log.warning("report.html not written: %s: %s", type(e).__name__, e)


def _emit_and_commit(output: str, task, captions_from: CaptionPolicy | None = None, input_spec=None,
                     images: bool = True) -> dict:
    """One training shard, or with ``emit.images: false`` one URL list (a caption-only job)."""
    if not images:
        result = write_url_shard(output, task)
    else:
        result = write_emit_shard(output, task, captions_from, input_spec)
    Ledger(output).commit("emit", task.name, result)
    return result


def _phase_resources(stages: list, phase: Phase) -> dict:
    """Ray resources of one phase task: the most its map parts ask for. A global stage's scan
    and ``apply`` read stored columns, so they ask for nothing extra (a top-fraction cut must
    not hold a GPU per task)."""
    idx = [s.stage for s in phase.steps if s.mode == "process"]
    asks = [as_resources(stages[i].resources()) for i in idx]
    return {
        "num_cpus": max([a.cpus for a in asks] + [1.0]),
        "num_gpus": max([a.gpus for a in asks] + [0.0]),
    }


def _phase_timing(phase: Phase, summaries: list[dict], wall: float, ran: int) -> dict:
    t: Counter = Counter()
    io = {"bytes_read": 0, "bytes_written": 0, "worker_rss_peak_mb": 0.0}
    cache: dict[str, dict[str, int]] = {}
    for s in summaries:
        t.update(s.get("timings", {}))
        for stage, n in (s.get("cache") or {}).items():
            d = cache.setdefault(stage, {"reused": 0, "computed": 0})
            d["reused"] += n["reused"]
            d["computed"] += n["computed"]
        facts = s.get("io") or {}
        io["bytes_read"] += facts.get("bytes_read", 0)
        io["bytes_written"] += facts.get("bytes_written", 0)
        io["worker_rss_peak_mb"] = max(io["worker_rss_peak_mb"], facts.get("rss_peak_mb", 0.0))
    rows = sum(s["rows"] for s in summaries)
    return {"phase": phase.label, "seconds": round(wall, 3), "shards": len(summaries), "shards_run": ran,
            "samples": rows, "worker_seconds": {k: round(v, 3) for k, v in sorted(t.items())}, **io, "cache": cache,
            "driver_rss_peak_mb": _driver_rss_mb()}


def _nodes(results: list) -> dict:
    """``{"nodes": {node id: tasks}}`` for the tasks of a phase that ran now, where the executor
    says which node ran each (on a Ray cluster every node should show up in every phase)."""
    nodes = Counter(r["node"] for r in results if isinstance(r, dict) and r.get("node"))
    return {"nodes": dict(sorted(nodes.items()))} if nodes else {}


def _driver_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


__all__ = ["run_job", "preflight", "JobResult", "format_summary"]
