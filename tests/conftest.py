"""Shared fixtures: one local Ray for the whole session, the sample pool, ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PAIRSIFT_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when the folder is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared/{'/'.join(parts)} is not present")
    return p


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, as on CI) shared by every test that runs jobs in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_pool(tmp_path_factory) -> Path:
    """The quickstart's sample pool as WebDataset tars."""
    from pairsift.samplepool import write_pool

    folder = tmp_path_factory.mktemp("pool")
    write_pool(str(folder))
    return folder


def make_job(input_path, output, stages=None, fmt="webdataset", **extra):
    """A validated JobSpec for tests."""
    from pairsift.pipeline.spec import parse_job

    raw = {
        "name": "test",
        "seed": 0,
        "input": {"format": fmt, "path": str(input_path), **extra.pop("input", {})},
        "output": str(output),
        "stages": stages if stages is not None else [{"quality": {}}, {"exact_dedup": {}}],
        **extra,
    }
    return parse_job(raw)
