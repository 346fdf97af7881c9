"""`shpeft submit`, `status`, `logs`: jobs on a Ray cluster through its Jobs API, and the logs a job keeps
in its store.

Invariants: a job file is checked (the checks that need no data) before anything is sent; a dashboard
that cannot be reached is one line and exit 1 within --timeout.
"""

from __future__ import annotations

import click

from orchestrator.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    address_option,
    fail,
    load_job_or_exit,
    resolve_job_id,
    show_logs_option,
    timeout_option,
    validate_or_exit,
)

__all__ = ["submit", "status", "logs"]


def _client(address: str, timeout: float):
    from orchestrator.runtime.jobs_api import JobsApiError, submission_client

    try:
        return submission_client(address, timeout=timeout)
    except JobsApiError as exc:
        fail(str(exc))


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env {pair!r} must be KEY=VALUE", EXIT_INVALID)
        env[key] = value
    return env


@click.command(short_help="Submit a job file to a Ray cluster; prints the submission id.")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@address_option
@click.option("--working-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder to upload with the job (must contain JOB.yaml); default: only the job file.")
@click.option("--submission-id", default=None, help="Your own id for the submission (default: Ray picks one).")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Environment variable for the job (repeatable).")
@click.option("--force", is_flag=True, help="Pass --force to `shpeft run` (or `compare`) on the cluster.")
@click.option("--compare", "compare_", is_flag=True, help="Run `shpeft compare` on the cluster instead of `shpeft run`.")
@click.option("--methods", default=None, metavar="M1,M2,...", help="With --compare: the methods to compare.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="With --compare: seeds per (task, method).")
@click.option("--smoke-test", is_flag=True, help="With --compare: one seed, one epoch, shpeft/linear/full only.")
@click.option("--agent-wait", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to keep retrying while a just-started cluster has no job agent yet.")
@timeout_option
@show_logs_option
def submit(job_file: str, address: str, working_dir: str | None, submission_id: str | None,
           env_pairs: tuple[str, ...], force: bool, compare_: bool, methods: str | None, seeds: int | None,
           smoke_test: bool, agent_wait: float, timeout: float) -> None:
    """Submit JOB.yaml to a Ray cluster through the Jobs API and print the submission id.

    The cluster runs `shpeft run JOB.yaml --address auto` (with --compare, `shpeft compare`);
    shpeft must be installed on its nodes and on the PATH of their `ray start` (cluster/README.md).
    The job file is validated locally first (exit 2 if invalid).

    Example: shpeft submit examples/medmnist224_vitb16_gpu.yaml --address http://HEAD:8265
    """
    from orchestrator.runtime.jobs_api import JobsApiError, submit_job_file
    from shpeft_core.io import StorageError, local_path

    job = load_job_or_exit(job_file)
    # The data and the store may be reachable only from the cluster: check what needs neither.
    validate_or_exit(job, job_file, data=False, cpus=None)
    env = _parse_env(env_pairs)
    extra = _compare_args(methods, seeds, smoke_test) if compare_ else ()
    if not compare_ and (methods or seeds or smoke_test):
        fail("--methods, --seeds and --smoke-test go with --compare", EXIT_INVALID)
    try:
        store_is_local = local_path(job.store) is not None
    except StorageError as exc:  # the cluster needs the backend, not this machine; reading results does
        click.echo(f"warning: {exc} (needed here to read the results)", err=True)
        store_is_local = False
    if store_is_local:
        click.echo(
            f"warning: store {job.store!r} is a local path; on a cluster it is written on the head node's "
            "disk. Use an object-store URI (s3://, gs://) to read results from here.",
            err=True,
        )
    client = _client(address, timeout)
    try:
        res = submit_job_file(client, job_file, working_dir=working_dir, submission_id=submission_id,
                              env_vars=env, extra_run_args=extra + (("--force",) if force else ()),
                              command="compare" if compare_ else "run", agent_wait=agent_wait,
                              on_wait=lambda msg: click.echo(f"waiting: {msg}", err=True))
    except JobsApiError as exc:
        fail(str(exc))
    click.echo(f"submitted: {res.entrypoint}", err=True)
    click.echo(f"follow with: shpeft logs {res.submission_id} --address {address} --follow", err=True)
    click.echo(res.submission_id)


def _compare_args(methods: str | None, seeds: int | None, smoke_test: bool) -> tuple[str, ...]:
    """`shpeft compare`'s options for the cluster, checked here first (exit 2)."""
    from orchestrator.workflows.compare import parse_methods

    if methods:
        try:
            parse_methods(methods)
        except ValueError as exc:
            fail(str(exc), EXIT_INVALID)
    return ((("--methods", methods) if methods else ()) + (("--seeds", str(seeds)) if seeds else ())
            + (("--smoke-test",) if smoke_test else ()))


@click.command(short_help="Status of a submitted job.")
@click.argument("submission_id")
@address_option
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 0 only if it succeeded.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between polls with --wait.")
@timeout_option
def status(submission_id: str, address: str, wait: bool, poll: float, timeout: float) -> None:
    """Print the status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).

    A job whose entrypoint could not start on the cluster (exit 127: `shpeft` not on the PATH of
    the head's `ray start`, and the like) is named as such, with what to do.

    Example: shpeft status raysubmit_abc123 --address http://HEAD:8265
    """
    import time

    from orchestrator.runtime.jobs_api import JobsApiError, describe_job, job_state

    client = _client(address, timeout)
    try:
        state = job_state(client, submission_id)
        while wait and not state.terminal:
            time.sleep(poll)
            state = job_state(client, submission_id)
    except JobsApiError as exc:
        fail(str(exc))
    click.echo("\n".join(describe_job(state, address)))
    if wait and state.status != "SUCCEEDED":
        raise click.exceptions.Exit(EXIT_FAILED)


@click.command(short_help="Logs of a job in a store (STORE JOB), or of a submitted job (SUBMISSION_ID).")
@click.argument("target", metavar="STORE JOB | SUBMISSION_ID")
@click.argument("job", required=False)
@click.option("--task", default=None, help="With STORE JOB: only this task's log.")
@click.option("--address", default=None, envvar="RAY_API_SERVER_ADDRESS", show_envvar=True,
              help="With SUBMISSION_ID: Ray dashboard URL of the cluster's head, e.g. http://HEAD:8265.")
@click.option("--follow", "-f", is_flag=True, help="Stream new log lines until the submitted job ends.")
@timeout_option
def logs(target: str, job: str | None, task: str | None, address: str | None, follow: bool, timeout: float) -> None:
    """Print a job's logs.

    With STORE JOB (a job id or its job file): the logs every run keeps in its store, local or on a
    cluster: driver.log (what the console said, and each failed task's traceback), then each task's
    worker output. With SUBMISSION_ID: the driver logs of a job submitted with `shpeft submit`.

    Examples: shpeft logs demo-store 3f2a9c1b0d4e --task pathology;
    shpeft logs raysubmit_abc123 --address http://HEAD:8265 --follow
    """
    if job is not None:
        from orchestrator.store.layout import normalise_store
        from orchestrator.runtime.tasklog import logs_dir, read_logs

        store = normalise_store(target)
        jid = resolve_job_id(store, job)
        found = read_logs(store, jid, task)
        if not found:
            what = f"task {task!r} of job {jid}" if task else f"job {jid}"
            fail(f"no logs for {what} under {logs_dir(store, jid)}", EXIT_INVALID)
        for name, text in found:
            if task is None:
                click.echo(f"==> {name}.log <==")
            click.echo(text, nl=False)
        return
    submission_id = target
    if not address:
        fail("a submitted job's logs need --address (or RAY_API_SERVER_ADDRESS); a job in a store: "
             "shpeft logs STORE JOB", EXIT_INVALID)
    from orchestrator.runtime.jobs_api import JobsApiError, follow_job_logs, job_logs

    client = _client(address, timeout)
    try:
        if follow:
            follow_job_logs(client, submission_id, lambda s: click.echo(s, nl=False))
        else:
            click.echo(job_logs(client, submission_id), nl=False)
    except JobsApiError as exc:
        fail(str(exc))
