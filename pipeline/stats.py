"""Shard statistics with DuckDB over a job's Parquet output.

Tables: ``samples`` (``OUT/metadata/*.parquet``, the kept rows) and ``rejected``
(``OUT/rejected/*.parquet``, dropped rows with ``drop_stage`` and ``drop_reason``).
"""

from __future__ import annotations

import json
import os

import duckdb

from pairsift.pipeline import layout
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.storage import require_local

#: Columns of the row schema and of emit, never summarised as scores.
NOT_SCORES = ("uid", "key", "source", "url", "caption", "image", "drop_reason", "drop_stage", "shard", "image_ext",
              "transcoded")


def score_columns(output: str, con: duckdb.DuckDBPyConnection) -> list[str]:
    """The score columns of a job's kept rows: what ``manifest.json`` says each stage added as
    a score (``Stage.scores``; by default its numeric columns), in stage order. An output
    without that record gets every numeric column."""
    have = {r[0]: r[1] for r in con.execute("DESCRIBE samples").fetchall()}
    path = layout.manifest_file(output)
    if os.path.isfile(path):
        with open(path) as f:
            cols = json.load(f).get("columns")
        if cols is not None:
            return [c["name"] for c in cols if c.get("score") and c["name"] in have]
    numeric = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT",
               "DOUBLE", "HUGEINT")
    return [c for c, t in have.items() if c not in NOT_SCORES and (t in numeric or t.startswith("DECIMAL"))]


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with ``samples`` and ``rejected`` registered as views."""
    require_local(output, "stats")
    if not os.path.isfile(layout.manifest_file(output)) and not os.path.isdir(layout.rows_dir(output, kept=False)):
        raise ConfigError(f"{output} is not a pairsift job output (no manifest.json)")
    con = duckdb.connect()
    for view, sub in (("samples", "metadata"), ("rejected", "rejected")):
        folder = layout.rows_dir(output, kept=sub == "metadata")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet")) if os.path.isdir(folder) else []
        if files:
            # The files listed one by one, not a glob: an output path may hold [ ] * ? itself.
            paths = ", ".join("'" + os.path.join(folder, f).replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{paths}], union_by_name=true)")
        else:
            con.execute(f"CREATE VIEW {view} AS SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS caption, "
                        f"NULL::VARCHAR AS drop_stage, NULL::VARCHAR AS drop_reason WHERE false")
    return con


def funnel(con: duckdb.DuckDBPyConnection):
    return con.execute(
        """
        WITH t AS (
            SELECT coalesce(drop_stage, '(kept)') AS stage, coalesce(drop_reason, '') AS reason
            FROM (SELECT drop_stage, drop_reason FROM rejected
                  UNION ALL SELECT NULL, NULL FROM samples))
        SELECT stage, reason, count(*) AS n FROM t GROUP BY stage, reason
        ORDER BY stage = '(kept)', n DESC, stage, reason
        """
    ).fetchall()


def score_summaries(con: duckdb.DuckDBPyConnection, output: str) -> list[tuple]:
    out = []
    for c in score_columns(output, con):
        q = '"' + c.replace('"', '""') + '"'
        row = con.execute(f"SELECT count({q}), min({q}), quantile_cont({q}, 0.1), median({q}), avg({q}), "
                          f"quantile_cont({q}, 0.9), max({q}) FROM samples").fetchone()
        out.append((c, *row))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):  # before int: bool is an int subclass and would print as 1/0
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_table(header: list[str], rows: list[tuple]) -> str:
    cells = [header] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stats_text(output: str) -> str:
    con = connect(output)
    parts = []
    manifest_path = layout.manifest_file(output)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            m = json.load(f)
        parts.append(f"job {m['name']!r}: {m['counts']['input']:,} in, {m['counts']['kept']:,} kept")
        parts.append(format_table(["stage", "in", "dropped", "out"],
                                  [(s["stage"], s["in"], s["dropped"], s["out"]) for s in m["counts"]["stages"]]))
    parts.append("")
    parts.append("funnel by drop reason (DuckDB over metadata/ and rejected/):")
    parts.append(format_table(["stage", "reason", "samples"], funnel(con)))
    scores = score_summaries(con, output)
    if scores:
        parts.append("")
        parts.append("score summaries (kept samples):")
        parts.append(format_table(["column", "n", "min", "p10", "median", "mean", "p90", "max"], scores))
    parts.extend(stage_sections(output, con))
    return "\n".join(parts)


def stage_sections(output: str, con: duckdb.DuckDBPyConnection) -> list[str]:
    """Each stage's own part of ``pairsift stats`` (``Stage.stats_section``), in job order."""
    path = layout.manifest_file(output)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        names = [next(iter(e)) for e in json.load(f).get("spec", {}).get("stages", [])]
    from pairsift.stages import get_stage_class

    lines: list[str] = []
    for name in dict.fromkeys(names):
        try:
            cls = get_stage_class(name)
        except KeyError:
            continue
        lines.extend(cls.stats_section(output, con) or [])
    return lines


def print_stats(output: str) -> None:
    print(stats_text(output))


def sandbox(con: duckdb.DuckDBPyConnection, output: str) -> None:
    """Lock a connection down for user SQL: files are readable under ``output`` only (the
    registered views and the job's own Parquet), and nothing can be written, attached,
    installed or loaded; the settings cannot be changed back."""
    folder = os.path.abspath(output).replace("'", "''")
    con.execute(f"SET allowed_directories=['{folder}/']")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")


def run_sql(output: str, sql: str) -> str:
    """Run one user query over the ``samples`` and ``rejected`` views, sandboxed."""
    con = connect(output)
    sandbox(con, output)
    try:
        rel = con.sql(sql)
        if rel is None:  # a statement without a result (CREATE, SET, ...)
            return ""
        # Some errors (conversions, division by zero, ...) only surface when rows are fetched.
        columns, rows = list(rel.columns), rel.fetchall()
    except duckdb.Error as e:
        raise ConfigError(f"query failed: {e}") from None
    return format_table(columns, rows)
