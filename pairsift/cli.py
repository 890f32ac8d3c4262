"""The ``pairsift`` command line.

    pairsift run JOB.yaml [--output DIR] [--num-cpus N] [--restart] [--executor ray|local]
    pairsift stats OUT [--sql "SELECT ..."]
    pairsift sample-pool DIR

Exit codes: 0 done, 1 the job failed (a shard kept failing), 2 bad configuration (nothing
was written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pairsift.pipeline.errors import ConfigError, JobError


def _cmd_run(args) -> int:
    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.manifest import format_summary
    from pairsift.pipeline.spec import load_job

    output = args.output
    if output and "://" not in output:  # URLs (s3://, gs://) are left as they are
        output = os.path.abspath(output)
    spec = load_job(args.job, output=output, num_cpus=args.num_cpus)
    result = run_job(spec, restart=args.restart, executor=args.executor)
    print(format_summary(result.manifest))
    print(f"\noutput: {result.output}  (pairsift stats {result.output})")
    return 0


def _cmd_stats(args) -> int:
    from pairsift.pipeline.stats import print_stats, run_sql

    if args.sql:
        print(run_sql(args.output, args.sql))
    else:
        print_stats(args.output)
    return 0


def _cmd_sample_pool(args) -> int:
    from pairsift.samplepool import write_pool

    paths = write_pool(args.folder)
    print(f"wrote {len(paths)} WebDataset shard(s) to {args.folder}")
    return 0


#: Modules that add subcommands: each has ``add_commands(subparsers)`` (imports kept lazy).
COMMAND_MODULES = (
    "pairsift.stages.clip_models",  # pairsift models pull
    "pairsift.metadata.cli",  # pairsift metadata build, pairsift metaclip match
    "pairsift.pipeline.status",  # pairsift status, pairsift report
)


def _add_plugin_commands(sub) -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairsift", description="Curate image-text pairs for CLIP training.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a curation job from a YAML spec")
    run.add_argument("job", help="job spec (YAML)")
    run.add_argument("--output", help="output folder (overrides the spec's output)")
    run.add_argument("--num-cpus", type=int, help="CPUs for local Ray / at most this many tasks at once")
    run.add_argument("--restart", action="store_true", help="discard the output folder's earlier run and start over")
    run.add_argument("--executor", choices=("ray", "local"), default="ray",
                     help="ray (default), or local: every task in this process, one after another (for debugging)")
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser("stats", help="funnel and score summaries of a finished job (DuckDB)")
    st.add_argument("output", help="the job's output folder")
    st.add_argument("--sql", help="run this query; tables `samples` and `rejected` are registered")
    st.set_defaults(func=_cmd_stats)
    sp = sub.add_parser("sample-pool", help="make the quickstart's sample pool (no network needed)")
    sp.add_argument("folder", help="where to write the WebDataset tars")
    sp.set_defaults(func=_cmd_sample_pool)
    _add_plugin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"pairsift: configuration error: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"pairsift: job failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
