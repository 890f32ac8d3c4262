"""``OUT/manifest.json``: the job spec, versions, seed, counts per stage, shard list, and the
one-screen summary printed at the end of a run."""

from __future__ import annotations

import platform
from collections import Counter
from importlib import metadata as importlib_metadata

PACKAGES = ("pairsift", "pyarrow", "ray", "pillow", "duckdb", "webdataset", "img2dataset", "ftfy",
            "numpy", "torch", "open_clip_torch")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def funnel(stage_names: list[str], drops: Counter, total: int) -> list[dict]:
    """Counts per stage in order: rows in, dropped (by reason), rows out."""
    by_stage: dict[str, Counter] = {}
    for key, n in drops.items():
        stage, _, reason = key.partition("\t")
        by_stage.setdefault(stage, Counter())[reason] += n
    rows = []
    remaining = total
    names = list(dict.fromkeys(["ingest"] + stage_names))  # a stage listed twice is one row: drops say its name
    names += sorted(s for s in by_stage if s not in names)  # e.g. error drops of unknown stages
    for name in names:
        reasons = by_stage.get(name, Counter())
        dropped = sum(reasons.values())
        rows.append({"stage": name, "in": remaining, "dropped": dropped, "out": remaining - dropped,
                     "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))})
        remaining -= dropped
    return rows


def build_manifest(spec, shards, final_summaries, emitted, stage_facts, phase_times, ray_init_s=0.0,
                   source_errors: list[list[str]] | None = None, columns: list[dict] | None = None) -> dict:
    """``source_errors``: each input shard's read errors (from the phase that read the sources;
    defaults to what the final summaries carry). ``columns``: what each stage added
    ({name, stage, type, score}); ``pairsift stats`` and the report summarise the scores."""
    if source_errors is None:
        source_errors = [s.get("source_errors", []) for s in final_summaries]
    drops: Counter = Counter()
    for s in final_summaries:
        drops.update(s["drops"])
    total = sum(s["rows"] for s in final_summaries)
    kept = sum(s["kept"] for s in final_summaries)
    return {
        "name": spec.name,
        "fingerprint": spec.fingerprint(),
        "seed": spec.seed,
        "spec": spec.dump(),
        "versions": package_versions(),
        "counts": {
            "input": total,
            "kept": kept,
            "rejected": total - kept,
            "stages": funnel([s.name for s in spec.stages], drops, total),
        },
        "inputs": [{"shard": sh.name, "path": sh.path, "rows": s["rows"], "source_errors": errs}
                   for sh, s, errs in zip(shards, final_summaries, source_errors)],
        "shards": emitted,
        "rejected": [f"rejected/{sh.name}.parquet" for sh in shards],
        "stage_facts": stage_facts,
        "cache": _cache_totals(final_summaries, phase_times),
        "columns": columns or [],
        "timings": {"ray_init_s": round(ray_init_s, 3), "phases": phase_times},
    }


def _cache_totals(final_summaries, phase_times) -> dict:
    """Rows each stage took from the compute cache and rows it computed (all phases)."""
    out: dict[str, dict[str, int]] = {}
    for t in phase_times:
        for stage, n in (t.get("cache") or {}).items():
            d = out.setdefault(stage, {"reused": 0, "computed": 0})
            d["reused"] += n["reused"]
            d["computed"] += n["computed"]
    return out


def format_summary(manifest: dict) -> str:
    """The one-screen summary: funnel, output shards, throughput."""
    c = manifest["counts"]
    lines = [f"job {manifest['name']!r}: {c['input']:,} pairs in, {c['kept']:,} kept, {c['rejected']:,} rejected", ""]
    lines.append(f"{'stage':<16}{'in':>10}{'dropped':>10}{'out':>10}  top reasons")
    for row in c["stages"]:
        reasons = ", ".join(f"{r} {n:,}" for r, n in list(row["reasons"].items())[:3])
        lines.append(f"{row['stage']:<16}{row['in']:>10,}{row['dropped']:>10,}{row['out']:>10,}  {reasons}")
    shards = manifest["shards"]
    size = sum(s["bytes"] for s in shards)
    if (manifest.get("spec", {}).get("emit") or {}).get("images", True) is False:  # a caption-only pool
        lines += ["", f"{len(shards)} URL list(s) of the kept rows, {size / 1e6:,.1f} MB in urls/; metadata/ and "
                      f"rejected/ hold the rows"]
    else:
        lines += ["", f"{len(shards)} training shard(s), {size / 1e6:,.1f} MB in shards/; metadata/ and rejected/ "
                      f"hold the rows"]
    for t in manifest["timings"]["phases"]:
        if not t["shards_run"]:
            lines.append(f"  {t['phase']:<28} all {t['shards']} shards committed earlier, skipped")
            continue
        rate = t["samples"] / t["seconds"] if t["seconds"] else 0.0
        lines.append(f"  {t['phase']:<28} {t['seconds']:>8.1f} s  {rate:>10,.0f} samples/s  ({t['shards_run']}/{t['shards']} shards run)")
    cache = manifest.get("cache") or {}
    if cache:
        parts = [f"{k.split(':', 1)[-1]} {v['reused']:,} reused / {v['computed']:,} computed" for k, v in cache.items()]
        lines.append("compute cache: " + "; ".join(parts))
    bad = [i for i in manifest["inputs"] if i["source_errors"]]
    if bad:
        lines.append(f"{len(bad)} input shard(s) had read errors (see manifest.json inputs[].source_errors)")
    return "\n".join(lines)
