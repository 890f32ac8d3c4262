"""Stage ``fault_injection``: makes failures on purpose, to test fault tolerance.

Not a curation step. It lets tests (and operators checking a new cluster) see that the runner
does what ARCHITECTURE.md promises ("Invariants"): a stage raising on one sample's data drops that sample with
reason ``error:<stage>`` and the job goes on; a stage failing on every sample of a shard fails
the job with the shard's path; a worker process that dies mid-shard costs one retried shard.
Rule: a live row whose caption contains ``raise_on_caption`` raises ``ValueError``; every row
of a shard whose source path contains ``fail_shard`` raises (both only while
``fail_while_exists`` exists, when it is set); the first worker to see a caption
containing ``kill_on_caption`` exits hard (``os._exit``) unless ``kill_marker`` exists, which
it creates first, so the retry succeeds. ``fail_on_empty_batch`` raises on the worker's
empty schema-probe batch (a configuration error naming the stage); ``num_gpus`` is what each
worker asks for (more than the cluster has is a configuration error at preflight).
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from pairsift.pipeline.table import live_mask
from pairsift.stages.base import Resources, Stage, StageConfig


class FaultConfig(StageConfig):
    raise_on_caption: str | None = None
    fail_shard: str | None = None
    kill_on_caption: str | None = None
    kill_marker: str | None = None
    #: Injected failures happen only while this file exists (an outage the test ends).
    fail_while_exists: str | None = None
    #: Seconds to sleep per batch: makes a job slow enough to interrupt.
    delay_s: float = 0.0
    #: Raise on an empty batch (the worker's schema probe), as a buggy stage would.
    fail_on_empty_batch: bool = False
    #: GPUs each worker asks for, as a GPU stage would (checked against the cluster at preflight).
    num_gpus: float = 0.0


class FaultInjectionStage(Stage[FaultConfig]):
    name = "fault_injection"

    def resources(self) -> Resources:
        return Resources(cpus=self.num_cpus, gpus=self.config.num_gpus)

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # captions and sources only

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        if c.fail_on_empty_batch and not batch.num_rows:
            raise RuntimeError("injected failure on an empty batch")
        if c.delay_s and batch.num_rows:
            time.sleep(c.delay_s)
        if c.fail_while_exists and not os.path.exists(c.fail_while_exists):
            return batch
        live = live_mask(batch)
        captions = batch.column("caption").to_pylist()
        sources = batch.column("source").to_pylist()
        for ok, caption, source in zip(live, captions, sources):
            if not ok:
                continue
            if c.fail_shard and c.fail_shard in (source or ""):
                raise RuntimeError(f"injected failure for shard {source}")
            if c.raise_on_caption and c.raise_on_caption in (caption or ""):
                raise ValueError(f"injected failure on caption {caption!r}")
            if c.kill_on_caption and c.kill_on_caption in (caption or "") and c.kill_marker:
                if not os.path.exists(c.kill_marker):
                    with open(c.kill_marker, "w") as f:
                        f.write(str(os.getpid()))
                    os._exit(1)
        return batch
