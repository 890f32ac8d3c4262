"""Where a job's tasks run (see ARCHITECTURE.md, "Executors").

The runner hands an executor plain functions and the items to run them on (one input shard,
or one emit task, per call); the executor says what the cluster has, runs the calls, and
returns their summaries in item order.

* :class:`RayExecutor` — the production one: joins the configured cluster or starts a Ray of
  the job's own, runs each call as a Ray task with the resources the phase asks for, at most
  as many at once as the job may use, each on the alive node with the most room for it,
  retrying a failed task ``TASK_RETRIES`` times; each result says which node ran it (the
  manifest's phase timings count tasks per node).
* :class:`LocalExecutor` — runs every call in this process, one after another, with no
  retries: for tests, and for stepping through a stage under a debugger
  (``pairsift run --executor local``).

Both show one progress bar per phase (shards done, samples/s).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import Counter
from typing import Any, Callable

from tqdm.auto import tqdm

from pairsift.pipeline.errors import ConfigError, JobError

log = logging.getLogger("pairsift")

TASK_RETRIES = 2


class _Progress:
    """A progress bar of shards done and samples/s (off with PAIRSIFT_PROGRESS=0)."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True,
                        disable=os.environ.get("PAIRSIFT_PROGRESS", "1") == "0")
        self.t0, self.rows = time.perf_counter(), 0

    def done(self, rows: int) -> None:
        self.rows += rows
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.rows / max(time.perf_counter() - self.t0, 1e-9):,.0f} samples/s")

    def close(self) -> None:
        self.bar.close()


def _failure(desc: str, item: Any, cause: BaseException, retries: int) -> Exception:
    """The error a failed call ends the job with: a ConfigError stays one (a stage that cannot
    run at all), anything else is a JobError naming the shard."""
    if isinstance(cause, ConfigError):
        return ConfigError(str(cause))
    path = getattr(item, "path", None) or getattr(item, "name", item)
    after = f" after {retries} retries" if retries else ""
    return JobError(f"{desc}: shard {path} failed{after}: {type(cause).__name__}: {cause}")


class Executor:
    """Runs a job's calls. ``start`` may raise ConfigError (and must write nothing)."""

    ray_init_s: float = 0.0

    def start(self, spec) -> None:
        raise NotImplementedError

    def cluster(self) -> dict[str, float]:
        """What this job may use: ``{"CPU": n, "GPU": m}``."""
        raise NotImplementedError

    def put(self, obj: Any) -> Any:
        """A handle for a large argument shared by many calls (passed as a top-level argument)."""
        return obj

    def map(self, fn: Callable, items: list, make_args: Callable, resources: dict[str, float], desc: str,
            count_rows: Callable[[dict], int]) -> list[dict]:
        """``fn(*make_args(item))`` for every item; results in item order."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Every call in this process, in order, no retries."""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def start(self, spec) -> None:
        self.num_cpus = self.num_cpus or spec.ray.num_cpus or os.cpu_count() or 1
        if self.num_gpus is None:
            self.num_gpus = spec.ray.num_gpus if spec.ray.num_gpus is not None else _local_gpus()

    def cluster(self) -> dict[str, float]:
        return {"CPU": float(self.num_cpus or 1), "GPU": float(self.num_gpus or 0)}

    def map(self, fn, items, make_args, resources, desc, count_rows):
        results = []
        bar = _Progress(len(items), desc)
        try:
            for item in items:
                try:
                    results.append(fn(*make_args(item)))
                except Exception as e:  # noqa: BLE001 - reported the way Ray's failures are
                    raise _failure(desc, item, e, 0) from e
                bar.done(count_rows(results[-1]))
        finally:
            bar.close()
        return results


def _local_gpus() -> int:
    if "torch" not in sys.modules:
        return 0
    try:
        return int(sys.modules["torch"].cuda.device_count())
    except Exception:
        return 0


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


class RayExecutor(Executor):
    """Ray tasks: one per call, with the phase's resources, at most ``cluster()["CPU"]`` at once."""

    def __init__(self):
        self.ray = None
        self.limit = 1
        self._remote: dict[Callable, Any] = {}

    def start(self, spec) -> None:
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
                if spec.ray.num_gpus is not None:
                    kwargs["num_gpus"] = spec.ray.num_gpus
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
        self.ray = ray
        self.ray_init_s = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if spec.ray.num_cpus:
            cpus = min(cpus, spec.ray.num_cpus)
        self.limit = max(1, cpus)

    @staticmethod
    def _affinity(node_id: str, soft: bool):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)

    def cluster(self) -> dict[str, float]:
        have = self.ray.cluster_resources()
        return {"CPU": float(self.limit), "GPU": float(have.get("GPU", 0.0))}

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def _node_slots(self, resources: dict[str, float]) -> dict[str, int]:
        """How many tasks of this size each alive node holds at once (its CPUs and GPUs over the
        task's), in node-id order; nodes that hold none (a head started with no CPUs) left out."""
        slots = {}
        for n in sorted(self.ray.nodes(), key=lambda n: n.get("NodeID", "")):
            have = n.get("Resources") or {}
            if not n.get("Alive") or not n.get("NodeID"):
                continue
            fits = [have.get("CPU", 0.0) / resources.get("num_cpus", 1.0)] if resources.get("num_cpus") else []
            if resources.get("num_gpus"):
                fits.append(have.get("GPU", 0.0) / resources["num_gpus"])
            k = int(min(fits) + 1e-9) if fits else 1
            if k > 0:
                slots[n["NodeID"]] = k
        return slots

    def map(self, fn, items, make_args, resources, desc, count_rows):
        """As :meth:`Executor.map`; a dict result also says which Ray node ran it (``node``).

        Each task goes to the alive node with the most free room for it, counting this map's
        tasks in flight (soft node affinity: where that node cannot run it, or has died, Ray
        places it elsewhere). Left to Ray's default, a phase of short tasks runs on one worker:
        a task queued when another finishes reuses that worker's lease, so one node would do a
        whole phase (and all its downloads) while the others idle."""
        ray = self.ray
        if _on_node not in self._remote:
            self._remote[_on_node] = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)(_on_node)
        remote, name = self._remote[_on_node], getattr(fn, "__name__", "task")
        slots = self._node_slots(resources)
        busy: Counter = Counter()  # this map's tasks in flight per node
        results: list[dict | None] = [None] * len(items)
        pending: dict = {}
        todo = list(enumerate(items))
        bar = _Progress(len(items), desc)
        try:
            while todo or pending:
                while todo and len(pending) < self.limit:
                    i, item = todo.pop(0)
                    node = max(slots, key=lambda n: slots[n] - busy[n]) if slots else None
                    where = {} if node is None else {"scheduling_strategy": self._affinity(node_id=node, soft=True)}
                    call = remote.options(name=name, **resources, **where)
                    busy[node] += 1
                    pending[call.remote(fn, *make_args(item))] = (i, item, node)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, item, node = pending.pop(ref)
                    busy[node] -= 1
                    try:
                        results[i] = ray.get(ref)
                    except Exception as e:  # after Ray's retries
                        raise _failure(desc, item, getattr(e, "cause", None) or e, TASK_RETRIES) from e
                    bar.done(count_rows(results[i]))
        finally:
            bar.close()
            for ref in pending:
                ray.cancel(ref, force=True)
        return results  # type: ignore[return-value]


def _on_node(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a Ray task; a dict result gets the id of the node that ran it
    (``node``), so that a job's timings show how its phases spread over a cluster."""
    result = fn(*args)
    if isinstance(result, dict):
        import ray

        result = {**result, "node": ray.get_runtime_context().get_node_id()}
    return result
