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
import warnings

from pairsift.pipeline.errors import ConfigError, JobError


def _cmd_run(args) -> int:
    from pairsift.pipeline.runner import run_job
    from pairsift.pipeline.manifest import format_summary
    from pairsift.pipeline.spec import load_job

    output = args.output
    if output and "://" not in output:  # URLs (s3://, gs://) are left as they are
        output = os.path.abspath(output)
    spec = load_job(args.job, output=output, num_cpus=args.num_cpus)
    if args.cache is not None:
        spec.cache = os.path.abspath(args.cache) if args.cache and "://" not in args.cache else args.cache
    result = run_job(spec, restart=args.restart, executor=args.executor)
    print(format_summary(result.manifest))
    print(f"\noutput: {result.output}  (pairsift stats {result.output})")
    report = os.path.join(result.output, "report.html")
    if "://" not in result.output and os.path.isfile(report):
        opener = "open" if sys.platform == "darwin" else "xdg-open"
        print(f"report: {report}\n  open it with `{opener} {report}`, or from another machine: "
              f"`python -m http.server 8000 -d {result.output}` there, then http://HOST:8000/report.html")
    return 0


def _cmd_stats(args) -> int:
    from pairsift.pipeline.stats import print_stats, run_sql

    if args.what_if:
        from pairsift.pipeline.whatif import format_what_if, what_if

        print(format_what_if(what_if(args.output, args.what_if)))
    elif args.sql:
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
    run.add_argument("--cache", help="compute cache folder, shared by outputs (default OUT/_cache; '' for none)")
    run.add_argument("--executor", choices=("ray", "local"), default="ray",
                     help="ray (default), or local: every task in this process, one after another (for debugging)")
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser("stats", help="funnel and score summaries of a finished job (DuckDB)")
    st.add_argument("output", help="the job's output folder")
    st.add_argument("--sql", help="run this query; tables `samples` and `rejected` are registered")
    st.add_argument("--what-if", action="append", metavar="STAGE.FIELD=VALUE",
                    help="the funnel this decision would give, from the stored columns (repeatable), "
                         "e.g. --what-if clip_score.min_score=0.3")
    st.set_defaults(func=_cmd_stats)
    sp = sub.add_parser("sample-pool", help="make the quickstart's sample pool (no network needed)")
    sp.add_argument("folder", help="where to write the WebDataset tars")
    sp.set_defaults(func=_cmd_sample_pool)
    _add_plugin_commands(sub)
    return p


#: Messages of other libraries that mean nothing to someone running a job: (logger, start of the
#: message). Ray's notice that a local cluster uses token authentication (it stays on), and its
#: note that ray.init ran outside the main thread.
QUIET_MESSAGES = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
    ("ray._private.worker", "SIGTERM handler is not set"),
)
#: Warning categories about the libraries' own APIs (deprecations), not about the data.
QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Keep library noise off a newcomer's terminal, for this process and the local Ray it
    starts (its workers inherit the environment): the messages in :data:`QUIET_MESSAGES` and
    warnings of :data:`QUIET_CATEGORIES`. ``pairsift -v`` keeps everything. Nothing is
    switched off: Ray's token authentication stays as Ray sets it."""
    by_logger: dict[str, list[str]] = {}
    for name, start in QUIET_MESSAGES:
        by_logger.setdefault(name, []).append(start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(tuple(starts)))
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    if "PYTHONWARNINGS" not in os.environ:  # Ray workers are new interpreters: they read this
        os.environ["PYTHONWARNINGS"] = ",".join(f"ignore::{c.__name__}" for c in QUIET_CATEGORIES)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        quiet_third_party()
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
