"""What every command group shares: exit codes, the one-line failure, the console, job file loading and
checking, and the options several commands take.

Invariants: a command fails through ``fail`` (one ``error: ...`` line on stderr, then the exit code:
EXIT_FAILED for a runtime failure, EXIT_INVALID for input that cannot be used); a job file is loaded and
checked before anything is written or started. Only click is imported at load: the library modules a
command needs are imported when it runs, so ``shpeft --help`` starts without torch or Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import click

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "fail", "console", "invalid_input_exits", "validate_or_exit",
           "load_job_or_exit", "resolve_job_id", "show_logs_option", "address_option", "timeout_option"]

EXIT_FAILED = 1
EXIT_INVALID = 2


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def console():
    from rich.console import Console

    # Wide enough that catalogue tables do not wrap into unreadable columns when piped.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


@contextlib.contextmanager
def invalid_input_exits():
    """A store that cannot be used, or a job the backbone cannot serve, found once running: exit 2."""
    from orchestrator.job.spec import JobSpecError
    from shpeft_core.io import StorageError

    try:
        yield
    except (StorageError, JobSpecError) as exc:
        fail(str(exc), EXIT_INVALID)


def validate_or_exit(job, source: str, *, data: bool, cpus: float | None, gpus: float | None = None,
                     methods: list[str] | None = None) -> None:
    """Every pre-compute check (orchestrator.workflows.validate); all problems listed, exit 2 when there are any.
    ``methods``: the methods that will run when they are not the job's own (a comparison's)."""
    from orchestrator.workflows.validate import validate_job

    problems = validate_job(job, data=data, cpus=cpus, gpus=gpus, methods=methods)
    if problems:
        fail(f"job file {source} cannot run:\n" + "\n".join(f"  - {p}" for p in problems), EXIT_INVALID)


def load_job_or_exit(path: str):
    from orchestrator.job.load import load_job
    from orchestrator.job.spec import JobSpecError

    try:
        return load_job(path)
    except JobSpecError as exc:
        fail(str(exc), EXIT_INVALID)


def resolve_job_id(store: str, job: str) -> str:
    """JOB may be a job id or the job file it came from."""
    if os.path.isfile(job):
        from orchestrator.job.keys import job_id

        return job_id(load_job_or_exit(job))
    return job


def show_logs_option(f):
    def show(ctx, param, value):
        if value:  # Ray's and the workers' own log lines on the console, as SHPEFT_VERBOSE=1 does
            os.environ["SHPEFT_VERBOSE"] = "1"
        return value

    return click.option("--show-logs", is_flag=True, expose_value=False, callback=show,
                        help="Also print Ray's and the workers' own log lines (they always go to the store's logs/).")(f)


# The Jobs API commands: the cluster's dashboard and how long to wait for it.
address_option = click.option(
    "--address",
    required=True,
    envvar="RAY_API_SERVER_ADDRESS",
    show_envvar=True,
    help="Ray dashboard URL of the cluster's head, e.g. http://HEAD:8265.",
)
timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
    help="Seconds to wait for the dashboard to answer.",
)
