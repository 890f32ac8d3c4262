"""The one owner of a job's output layout (see ARCHITECTURE.md, "Output layout").

```
OUT/shards/NNNNNN.tar          training shards (WebDataset)
OUT/metadata/NNNNNN.parquet    kept rows, no pixels
OUT/rejected/NNNNNN.parquet    dropped rows with drop_stage / drop_reason
OUT/<artifact>/...             job-level artifacts a stage declares (metaclip/, semdedup/, ...)
OUT/manifest.json              written last: the job is complete
OUT/report.html
OUT/_work/job.json             the job's identity: spec fingerprint, inputs, what pairsift owns here
OUT/.pairsift.lock             held while a driver runs the job
OUT/_work/ledger/<step>/...    one commit marker (+ partial) per task
OUT/_work/p<k>/NNNNNN.parquet  work shards of phase k (columns only: no image bytes)
OUT/_work/images/NNNNNN/       image bytes that exist nowhere else (gzip'd tars, downloads)
OUT/_cache/<stage>-<fp>/...    computed columns per row (the compute cache; --restart keeps it)
```

Every path under OUT that pairsift writes is built here, and :func:`owned_paths` lists
them: ``--restart`` removes exactly those (and the artifacts the old job recorded), never
anything else.
"""

from __future__ import annotations

from pairsift.pipeline import storage

#: Top-level names every job writes under its output folder.
FIXED = ("_work", "shards", "metadata", "rejected", "manifest.json", "report.html")


def work_dir(output: str) -> str:
    return storage.join(output, "_work")


def job_file(output: str) -> str:
    return storage.join(output, "_work", "job.json")


def driver_file(output: str) -> str:
    return storage.join(output, "_work", "driver.json")


def plan_file(output: str) -> str:
    return storage.join(output, "_work", "plan.json")


def lock_file(output: str) -> str:
    """Held while a driver runs the job (beside _work: --restart removes _work, never the lock)."""
    return storage.join(output, ".pairsift.lock")


def ledger_dir(output: str) -> str:
    return storage.join(output, "_work", "ledger")


def phase_dir(output: str, phase: int) -> str:
    return storage.join(output, "_work", f"p{phase}")


def work_path(output: str, phase: int, name: str) -> str:
    """A work shard of phase ``phase``."""
    return storage.join(output, "_work", f"p{phase}", f"{name}.parquet")


def stage_work_dir(output: str, name: str) -> str:
    """Scratch space of one stage (spill files), removed with ``_work``."""
    return storage.join(output, "_work", name)


def image_store(output: str, name: str, phase: int) -> str:
    """Image bytes of input shard ``name`` that exist nowhere else (gzip'd tars, downloads,
    transcoded images), written by phase ``phase``."""
    return storage.join(output, "_work", "images", name, f"p{phase}.parquet")


def image_store_dir(output: str, name: str | None = None) -> str:
    return storage.join(output, "_work", "images", *([name] if name else []))


def cache_dir(output: str) -> str:
    """The job's compute cache unless ``--cache`` names a shared one: kept by ``--restart``."""
    return storage.join(output, "_cache")


def normalised_url_list(output: str, index: int) -> str:
    """A text URL list parsed once into Parquet (``input.format: urls``)."""
    return storage.join(output, "_work", "urls", f"{index:06d}.parquet")


def url_list_path(output: str, name: str) -> str:
    """An emitted URL list of the kept rows (``emit.images: false``)."""
    return storage.join(output, "urls", f"{name}.parquet")


def shards_dir(output: str) -> str:
    return storage.join(output, "shards")


def rows_dir(output: str, kept: bool) -> str:
    """``metadata/`` (kept rows) or ``rejected/``."""
    return storage.join(output, "metadata" if kept else "rejected")


def rejected_path(output: str, name: str) -> str:
    return storage.join(output, "rejected", f"{name}.parquet")


def shard_path(output: str, name: str) -> str:
    return storage.join(output, "shards", f"{name}.tar")


def metadata_path(output: str, name: str) -> str:
    return storage.join(output, "metadata", f"{name}.parquet")


def manifest_file(output: str) -> str:
    return storage.join(output, "manifest.json")


def report_file(output: str) -> str:
    return storage.join(output, "report.html")


def artifact_dir(output: str, artifact: str) -> str:
    """A stage's job-level artifact folder (``OUT/metaclip``, ...)."""
    return storage.join(output, artifact)


def owned_paths(output: str, artifacts: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Everything under ``output`` that a job with these stage artifacts writes."""
    return [storage.join(output, n) for n in (*FIXED, *artifacts)]
