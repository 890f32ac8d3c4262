"""OUT/report.html: self-contained, opened in headless Chromium, every section present."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import make_job
from pairsift.pipeline.runner import run_job


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium (Debian package `chromium`; .ci/run installs it)")


@pytest.fixture(scope="module")
def job_out(ray_session, sample_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    run_job(make_job(sample_pool, out))
    return out


def test_report_is_self_contained(job_out):
    page = (job_out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']https?://""", page), "the report must not load anything from the network"
    assert page.count("data:image/jpeg;base64,") >= 12  # kept and dropped thumbnails inline
    assert "quality: too_small" in page and "exact_dedup: exact_dedup" in page


def test_report_sections_render_in_chromium(job_out, tmp_path):
    browser = _chromium()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (job_out / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    for section in ("funnel", "scores", "throughput", "examples"):
        assert f'id="{section}"' in dom, section
    assert "<svg" in dom and "drops by reason" in dom
    assert re.search(r"<td>quality</td><td>78</td><td>4</td><td>74</td>", dom)
    shot = tmp_path / "report.png"
    subprocess.run(cmd[:-2] + [f"--screenshot={shot}", "--window-size=1200,1600", (job_out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
