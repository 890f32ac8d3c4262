"""Shard statistics with DuckDB over a job's Parquet output.

Tables: ``samples`` (``OUT/metadata/*.parquet``, the kept rows) and ``rejected``
(``OUT/rejected/*.parquet``, dropped rows with ``drop_stage`` and ``drop_reason``).
"""

from __future__ import annotations

import json
import os

import duckdb

from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.storage import require_local

#: Numeric columns summarised when a job has them (later stages add theirs here).
SCORE_COLUMNS = ("clip_score", "cotr", "cotr_fuzzy", "text_area", "ocr_boxes", "clip_text_drop", "metaclip_p",
                 "centroid_distance", "width", "height")


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with ``samples`` and ``rejected`` registered as views."""
    require_local(output, "stats")
    if not os.path.isfile(os.path.join(output, "manifest.json")) and not os.path.isdir(os.path.join(output, "rejected")):
        raise ConfigError(f"{output} is not a pairsift job output (no manifest.json)")
    con = duckdb.connect()
    for view, sub in (("samples", "metadata"), ("rejected", "rejected")):
        folder = os.path.join(output, sub)
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


def score_summaries(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    out = []
    for c in SCORE_COLUMNS:
        if c in cols:
            row = con.execute(
                f"SELECT count({c}), min({c}), quantile_cont({c}, 0.1), median({c}), avg({c}), "
                f"quantile_cont({c}, 0.9), max({c}) FROM samples"
            ).fetchone()
            out.append((c, *row))
    return out


def recaption_summaries(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    """Per recaption column (``X`` with ``X_model`` and ``X_error``) of the kept samples: how
    many were asked, recaptioned and failed, the commonest failure, and the mean words of the
    alt text and of the recaption (the first one, for lists of rewrites)."""
    types = {r[0]: r[1] for r in con.execute("DESCRIBE samples").fetchall()}
    out = []
    for model_col in sorted(c for c in types if c.endswith("_model")):
        col = model_col[: -len("_model")]
        if col not in types or f"{col}_error" not in types:
            continue
        text = f"{col}[1]" if types[col].endswith("[]") else col
        row = con.execute(
            f"SELECT count({model_col}), count({col}), count({col}_error), "
            f"avg(len(string_split(caption, ' '))), avg(len(string_split({text}, ' '))) FROM samples"
        ).fetchone()
        top = con.execute(f"SELECT split_part({col}_error, ':', 1) AS kind, count(*) AS n FROM samples "
                          f"WHERE {col}_error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind LIMIT 1").fetchone()
        out.append((col, row[0], row[1], row[2], f"{top[0]} ({top[1]:,})" if top else None, row[3], row[4]))
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
    manifest_path = os.path.join(output, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            m = json.load(f)
        parts.append(f"job {m['name']!r}: {m['counts']['input']:,} in, {m['counts']['kept']:,} kept")
        parts.append(format_table(["stage", "in", "dropped", "out"],
                                  [(s["stage"], s["in"], s["dropped"], s["out"]) for s in m["counts"]["stages"]]))
    parts.append("")
    parts.append("funnel by drop reason (DuckDB over metadata/ and rejected/):")
    parts.append(format_table(["stage", "reason", "samples"], funnel(con)))
    scores = score_summaries(con)
    if scores:
        parts.append("")
        parts.append("score summaries (kept samples):")
        parts.append(format_table(["column", "n", "min", "p10", "median", "mean", "p90", "max"], scores))
    recaptions = recaption_summaries(con)
    if recaptions:
        parts.append("")
        parts.append("recaptions (kept samples):")
        parts.append(format_table(["column", "asked", "recaptioned", "failed", "top failure", "words alt",
                                   "words new"], recaptions))
    parts.extend(metaclip_section(con, output))
    return "\n".join(parts)


def metaclip_section(con: duckdb.DuckDBPyConnection, output: str) -> list[str]:
    """Head/tail of MetaCLIP entry counts before and after balancing, when the job ran the
    ``metaclip`` stage (``OUT/metaclip/entry_counts.parquet``)."""
    path = os.path.join(output, "metaclip", "entry_counts.parquet")
    if not os.path.isfile(path):
        return []
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    if "metaclip_entries" not in cols:
        return []
    lang = "metaclip_lang" if "metaclip_lang" in cols else "NULL::VARCHAR"
    src = "'" + path.replace("'", "''") + "'"
    con.execute(f"""CREATE OR REPLACE TEMP VIEW metaclip_counts AS
        WITH k AS (SELECT {lang} AS language, unnest(metaclip_entries) AS entry_id FROM samples),
             kc AS (SELECT language, entry_id, count(*) AS kept FROM k GROUP BY ALL)
        SELECT e.*, coalesce(kc.kept, 0) AS kept FROM read_parquet({src}) e LEFT JOIN kc
        ON e.entry_id = kc.entry_id AND e.language IS NOT DISTINCT FROM kc.language""")
    per_lang = con.execute("""
        SELECT coalesce(language, 'all'), any_value(t), count(*), count(*) FILTER (WHERE count > 0),
               count(*) FILTER (WHERE count >= t), sum(count), sum(count) FILTER (WHERE count < t) / sum(count),
               sum(kept), max(kept) FILTER (WHERE count >= t)
        FROM metaclip_counts GROUP BY 1 ORDER BY sum(count) DESC""").fetchall()
    top = con.execute("""SELECT coalesce(language, 'all'), entry, count, p, kept FROM metaclip_counts
                         ORDER BY count DESC, entry LIMIT 10""").fetchall()
    return ["", "MetaCLIP entry counts (metaclip/entry_counts.parquet; kept = matches among kept samples):",
            format_table(["language", "t", "entries", "matched", "head entries", "matches", "tail share",
                          "kept matches", "max kept (head)"], per_lang),
            "", "most matched entries:", format_table(["language", "entry", "count", "p", "kept"], top)]


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
