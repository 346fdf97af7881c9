"""`shpeft list`, `show`, `report`: what a store's catalogue holds, and one job's report.

Invariants: a JOB argument is a job id or the job file it came from; `--json` prints the catalogue rows
themselves (NaN as null); a store that cannot be read is one line and exit 1.
"""

from __future__ import annotations

import json
import math

import click

from orchestrator.cli.common import EXIT_INVALID, console, fail, invalid_input_exits, resolve_job_id

__all__ = ["list_", "show", "report"]


def _catalogue_rows(store: str, job: str | None) -> list[dict]:
    from orchestrator.store.results import CatalogueError, read_catalogue

    try:
        return read_catalogue(store, job, on_damaged=lambda msg: click.echo(f"warning: {msg}", err=True)).to_pylist()
    except FileNotFoundError as exc:
        fail(f"store {store} cannot be read: {exc}")
    except CatalogueError as exc:
        fail(str(exc), EXIT_INVALID)


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


@click.command("list", short_help="The catalogue of a store: every job and task.")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def list_(store: str, as_json: bool) -> None:
    """List every job and task in the catalogue of STORE (a folder or fsspec URI).

    'val' and 'test' show each task's selection metric (column 'metric').

    Example: shpeft list ./demo-store
    """
    rows = _catalogue_rows(store, None)
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=1))
        return
    if not rows:
        click.echo(f"no jobs in the catalogue of {store}")
        return
    from orchestrator.reporting.tables import catalogue_table

    console().print(catalogue_table(store, rows))


@click.command(short_help="Every catalogue field of one job.")
@click.argument("store")
@click.argument("job")
@click.option("--task", default=None, help="Only this task.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of tables.")
def show(store: str, job: str, task: str | None, as_json: bool) -> None:
    """Show every catalogue field of one job (JOB = a job id from `shpeft list`, or its job file).

    Example: shpeft show ./demo-store 3f2a9c0d1e4b
    """
    jid = resolve_job_id(store, job)
    rows = _catalogue_rows(store, jid)
    if not rows:
        known = sorted({r["job_id"] for r in _catalogue_rows(store, None)})
        fail(f"no job {jid!r} in the catalogue of {store}; known jobs: {known or 'none'}")
    if task is not None:
        rows = [r for r in rows if r["task"] == task]
        if not rows:
            fail(f"job {jid} has no task {task!r}")
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=1))
        return
    from orchestrator.reporting.tables import job_row_tables

    out = console()
    for table in job_row_tables(jid, rows):
        out.print(table)


@click.command(short_help="Write a job's report: learning curves, confusion matrices, per-class metrics, sweeps.")
@click.argument("store")
@click.argument("job")
def report(store: str, job: str) -> None:
    """Write the report of one job (JOB = a job id from `shpeft list`, or its job file) for clinicians
    and reviewers: per task the learning curves, the test confusion matrix, per-class sensitivity,
    specificity and one-vs-rest AUC with their macro values, and the sweep's trials; where the selected
    weights sit. Writes STORE/plots/JOB_ID/report.md with its PNGs, and report.json with the same
    numbers; prints the report's path. `shpeft run` writes it at the end of every job.

    Example: shpeft report ./demo-store 3f2a9c0d1e4b
    """
    from orchestrator.reporting.job_report import JobReportError, write_job_report

    jid = resolve_job_id(store, job)
    with invalid_input_exits():
        try:
            uri, _ = write_job_report(store, jid)
        except JobReportError as exc:
            fail(str(exc), EXIT_INVALID)
    click.echo(uri)
