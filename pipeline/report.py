"""``OUT/report.html``: one self-contained page (no network) about a finished job.

Sections (each an element with a stable id): ``funnel`` (counts per stage and reason),
``scores`` (histograms of the score columns the job's stages declared), then each stage's
own section (``Stage.report_section``: e.g. MetaCLIP entry counts, cluster budgets), ``throughput`` (seconds and
samples/s per phase) and ``examples`` (thumbnails of kept pairs and of dropped pairs with their
reasons; dropped pairs have no pixels in the output, so their thumbnails are read back from
the input shards). Charts are inline SVG; thumbnails are inline JPEG data URLs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pairsift.pipeline import layout
from pairsift.pipeline.stats import connect, score_columns

THUMB = 112
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left} .grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:130px;font-size:11px} figure img{width:112px;height:112px;object-fit:cover;border:1px solid #ccc}
.ph{width:112px;height:112px;background:#eee;display:flex;align-items:center;justify-content:center;color:#888}
.charts{display:flex;flex-wrap:wrap;gap:24px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def svg_bars(labels: list[str], values: list[float], title: str, width: int = 460, height: int = 220) -> str:
    """A bar chart as inline SVG."""
    n = max(len(values), 1)
    top = max(values) if values and max(values) > 0 else 1
    bw = (width - 60) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img">',
             f'<text x="4" y="14" font-size="13">{_e(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = (height - 40) * v / top
        x = 50 + i * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="#4a7ab5">'
                     f'<title>{_e(lab)}: {v:g}</title></rect>')
        if n <= 16 or i % max(n // 8, 1) == 0:
            parts.append(f'<text x="{x:.1f}" y="{height + 14}" font-size="9" transform="rotate(30 {x:.1f} {height + 14})">{_e(lab)}</text>')
    parts.append(f'<text x="4" y="{height - (height - 40) + 4}" font-size="10">{top:g}</text>')
    parts.append(f'<line x1="48" y1="{height}" x2="{width}" y2="{height}" stroke="#999"/></svg>')
    return "".join(parts)


def svg_histogram(values: np.ndarray, title: str, bins: int = 30) -> str:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return f"<p>{_e(title)}: no values</p>"
    counts, edges = np.histogram(values, bins=bins)
    labels = [f"{edges[i]:.3g}" for i in range(len(counts))]
    return svg_bars(labels, counts.tolist(), f"{title} (n={values.size:,})")


def _score_histogram(con, col: str, title: str, bins: int = 30) -> str:
    """:func:`svg_histogram` of a column of the kept rows, binned by DuckDB (the values never
    come to Python: the report costs the same for 10^3 rows and 10^9)."""
    q = '"' + col.replace('"', '""') + '"'
    finite = f"{q} IS NOT NULL AND isfinite({q}::DOUBLE)"
    n, lo, hi = con.execute(f"SELECT count(*), min({q})::DOUBLE, max({q})::DOUBLE FROM samples WHERE {finite}").fetchone()
    if not n:
        return f"<p>{_e(title)}: no values</p>"
    width = (hi - lo) / bins if hi > lo else 1.0
    rows = con.execute(f"SELECT least(floor(({q}::DOUBLE - ?) / ?), ?)::BIGINT AS b, count(*) FROM samples "
                       f"WHERE {finite} GROUP BY b", [lo, width, bins - 1]).fetchall()
    counts = [0] * bins
    for b, c in rows:
        counts[int(b)] += int(c)
    labels = [f"{lo + i * width:.3g}" for i in range(bins)]
    return svg_bars(labels, counts, f"{title} (n={n:,})")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _thumb(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.thumbnail((THUMB * 2, THUMB * 2))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:
        return None


def _figure(src: str | None, caption: str, note: str) -> str:
    img = f'<img src="{src}" alt="">' if src else '<div class="ph">no image</div>'
    return f"<figure>{img}<figcaption><b>{_e(note)}</b><br>{_e(caption[:90])}</figcaption></figure>"


def _source_image(source: str, key: str) -> bytes | None:
    """Read a dropped pair's image back from its input (tar, parquet row, or image file)."""
    try:
        if source.endswith((".tar", ".tgz", ".tar.gz")) and os.path.isfile(source):
            with tarfile.open(source, "r:*") as tf:
                for m in tf:
                    stem, _, ext = m.name.partition(".")
                    if stem in (key, "./" + key) and ext.lower() in ("jpg", "jpeg", "png", "webp", "gif", "bmp"):
                        return tf.extractfile(m).read()
        elif source.endswith(".parquet") and os.path.isfile(source):
            t = pq.read_table(source).slice(int(key), 1).to_pylist()[0]
            for v in t.values():
                if isinstance(v, bytes):
                    return v
                if isinstance(v, dict) and isinstance(v.get("bytes"), bytes):
                    return v["bytes"]
        elif os.path.isfile(source):
            with open(source, "rb") as f:
                return f.read()
    except Exception:
        return None
    return None


def _kept_examples(output: str, n: int, score: str | None = None) -> list[str]:
    """Thumbnails of the first kept samples, each noted with its ``score`` (the job's first
    score column) when it has one."""
    out = []
    folder = layout.shards_dir(output)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".tar")) if os.path.isdir(folder) else []
    for name in shards:
        with tarfile.open(os.path.join(folder, name)) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf:
                stem, _, ext = m.name.partition(".")
                members.setdefault(stem, {})[ext] = tf.extractfile(m).read()
                if len(members) > n:
                    break
        for uid, parts in list(members.items())[:n]:
            img = next((v for k, v in parts.items() if k in ("jpg", "png", "webp")), None)
            meta = json.loads(parts.get("json", b"{}") or b"{}")
            value = meta.get(score) if score else None
            note = f"{score} {value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "kept"
            out.append(_figure(_thumb(img), parts.get("txt", b"").decode("utf-8", "replace"), note))
        if len(out) >= n:
            break
    return out[:n]


def _dropped_examples(con, n: int) -> list[str]:
    rows = con.execute(
        """SELECT source, key, caption, drop_stage, drop_reason FROM (
             SELECT *, row_number() OVER (PARTITION BY drop_reason ORDER BY uid) AS r FROM rejected)
           ORDER BY r, drop_reason LIMIT ?""", [n]).fetchall()
    return [_figure(_thumb(_source_image(src or "", key or "")), cap or "", f"{stage}: {reason}")
            for src, key, cap, stage, reason in rows]


def build_report(output: str, thumbs: int = 12) -> str:
    """Write ``OUT/report.html`` and return its path."""
    with open(layout.manifest_file(output)) as f:
        m = json.load(f)
    con = connect(output)
    c = m["counts"]
    sec = [f"<h1>pairsift report: {_e(m['name'])}</h1>",
           f"<p>{c['input']:,} pairs in, {c['kept']:,} kept, {c['rejected']:,} rejected; "
           f"{len(m['shards'])} training shard(s); spec {_e(m['fingerprint'])}, seed {m['seed']}</p>"]

    rows = [[s["stage"], f"{s['in']:,}", f"{s['dropped']:,}", f"{s['out']:,}",
             ", ".join(f"{r} {k:,}" for r, k in s["reasons"].items())] for s in c["stages"]]
    reasons = [(f"{s['stage']}:{r}", k) for s in c["stages"] for r, k in s["reasons"].items()]
    sec.append('<section id="funnel"><h2>Funnel</h2>' + _table(["stage", "in", "dropped", "out", "reasons"], rows)
               + (svg_bars([r for r, _ in reasons], [k for _, k in reasons], "drops by reason") if reasons else "")
               + "</section>")

    charts = []
    scores = score_columns(output, con)
    for col in scores:
        charts.append(_score_histogram(con, col, f"{col} (kept)"))
    sec.append('<section id="scores"><h2>Scores</h2><div class="charts">' + ("".join(charts) or "<p>no score columns</p>")
               + "</div></section>")

    for entry in m["spec"].get("stages", []):  # each stage's own section (its artifacts)
        (name,) = entry
        try:
            from pairsift.stages import get_stage_class

            html = get_stage_class(name).report_section(output, m)
        except Exception as e:  # a stage's section must not lose the rest of the report
            html = f'<section><h2>{_e(name)}</h2><p>section not available: {_e(type(e).__name__)}: {_e(str(e))}</p></section>'
        if html and html not in sec:
            sec.append(html)

    trows = []
    for ph in m["timings"]["phases"]:
        rate = ph["samples"] / ph["seconds"] if ph["seconds"] and ph.get("shards_run") else 0
        trows.append([ph["phase"], f"{ph['seconds']:.2f}", f"{rate:,.0f}", f"{ph.get('shards_run', 0)}/{ph['shards']}",
                      ", ".join(f"{k} {v:.2f}s" for k, v in ph.get("worker_seconds", {}).items())])
    sec.append('<section id="throughput"><h2>Throughput</h2>'
               + f"<p>Ray start-up {m['timings']['ray_init_s']:.1f} s</p>"
               + _table(["phase", "seconds", "samples/s", "shards run", "worker seconds"], trows) + "</section>")

    sec.append('<section id="examples"><h2>Examples</h2><h3>kept</h3><div class="grid">'
               + "".join(_kept_examples(output, thumbs, next(iter(scores), None))) + '</div><h3>dropped</h3><div class="grid">'
               + "".join(_dropped_examples(con, thumbs)) + "</div></section>")

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pairsift: {_e(m['name'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(sec)}</body></html>")
    path = layout.report_file(output)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
