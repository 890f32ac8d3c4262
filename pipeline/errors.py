"""Errors the CLI turns into exit codes."""


class ConfigError(Exception):
    """Bad configuration: reported before any work starts, exit code 2, nothing written."""


class JobError(Exception):
    """A shard kept failing after its retries: names the shard and the cause."""
