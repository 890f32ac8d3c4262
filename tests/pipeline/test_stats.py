"""``pairsift stats`` and ``notebooks/shard_stats.ipynb`` on a real job output.

One job (quality + exact_dedup over the sample pool) runs in-process once for the module; the
expected counts are read straight from its Parquet files with pyarrow, independently of DuckDB
and of ``pipeline/stats.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_job

from pairsift.cli import main
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.stats import run_sql, stats_text

NOTEBOOK = REPO / "notebooks" / "shard_stats.ipynb"


@dataclass
class JobOutput:
    path: str
    manifest: dict
    kept: int  # rows in metadata/*.parquet
    rejected: Counter  # (drop_stage, drop_reason) -> rows in rejected/*.parquet


def _read_rows(folder: str, columns: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


@pytest.fixture(scope="module")
def job_output(ray_session, sample_pool, tmp_path_factory) -> JobOutput:
    from pairsift.pipeline.runner import run_job

    out = tmp_path_factory.mktemp("stats") / "out"
    result = run_job(make_job(sample_pool, out))
    kept = len(_read_rows(os.path.join(out, "metadata"), ["uid"]))
    rejected = Counter((r["drop_stage"], r["drop_reason"])
                       for r in _read_rows(os.path.join(out, "rejected"), ["drop_stage", "drop_reason"]))
    # The pool has good pairs and pairs that are bad on purpose: both sides must be non-empty,
    # or the comparisons below would prove little.
    assert kept > 0 and sum(rejected.values()) > 0
    return JobOutput(str(out), result.manifest, kept, rejected)


def _n(v: int) -> str:
    return re.escape(f"{v:,}")


def _assert_manifest_funnel(text: str, manifest: dict) -> None:
    """Every stage row of the manifest's funnel shows up as `stage  in  dropped  out`."""
    for s in manifest["counts"]["stages"]:
        pattern = rf"^{re.escape(s['stage'])}\s+{_n(s['in'])}\s+{_n(s['dropped'])}\s+{_n(s['out'])}\s*$"
        assert re.search(pattern, text, re.M), f"funnel row {s} not in:\n{text}"


# -- the Parquet files and the manifest agree (the ground truth the rest relies on) ----------

def test_manifest_matches_parquet(job_output):
    c = job_output.manifest["counts"]
    assert c["kept"] == job_output.kept
    assert c["rejected"] == sum(job_output.rejected.values())
    assert c["input"] == job_output.kept + sum(job_output.rejected.values())
    by_stage = {s["stage"]: s["reasons"] for s in c["stages"]}
    for (stage, reason), n in job_output.rejected.items():
        assert by_stage[stage][reason] == n
    assert c["stages"][-1]["out"] == job_output.kept


# -- (a) stats_text ---------------------------------------------------------------------------

def test_stats_text_funnel(job_output):
    text = stats_text(job_output.path)
    total = job_output.kept + sum(job_output.rejected.values())
    assert f"job 'test': {total:,} in, {job_output.kept:,} kept" in text
    _assert_manifest_funnel(text, job_output.manifest)
    # The DuckDB funnel by reason: one row per (stage, reason) of rejected/, then the kept rows.
    for (stage, reason), n in job_output.rejected.items():
        assert re.search(rf"^{re.escape(stage)}\s+{re.escape(reason)}\s+{_n(n)}\s*$", text, re.M), (stage, reason, text)
    assert re.search(rf"^\(kept\)\s+{_n(job_output.kept)}\s*$", text, re.M), text
    # width/height are always there after quality, so their summary is too.
    assert re.search(rf"^width\s+{_n(job_output.kept)}\s", text, re.M), text


# -- (b) run_sql --------------------------------------------------------------------------------

def _table_rows(table: str) -> list[list[str]]:
    """The data rows of a format_table() string (header and rule line dropped)."""
    return [line.split() for line in table.splitlines()[2:]]


def test_run_sql_counts(job_output):
    rows = _table_rows(run_sql(job_output.path, "SELECT count(*) FROM samples"))
    assert rows == [[f"{job_output.kept:,}"]]

    table = run_sql(job_output.path, "SELECT drop_stage, drop_reason, count(*) AS n FROM rejected GROUP BY ALL")
    got = {(stage, reason): int(n.replace(",", "")) for stage, reason, n in _table_rows(table)}
    assert got == dict(job_output.rejected)


@pytest.mark.parametrize("sql", [
    "SELEC 1",                                        # parser error
    "SELECT no_such_column FROM samples",             # binder error
    "SELECT CAST(caption AS INTEGER) FROM samples",   # raised only when rows are fetched
])
def test_run_sql_errors_are_config_errors(job_output, sql):
    with pytest.raises(ConfigError, match="query failed"):
        run_sql(job_output.path, sql)


# -- (c) the CLI --------------------------------------------------------------------------------

def test_cli_stats(job_output, capsys):
    assert main(["stats", job_output.path]) == 0
    out = capsys.readouterr().out
    _assert_manifest_funnel(out, job_output.manifest)
    assert re.search(rf"^\(kept\)\s+{_n(job_output.kept)}\s*$", out, re.M), out


def test_cli_stats_sql(job_output, capsys):
    code = main(["stats", job_output.path, "--sql",
                 "SELECT drop_reason, count(*) AS n FROM rejected GROUP BY drop_reason ORDER BY drop_reason"])
    assert code == 0
    rows = _table_rows(capsys.readouterr().out.rstrip("\n"))
    expected = Counter()
    for (_, reason), n in job_output.rejected.items():
        expected[reason] += n
    assert rows == [[reason, f"{n:,}"] for reason, n in sorted(expected.items())]


@pytest.mark.parametrize("sql, detail", [
    ("SELEC 1", "syntax error"),
    ("SELECT no_such_column FROM samples", "no_such_column"),
    ("SELECT CAST(caption AS INTEGER) FROM samples", "Conversion Error"),
])
def test_cli_stats_bad_sql(job_output, capsys, sql, detail):
    assert main(["stats", job_output.path, "--sql", sql]) == 2
    captured = capsys.readouterr()
    assert "pairsift: configuration error: query failed" in captured.err
    assert detail in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("name", ["empty_folder", "missing_folder"])
def test_cli_stats_not_a_job_output(tmp_path, capsys, name):
    folder = tmp_path / name
    if name == "empty_folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a job")
    assert main(["stats", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "not a pairsift job output" in err and str(folder) in err


# -- (d) the notebook ---------------------------------------------------------------------------

def test_notebook_is_saved_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def _runs_this_python(argv0: str) -> bool:
    # jupyter_client swaps these names for sys.executable when it starts a kernel.
    if argv0 in {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}:
        return True
    try:
        return os.path.samefile(argv0, sys.executable)
    except OSError:
        return False


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory):
    """Make sure the ``python3`` kernel is this interpreter (where pairsift is installed).

    With ipykernel installed jupyter_client finds ``python3`` even without a kernel.json; a
    missing one, or one (say in ~/.local/share/jupyter) that starts another Python, is
    replaced by a spec written into a temp dir put first on JUPYTER_PATH, so that nothing
    outside the test session changes and no network is needed.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        usable = _runs_this_python(KernelSpecManager().get_kernel_spec("python3").argv[0])
    except NoSuchKernel:
        usable = False
    with pytest.MonkeyPatch.context() as mp:
        if not usable:
            root = tmp_path_factory.mktemp("jupyter")
            spec_dir = root / "kernels" / "python3"
            spec_dir.mkdir(parents=True)
            (spec_dir / "kernel.json").write_text(json.dumps({
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (pairsift tests)",
                "language": "python",
            }))
            mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])))
            assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
        yield "python3"


def test_notebook_executes(job_output, python3_kernel):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=python3_kernel, timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env={**os.environ, "PAIRSIFT_OUT": job_output.path, "PYTHONWARNINGS": "ignore"})

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure in the notebook's outputs"

    text = "\n".join(o.text if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                     for o in outputs)
    assert job_output.path in text  # it read PAIRSIFT_OUT, not its default
    _assert_manifest_funnel(text, job_output.manifest)
    for (stage, reason), n in job_output.rejected.items():
        assert re.search(rf"^{re.escape(stage)}\s+{re.escape(reason)}\s+{_n(n)}\s*$", text, re.M), (stage, reason)
    # The shard sizes table sums to the kept count.
    shard_rows = re.findall(r"^(\S+\.tar)\s+([\d,]+)\s*$", text, re.M)
    assert shard_rows and sum(int(n.replace(",", "")) for _, n in shard_rows) == job_output.kept
    # The notebook file itself was not touched (it stays saved without outputs).
    assert all(not c.outputs for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
