"""``pairsift status OUT`` (progress of a running or interrupted job, read from its ledger)
and ``pairsift report OUT`` (rebuild ``OUT/report.html``)."""

from __future__ import annotations

import json
import os
import socket

from pairsift.pipeline import layout
from pairsift.pipeline.errors import ConfigError
from pairsift.pipeline.storage import require_local


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def job_status(output: str) -> dict:
    """What the ledger says: per phase shards committed / total, and the job's state."""
    require_local(output, "status")
    job_file, plan_file = layout.job_file(output), layout.plan_file(output)
    if not os.path.isfile(job_file):
        raise ConfigError(f"{output} holds no pairsift job (no _work/job.json)")
    job = _read(job_file)
    plan = _read(plan_file) if os.path.isfile(plan_file) else {}
    ledger = layout.ledger_dir(output)
    steps = []
    for ph in plan.get("phases", []):
        folder = os.path.join(ledger, ph["step"])
        done = len([f for f in os.listdir(folder) if f.endswith(".json")]) if os.path.isdir(folder) else 0
        steps.append({"step": ph["step"], "label": ph["label"], "done": done, "total": plan["shards"]})
    emit_dir = os.path.join(ledger, "emit")
    emit_done = len([f for f in os.listdir(emit_dir) if f.endswith(".json")]) if os.path.isdir(emit_dir) else 0
    steps.append({"step": "emit", "label": "emit", "done": emit_done, "total": plan.get("emit_tasks")})
    manifest = layout.manifest_file(output)
    driver = layout.driver_file(output)
    if os.path.isfile(manifest) and _read(manifest).get("fingerprint") == job.get("fingerprint"):
        state = "complete"
    elif os.path.isfile(driver):
        d = _read(driver)
        here = d.get("host") == socket.gethostname()
        state = "running" if here and _alive(int(d.get("pid", -1))) else ("interrupted" if here else "running or interrupted (driver on " + str(d.get("host")) + ")")
    else:
        state = "not started"
    return {"name": job.get("name"), "fingerprint": job.get("fingerprint"), "state": state, "steps": steps}


def format_status(st: dict) -> str:
    lines = [f"job {st['name']!r} ({st['fingerprint']}): {st['state']}"]
    for s in st["steps"]:
        total = "?" if s["total"] is None else s["total"]
        lines.append(f"  {s['step']:<6} {s['label']:<36} {s['done']:>6} / {total} shards committed")
    if st["state"] == "interrupted":
        lines.append("rerun the same `pairsift run` command to resume; committed shards are skipped")
    return "\n".join(lines)


def _cmd_status(args) -> int:
    print(format_status(job_status(args.output)))
    return 0


def _cmd_report(args) -> int:
    from pairsift.pipeline.report import build_report

    require_local(args.output, "report")
    if not os.path.isfile(os.path.join(args.output, "manifest.json")):
        raise ConfigError(f"{args.output} has no manifest.json: the job has not finished")
    print(build_report(args.output))
    return 0


def add_commands(sub) -> None:
    st = sub.add_parser("status", help="progress of a running or interrupted job, from its ledger")
    st.add_argument("output", help="the job's output folder")
    st.set_defaults(func=_cmd_status)
    rp = sub.add_parser("report", help="(re)build OUT/report.html")
    rp.add_argument("output", help="the job's output folder")
    rp.set_defaults(func=_cmd_report)
