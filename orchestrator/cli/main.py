"""The `shpeft` command line: the click group and its commands, one module per command group.

Each command imports what it needs (torch, timm, ray) when it runs.
Exit codes: 0 success, 1 runtime failure (including tasks that failed in a job), 2 invalid input.
"""

from __future__ import annotations

import click

from orchestrator.cli.cluster import logs, status, submit
from orchestrator.cli.demo import demo
from orchestrator.cli.jobs import compare, run, schema, validate
from orchestrator.cli.predict import export, predict
from orchestrator.cli.results import list_, report, show
from orchestrator.cli.serve import serve
from orchestrator.cli.tasks import tasks_cli

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="shpeft")
def main() -> None:
    """Sparse hybrid PEFT: one backbone, many medical tasks, one small delta per task.

    Typical flow: `shpeft run job.yaml` (or `shpeft submit` to a Ray cluster), then
    `shpeft list STORE` / `shpeft show STORE JOB` / `shpeft report STORE JOB`, then `shpeft predict`
    or `shpeft export`.
    """


main.add_command(run)
main.add_command(compare)
main.add_command(validate)
main.add_command(schema)
main.add_command(submit)
main.add_command(status)
main.add_command(logs)
main.add_command(list_)
main.add_command(show)
main.add_command(report)
main.add_command(predict)
main.add_command(export)
main.add_command(serve)
main.add_command(demo)
main.add_command(tasks_cli)


if __name__ == "__main__":  # pragma: no cover
    main()
