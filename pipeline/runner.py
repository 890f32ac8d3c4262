"""The shard runner on Ray (DESIGN.md, "shard in, shard out").

``run_job(spec)``: validate and preflight everything, start or join Ray, then for each phase
send one task per uncommitted shard (Ray carries shard paths and small summaries, never
pixels), merge the global stages' partials at each barrier, emit the training shards and
publish ``manifest.json`` last. A rerun of the same spec on the same output skips every
committed task; a different spec on the same output is refused unless ``restart``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from tqdm.auto import tqdm

from pairsift.pipeline import layout, storage
from pairsift.pipeline.emit import CaptionPolicy, plan_emit, write_emit_shard
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.ledger import Ledger
from pairsift.pipeline.manifest import build_manifest, format_summary
from pairsift.pipeline.plan import Phase, plan_phases
from pairsift.pipeline.safety import JobLock, check_output, input_identity, owned_to_remove
from pairsift.pipeline.spec import JobSpec
from pairsift.pipeline.worker import run_phase_shard, work_path
from pairsift.stages import get_stage_class
from pairsift.stages.base import GlobalStage, StageContext
from pairsift.stages.ingest import InputShard, discover

log = logging.getLogger("pairsift")

TASK_RETRIES = 2


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
    else's files), and whether the output holds another job or the same job over other inputs."""
    stages = []
    for i, entry in enumerate(spec.stages):
        stage = get_stage_class(entry.name)(entry.config, StageContext(seed=spec.seed, output=spec.output, index=i))
        stage.preflight()
        stages.append(stage)
    check_output(spec)
    if spec.input.format != "urls":
        discover(spec.input)  # raises ConfigError for missing inputs or columns
    else:
        from pairsift.stages.download import check_url_lists

        check_url_lists(spec.input)
    job_file = layout.job_file(spec.output)
    if storage.exists(job_file) and not restart:
        old = storage.read_json(job_file)
        if old.get("fingerprint") != spec.fingerprint():
            raise ConfigError(
                f"output {spec.output} holds a different job ({old.get('name')!r}, spec "
                f"{old.get('fingerprint')}); this spec is {spec.fingerprint()}. Use another "
                f"--output, or --restart to discard the old output."
            )
        inputs = input_identity(spec.input)
        if old.get("inputs") is not None and old["inputs"] != inputs:
            was, now = old["inputs"], inputs
            raise ConfigError(
                f"the input {spec.input.path} changed since this output was started ({was.get('files')} files, "
                f"{was.get('bytes')} bytes then; {now['files']} files, {now['bytes']} bytes now): resuming would mix "
                f"shards of two input sets. Restore the input, or --restart to start over on the new one.")
    return stages


def _check_reachable(address: str) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection within a
    few seconds; ConfigError otherwise (Ray itself would retry for minutes)."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"ray.address: nothing accepts connections at {address} ({e.strerror or e}); start the "
                          f"cluster first (`ray start --head`), or leave ray.address empty for a local Ray") from None


def _init_ray(spec: JobSpec) -> tuple[Any, float]:
    """Join the configured cluster, or start a Ray of this job's own (``address="local"``:
    files a stale local Ray left behind are never joined). Fails with ConfigError, before
    anything is written, when the cluster cannot be reached."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        address = spec.ray.address or os.environ.get("RAY_ADDRESS")
        level = logging.getLevelName(logging.getLogger("pairsift").getEffectiveLevel())
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                                      runtime_env={"env_vars": {"PAIRSIFT_LOG_LEVEL": str(level)}})
        if address and address != "local":
            _check_reachable(address)
            kwargs["address"] = address
        else:
            kwargs.update(address="local", num_cpus=spec.ray.num_cpus or os.cpu_count())
        # In the main thread: Ray ties its local processes to the thread that starts them.
        try:
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001
            if kwargs.get("address") != "local":
                raise ConfigError(f"ray.address: cannot join the Ray cluster at {kwargs['address']}: "
                                  f"{type(e).__name__}: {e}") from None
            raise
        if kwargs.get("address") == "local":  # a killed driver must not leave Ray's agents running
            from pairsift.pipeline import reaper

            reaper.spawn(os.getpid())
    return ray, time.perf_counter() - t0


def _check_resources(stages: list, cluster: dict) -> None:
    """Every stage's resource request, checked against the cluster before any work: a stage
    that asks for more than the cluster has would make Ray wait forever."""
    for i, stage in enumerate(stages):
        ask = stage.resources()  # a stage raises ConfigError for what it cannot run with
        for key, have in (("num_cpus", cluster.get("CPU", 0.0)), ("num_gpus", cluster.get("GPU", 0.0))):
            want = float(ask.get(key, 0.0) or 0.0)
            if want > have + 1e-9:
                raise ConfigError(f"stages[{i}].{stage.name}: each worker asks for {want:g} "
                                  f"{key[4:].upper()}(s) and the Ray cluster has {have:g}")


def _concurrency(ray, spec: JobSpec) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if spec.ray.num_cpus:
        cpus = min(cpus, spec.ray.num_cpus)
    return max(1, cpus)


def _run_tasks(ray, remote_fn, items: list, make_args: Callable, limit: int, desc: str,
               count_rows: Callable[[dict], int]) -> list[dict]:
    """Run ``remote_fn(*make_args(item))`` for every item, at most ``limit`` at a time,
    with a progress bar of items done and rows/s. Returns the results in item order."""
    results: list[dict | None] = [None] * len(items)
    pending: dict = {}
    todo = list(enumerate(items))
    bar = tqdm(total=len(items), desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True,
               disable=os.environ.get("PAIRSIFT_PROGRESS", "1") == "0")
    t0, rows = time.perf_counter(), 0
    try:
        while todo or pending:
            while todo and len(pending) < limit:
                i, item = todo.pop(0)
                pending[remote_fn.remote(*make_args(item))] = (i, item)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, item = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # after Ray's retries
                    cause = getattr(e, "cause", None) or e
                    if isinstance(cause, ConfigError):  # e.g. a stage that cannot run at all
                        raise ConfigError(str(cause)) from e
                    path = getattr(item, "path", None) or getattr(item, "name", item)
                    raise JobError(f"{desc}: shard {path} failed after {TASK_RETRIES} retries: "
                                   f"{type(cause).__name__}: {cause}") from e
                rows += count_rows(results[i])
                bar.update(1)
                bar.set_postfix_str(f"{rows / max(time.perf_counter() - t0, 1e-9):,.0f} samples/s")
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return results  # type: ignore[return-value]


def run_job(spec: JobSpec, restart: bool = False) -> JobResult:
    """Run a job: preflight, join Ray and check every stage's resources (nothing written
    until all of that passed), take the output's lock, then run the phases and emit."""
    t_start = time.perf_counter()
    stages = preflight(spec, restart)
    ray, ray_init_s = _init_ray(spec)
    limit = _concurrency(ray, spec)
    cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    cluster["CPU"] = float(limit)  # what this job may use
    for stage in stages:  # stages size their workers from what the cluster has
        stage.context = replace(stage.context, extras={**stage.context.extras, "cluster": cluster})
    _check_resources(stages, cluster)
    with JobLock(spec.output):
        if restart:  # only what a pairsift job recorded writing here
            for path in owned_to_remove(spec.output):
                storage.remove_tree(path)
        artifacts = sorted({a for st in stages for a in type(st).artifacts})
        storage.write_json(layout.job_file(spec.output),
                           {"name": spec.name, "fingerprint": spec.fingerprint(), "spec": spec.dump(),
                            "inputs": input_identity(spec.input), "artifacts": artifacts})
        storage.write_json(layout.driver_file(spec.output),
                           {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        result = _execute(spec, stages, ray, limit, cluster)
    result.ray_init_s = ray_init_s
    result.manifest["timings"]["ray_init_s"] = round(ray_init_s, 3)
    result.run_s = time.perf_counter() - t_start
    return result


def _execute(spec: JobSpec, stages: list, ray, limit: int, cluster: dict) -> JobResult:
    """The phases, the barriers between them and the emit, for a job that holds its lock."""
    ledger = Ledger(spec.output)

    if spec.input.format == "urls":
        from pairsift.stages.download import prepare_downloads

        shards: list[InputShard] = prepare_downloads(spec, processes=limit)
    else:
        shards = discover(spec.input)

    phases = plan_phases(spec.stages)
    plan = {"shards": len(shards), "phases": [{"step": p.step_name, "label": p.label} for p in phases],
            "emit_tasks": None}
    storage.write_json(layout.plan_file(spec.output), plan)
    phase_task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)(_phase_and_commit)
    emit_task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)(_emit_and_commit)
    state_refs: dict[int, Any] = {}  # merged state of each global stage, for its apply
    scan_states: dict[int, Any] = {}  # state of a stage's previous scan pass
    # Each stage's own facts (models, prompts, thresholds); a global stage's finalize adds more.
    stage_facts: dict[str, dict] = {f"{i}:{st.name}": facts for i, st in enumerate(stages) if (facts := st.summary())}
    summaries: dict[int, list[dict]] = {}
    phase_times: list[dict] = []

    for phase in phases:
        todo = [s for s in shards if not ledger.committed(phase.step_name, s.name)]
        desc = f"phase {phase.index + 1}/{len(phases)} [{phase.label}]"
        if len(todo) < len(shards):
            log.info("%s: %d of %d shards already committed", desc, len(shards) - len(todo), len(shards))
        t0 = time.perf_counter()
        resources = _phase_resources(stages, phase)
        fn = phase_task.options(**resources)
        extras = {"resources": resources, "cluster": cluster}
        applied = tuple(s.stage for s in phase.steps if s.mode == "apply")
        # Top-level arguments, so that Ray resolves the object refs.
        refs = (ray.put(scan_states.get(phase.scan)),) + tuple(state_refs[i] for i in applied)
        _run_tasks(ray, fn, todo, lambda sh: (spec, phase, sh, applied, extras, *refs), limit, desc,
                   count_rows=lambda r: r["rows"])
        summaries[phase.index] = [ledger.summary(phase.step_name, s.name) for s in shards]
        phase_times.append(_phase_timing(phase, summaries[phase.index], time.perf_counter() - t0, len(todo)))
        if phase.scan is not None:
            stage = stages[phase.scan]
            assert isinstance(stage, GlobalStage)
            partials = [ledger.partial(phase.step_name, s.name) for s in shards]
            state = stage.merge_pass(partials, phase.scan_pass, scan_states.get(phase.scan))
            if phase.scan_pass + 1 < type(stage).passes(stage.config):
                scan_states[phase.scan] = state
            else:
                key = f"{phase.scan}:{stage.name}"
                stage_facts[key] = {**stage_facts.get(key, {}), **(stage.finalize(state, spec.output) or {})}
                state_refs[phase.scan] = ray.put(state)
        if not spec.emit.keep_work:  # work shards no later phase reads
            needed = {p.input_phase for p in phases[phase.index + 1 :]} | {phases[-1].index}
            for p in phases[: phase.index + 1]:
                if p.writes and p.index not in needed:
                    storage.remove_tree(layout.phase_dir(spec.output, p.index))

    final = phases[-1]
    kept = [(work_path(spec.output, final.index, s.name), summ["kept"]) for s, summ in zip(shards, summaries[final.index])]
    tasks = plan_emit(kept, spec.emit.shard_size)
    storage.write_json(layout.plan_file(spec.output), {**plan, "emit_tasks": len(tasks)})
    todo = [t for t in tasks if not ledger.committed("emit", t.name)]
    t0 = time.perf_counter()
    captions_from = CaptionPolicy(spec.emit.caption_policy, spec.emit.p_original, spec.seed)
    _run_tasks(ray, emit_task, todo, lambda t: (spec.output, t, captions_from), limit, "emit",
               count_rows=lambda r: r["samples"])
    emitted = [ledger.summary("emit", t.name) for t in tasks]
    phase_times.append({"phase": "emit", "seconds": round(time.perf_counter() - t0, 3), "shards": len(tasks),
                        "shards_run": len(todo), "samples": sum(e["samples"] for e in emitted)})

    # Read errors are found where the sources are read: the first phase.
    source_errors = [s.get("source_errors", []) for s in summaries[phases[0].index]]
    manifest = build_manifest(spec, shards, summaries[final.index], emitted, stage_facts, phase_times,
                              source_errors=source_errors)
    storage.write_json(layout.manifest_file(spec.output), manifest)
    _write_report(spec.output)
    if not spec.emit.keep_work:
        storage.remove_tree(layout.phase_dir(spec.output, final.index))
    return JobResult(spec.output, manifest, phase_summaries=summaries)


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


def _emit_and_commit(output: str, task, captions_from: CaptionPolicy | None = None) -> dict:
    result = write_emit_shard(output, task, captions_from)
    Ledger(output).commit("emit", task.name, result)
    return result


def _phase_resources(stages: list, phase: Phase) -> dict:
    """Ray resources of one phase task: the most its map parts and scan ask for. A global
    stage's ``apply`` is a cheap decision on stored scores, so it asks for nothing extra (a
    top-fraction cut must not hold a GPU per task)."""
    idx = [s.stage for s in phase.steps if s.mode == "process"] + ([phase.scan] if phase.scan is not None else [])
    asks = [stages[i].resources() for i in idx]
    return {
        "num_cpus": max([a.get("num_cpus", 1.0) for a in asks] + [1.0]),
        "num_gpus": max([a.get("num_gpus", 0.0) for a in asks] + [0.0]),
    }


def _phase_timing(phase: Phase, summaries: list[dict], wall: float, ran: int) -> dict:
    t: Counter = Counter()
    for s in summaries:
        t.update(s.get("timings", {}))
    rows = sum(s["rows"] for s in summaries)
    return {"phase": phase.label, "seconds": round(wall, 3), "shards": len(summaries), "shards_run": ran,
            "samples": rows, "worker_seconds": {k: round(v, 3) for k, v in sorted(t.items())}}


__all__ = ["run_job", "preflight", "JobResult", "format_summary"]
