"""The `shpeft` command line.

Each command imports what it needs (torch, timm, ray) when it runs.
Exit codes: 0 success, 1 runtime failure (including tasks that failed in a job), 2 invalid input.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import NoReturn

import click

from orchestrator.cli.tasks import tasks_cli

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_INVALID = 2


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _console():
    from rich.console import Console

    # Wide enough that catalogue tables do not wrap into unreadable columns when piped.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


@contextlib.contextmanager
def _invalid_input_exits():
    """A store that cannot be used, or a job the backbone cannot serve, found once running: exit 2."""
    from orchestrator.job.spec import JobSpecError
    from shpeft_core.io import StorageError

    try:
        yield
    except (StorageError, JobSpecError) as exc:
        _fail(str(exc), EXIT_INVALID)


def _validate_or_exit(job, source: str, *, data: bool, cpus: float | None, gpus: float | None = None) -> None:
    """Every pre-compute check (orchestrator.job.validate); all problems listed, exit 2 when there are any."""
    from orchestrator.job.validate import validate_job

    problems = validate_job(job, data=data, cpus=cpus, gpus=gpus)
    if problems:
        _fail(f"job file {source} cannot run:\n" + "\n".join(f"  - {p}" for p in problems), EXIT_INVALID)


def _show_logs_option(f):
    def show(ctx, param, value):
        if value:  # Ray's and the workers' own log lines on the console, as SHPEFT_VERBOSE=1 does
            os.environ["SHPEFT_VERBOSE"] = "1"
        return value

    return click.option("--show-logs", is_flag=True, expose_value=False, callback=show,
                        help="Also print Ray's and the workers' own log lines (they always go to the store's logs/).")(f)


def _load_job_or_exit(path: str):
    from orchestrator.job.spec import JobSpecError, load_job

    try:
        return load_job(path)
    except JobSpecError as exc:
        _fail(str(exc), EXIT_INVALID)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="shpeft")
def main() -> None:
    """Sparse hybrid PEFT: one backbone, many medical tasks, one small delta per task.

    Typical flow: `shpeft run job.yaml` (or `shpeft submit` to a Ray cluster), then
    `shpeft list STORE` / `shpeft show STORE JOB` / `shpeft report STORE JOB`, then `shpeft predict`
    or `shpeft export`.
    """


# ---------------------------------------------------------------- run / submit / status / logs


@main.command(short_help="Validate a job file and run it (local Ray or a cluster).")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to join (e.g. 'auto', HEAD:6379); default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the local embedded Ray (default: all visible).")
@click.option("--force", is_flag=True, help="Redo every task even if a verified delta exists.")
@click.option("--no-progress", is_flag=True, help="No progress view or per-task lines.")
@_show_logs_option
def run(job_file: str, address: str | None, num_cpus: int | None, force: bool, no_progress: bool) -> None:
    """Validate JOB.yaml and run it: shared importance, per-task fine-tuning, sweeps, catalogue.

    An invalid job file exits with code 2 before anything is written. The exit code is 1 when
    any task failed (the others still complete).

    Example: shpeft run examples/demo.yaml --num-cpus 2
    """
    job = _load_job_or_exit(job_file)
    _validate_or_exit(job, job_file, data=True, cpus=None if address else (num_cpus or os.cpu_count() or 1))
    from orchestrator.workflows.run import run_job

    with _invalid_input_exits():
        result = run_job(job, address=address, num_cpus=num_cpus, force=force, progress=not no_progress)
    raise click.exceptions.Exit(int(result.exit_code))


@main.command(short_help="Compare SH-PEFT with baselines (methods x tasks x seeds) and write a report.")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--methods", default=None, metavar="M1,M2,...",
              help="Methods to run (shpeft, shpeft:rank_sum, shpeft:union, specific, agnostic, random, gps, linear, "
                   "bitfit, lora, full) [default: all of them].")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per (task, method).")
@click.option("--address", default=None, help="Ray cluster to join; default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the local embedded Ray.")
@click.option("--force", is_flag=True, help="Redo runs whose verified artifact already exists.")
@click.option("--smoke-test", is_flag=True, help="One seed, one epoch, shpeft/linear/full only: a quick check.")
@click.option("--no-progress", is_flag=True, help="No per-run progress lines.")
@_show_logs_option
def compare(job_file: str, methods: str | None, seeds: int, address: str | None, num_cpus: int | None, force: bool,
            smoke_test: bool, no_progress: bool) -> None:
    """Run the job's tasks with SH-PEFT and the methods users would pick instead, in one harness.

    Every run uses the same data, transforms, schedule, epochs and evaluation of its saved artifact.
    Writes <store>/reports/<id>/results.parquet (one row per task, method and seed) and report.md with
    its plots, and prints the table of mean ± std test macro-F1.

    Example: shpeft compare examples/compare_medmnist224_vitb16_gpu.yaml --seeds 3
    """
    from orchestrator.workflows.compare import DEFAULT_METHODS, parse_methods

    job = _load_job_or_exit(job_file)
    _validate_or_exit(job, job_file, data=True, cpus=None if address else (num_cpus or os.cpu_count() or 1))
    try:
        chosen = parse_methods(methods) if methods else list(parse_methods(DEFAULT_METHODS))
    except ValueError as exc:
        _fail(str(exc), EXIT_INVALID)
    if smoke_test:
        job = job.model_copy(update={"training": job.training.model_copy(update={"epochs": 1})})
        seeds = 1
        if not methods:
            chosen = parse_methods("shpeft,linear,full")
    from orchestrator.workflows.compare import run_compare

    with _invalid_input_exits():
        result = run_compare(job, methods=[m if mix is None else f"{m}:{mix}" for m, mix in chosen], seeds=seeds,
                             address=address, num_cpus=num_cpus, force=force, progress=not no_progress)
    raise click.exceptions.Exit(int(result.exit_code))


@main.command(short_help="Check a job file before any compute: every problem, each naming its field.")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--num-cpus", type=float, default=None, help="CPUs of the cluster to check the workers against [default: this machine's].")
@click.option("--num-gpus", type=float, default=0.0, show_default=True, help="GPUs of the cluster.")
@click.option("--no-data", is_flag=True, help="Skip the checks that read the datasets and the store.")
def validate(job_file: str, num_cpus: float | None, num_gpus: float, no_data: bool) -> None:
    """Validate JOB.yaml without computing anything: the schema, the timm model and its kwargs, weight
    files, catalogue names and overrides, each dataset's files and format (listed, not decoded), the store
    (writable, backend installed), eligible weights, and whether one task's workers fit the cluster.
    `run` runs the same checks first; `submit` the ones that need no data access.

    Example: shpeft validate job.yaml --num-cpus 64 --num-gpus 8
    """
    job = _load_job_or_exit(job_file)
    _validate_or_exit(job, job_file, data=not no_data, cpus=num_cpus or os.cpu_count() or 1, gpus=num_gpus)
    click.echo(f"{job_file}: ok ({len(job.tasks)} task(s), backbone {job.backbone.name}, store {job.store})")


@main.command(short_help="Print the JSON schema of the job file (for editors).")
def schema() -> None:
    """Print the job file's JSON schema: every section and field with its type, default and help text.

    Example: shpeft schema > shpeft-job.schema.json
    """
    from orchestrator.job.spec import JobSpec

    click.echo(json.dumps(JobSpec.model_json_schema(), indent=1))


_address_option = click.option(
    "--address",
    required=True,
    envvar="RAY_API_SERVER_ADDRESS",
    show_envvar=True,
    help="Ray dashboard URL of the cluster's head, e.g. http://HEAD:8265.",
)
_timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
    help="Seconds to wait for the dashboard to answer.",
)


def _client(address: str, timeout: float):
    from orchestrator.runtime.jobs_api import JobsApiError, submission_client

    try:
        return submission_client(address, timeout=timeout)
    except JobsApiError as exc:
        _fail(str(exc))


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--env {pair!r} must be KEY=VALUE", EXIT_INVALID)
        env[key] = value
    return env


@main.command(short_help="Submit a job file to a Ray cluster; prints the submission id.")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@_address_option
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
@_timeout_option
@_show_logs_option
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

    job = _load_job_or_exit(job_file)
    # The data and the store may be reachable only from the cluster: check what needs neither.
    _validate_or_exit(job, job_file, data=False, cpus=None)
    env = _parse_env(env_pairs)
    extra = _compare_args(methods, seeds, smoke_test) if compare_ else ()
    if not compare_ and (methods or seeds or smoke_test):
        _fail("--methods, --seeds and --smoke-test go with --compare", EXIT_INVALID)
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
        _fail(str(exc))
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
            _fail(str(exc), EXIT_INVALID)
    return ((("--methods", methods) if methods else ()) + (("--seeds", str(seeds)) if seeds else ())
            + (("--smoke-test",) if smoke_test else ()))


@main.command(short_help="Status of a submitted job.")
@click.argument("submission_id")
@_address_option
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 0 only if it succeeded.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between polls with --wait.")
@_timeout_option
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
        _fail(str(exc))
    click.echo("\n".join(describe_job(state, address)))
    if wait and state.status != "SUCCEEDED":
        raise click.exceptions.Exit(EXIT_FAILED)


@main.command(short_help="Logs of a job in a store (STORE JOB), or of a submitted job (SUBMISSION_ID).")
@click.argument("target", metavar="STORE JOB | SUBMISSION_ID")
@click.argument("job", required=False)
@click.option("--task", default=None, help="With STORE JOB: only this task's log.")
@click.option("--address", default=None, envvar="RAY_API_SERVER_ADDRESS", show_envvar=True,
              help="With SUBMISSION_ID: Ray dashboard URL of the cluster's head, e.g. http://HEAD:8265.")
@click.option("--follow", "-f", is_flag=True, help="Stream new log lines until the submitted job ends.")
@_timeout_option
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
        jid = _resolve_job_id(store, job)
        found = read_logs(store, jid, task)
        if not found:
            what = f"task {task!r} of job {jid}" if task else f"job {jid}"
            _fail(f"no logs for {what} under {logs_dir(store, jid)}", EXIT_INVALID)
        for name, text in found:
            if task is None:
                click.echo(f"==> {name}.log <==")
            click.echo(text, nl=False)
        return
    submission_id = target
    if not address:
        _fail("a submitted job's logs need --address (or RAY_API_SERVER_ADDRESS); a job in a store: "
              "shpeft logs STORE JOB", EXIT_INVALID)
    from orchestrator.runtime.jobs_api import JobsApiError, follow_job_logs, job_logs

    client = _client(address, timeout)
    try:
        if follow:
            follow_job_logs(client, submission_id, lambda s: click.echo(s, nl=False))
        else:
            click.echo(job_logs(client, submission_id), nl=False)
    except JobsApiError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------- catalogue


_LIST_COLUMNS = ("job_id", "task", "status", "metric", "val", "test", "density", "alpha", "trainable", "bytes", "finished_at")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)) else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _metric_value(row: dict, split: str):
    metric = row.get("metric") or "macro_f1"
    return row.get(f"{split}_{metric}")


def _catalogue_rows(store: str, job: str | None) -> list[dict]:
    from orchestrator.store.results import read_catalogue

    try:
        return read_catalogue(store, job).to_pylist()
    except FileNotFoundError as exc:
        _fail(f"store {store} cannot be read: {exc}")


def _resolve_job_id(store: str, job: str) -> str:
    """JOB may be a job id or the job file it came from."""
    if os.path.isfile(job):
        from orchestrator.job.spec import job_id

        return job_id(_load_job_or_exit(job))
    return job


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


@main.command("list", short_help="The catalogue of a store: every job and task.")
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
    from rich.table import Table

    table = Table(title=f"catalogue of {store}")
    for col in _LIST_COLUMNS:
        table.add_column(col, justify="right" if col in ("val", "test", "density", "alpha", "trainable", "bytes") else "left")
    for r in sorted(rows, key=lambda r: (r.get("started_at") or "", r["job_id"], r["task"])):
        cells = {**r, "val": _metric_value(r, "val"), "test": _metric_value(r, "test")}
        table.add_row(*[_fmt(cells.get(c)) for c in _LIST_COLUMNS])
    _console().print(table)


@main.command(short_help="Every catalogue field of one job.")
@click.argument("store")
@click.argument("job")
@click.option("--task", default=None, help="Only this task.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of tables.")
def show(store: str, job: str, task: str | None, as_json: bool) -> None:
    """Show every catalogue field of one job (JOB = a job id from `shpeft list`, or its job file).

    Example: shpeft show ./demo-store 3f2a9c0d1e4b
    """
    jid = _resolve_job_id(store, job)
    rows = _catalogue_rows(store, jid)
    if not rows:
        known = sorted({r["job_id"] for r in _catalogue_rows(store, None)})
        _fail(f"no job {jid!r} in the catalogue of {store}; known jobs: {known or 'none'}")
    if task is not None:
        rows = [r for r in rows if r["task"] == task]
        if not rows:
            _fail(f"job {jid} has no task {task!r}")
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=1))
        return
    from rich.table import Table

    console = _console()
    for r in rows:
        table = Table(title=f"job {jid} · task {r['task']} · {r.get('status')}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in r.items():
            if value is not None and key not in ("job_id", "task"):
                table.add_row(key, _fmt(value))
        console.print(table)


@main.command(short_help="Write a job's report: learning curves, confusion matrices, per-class metrics, sweeps.")
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

    jid = _resolve_job_id(store, job)
    with _invalid_input_exits():
        try:
            uri, _ = write_job_report(store, jid)
        except JobReportError as exc:
            _fail(str(exc), EXIT_INVALID)
    click.echo(uri)


# ---------------------------------------------------------------- predict / export


@main.command(short_help="Predict images with several task deltas on one backbone (files, folders, Parquet).")
@click.option("--backbone", default=None, help="timm backbone name; default and check: the first delta's.")
@click.option("--backbone-source", default=None,
              help="Base weights ('hub', a file or URI); default: where the first delta says it was trained from.")
@click.option("--delta", "deltas", multiple=True, required=True, metavar="URI", help="A task delta (repeat for several tasks).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classes shown per image and task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print predictions as JSON lines.")
@click.option("--output", default=None, metavar="OUT.parquet",
              help="Write every probability to a Parquet dataset (Ray Data); implied for folders, URIs and Parquet.")
@click.option("--column", default="image", show_default=True,
              help="Parquet input: the column with image bytes (binary), image paths (string) or an image struct.")
@click.option("--id-column", default=None, help="Parquet input: the column that identifies a row in the output.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Data: predictor actors (each holds one backbone and every delta).")
@click.option("--address", default=None, help="Ray Data: cluster to join; default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="Ray Data: CPUs for the local embedded Ray.")
@click.argument("images", nargs=-1, required=True, metavar="INPUTS...")
def predict(backbone, backbone_source, deltas, top_k, batch_size, device, as_json, output, column, id_column,
            concurrency, address, num_cpus, images) -> None:
    """Predict INPUTS with several task deltas on one backbone instance.

    Each delta is applied in turn (one forward per batch per task) and removed again. A few local
    image files are predicted here and printed. Folders, fsspec URIs/prefixes (s3://, gs://,
    file://, ...) and Parquet datasets, or any input with --output, run on Ray Data and write a
    Parquet dataset with one row per image and task (every class's probability, the delta's sha256,
    and an error message for an image that cannot be decoded).

    Examples:

      shpeft predict --delta store/deltas/busi.safetensors --delta store/deltas/covid_ct.safetensors scan1.png scan2.png

      shpeft predict --delta store/deltas/busi.safetensors s3://bucket/scans/ --output preds.parquet --concurrency 4
    """
    from orchestrator.serving.batch_predict import needs_dataset
    from orchestrator.serving.predict import PredictError, predict_files
    from shpeft_core.delta import DeltaError
    from shpeft_core.io import StorageError

    if output is not None or needs_dataset(images):
        if output is None:
            _fail("folders, URIs and Parquet inputs are predicted on Ray Data: give --output OUT.parquet", EXIT_INVALID)
        from orchestrator.serving.batch_predict import predict_dataset

        try:
            res = predict_dataset(list(deltas), list(images), output, backbone=backbone,
                                  backbone_source=backbone_source, column=column, id_column=id_column,
                                  batch_size=batch_size, concurrency=concurrency, device=device,
                                  address=address, num_cpus=num_cpus)
        except (PredictError, DeltaError, StorageError, FileNotFoundError) as exc:
            _fail(str(exc), EXIT_INVALID)
        click.echo(f"wrote {res['output']}: {res['rows']} rows ({res['images']} images x {len(deltas)} task(s)), "
                   f"{res['errors']} image(s) could not be decoded (see its error column)")
        return
    try:
        preds = predict_files(list(deltas), list(images), backbone=backbone, backbone_source=backbone_source,
                              batch_size=batch_size, device=device, top_k=top_k)
    except (PredictError, DeltaError, StorageError, FileNotFoundError) as exc:
        _fail(str(exc), EXIT_INVALID)
    if as_json:
        for p in preds:
            click.echo(json.dumps({"task": p.task, "image": p.image, "label": p.label,
                                   "class_name": p.class_name, "probability": p.probability}))
        return
    from rich.table import Table

    table = Table(title="predictions")
    for col in ("image", "task", "class", "label", "probability"):
        table.add_column(col, justify="right" if col in ("label", "probability") else "left")
    for p in sorted(preds, key=lambda p: (images.index(p.image), p.task)):
        table.add_row(p.image, p.task, p.class_name, str(p.label), f"{p.probability:.4f}")
    _console().print(table)


@main.command(short_help="Merge a delta into a plain timm checkpoint (safetensors).")
@click.argument("delta", metavar="DELTA")
@click.option("--merged", "out", required=True, metavar="OUT.safetensors", help="Where to write the merged timm checkpoint.")
@click.option("--backbone-source", default=None, help="Base weights to merge into; default: the delta's backbone_source.")
def export(delta: str, out: str, backbone_source: str | None) -> None:
    """Merge DELTA into its backbone and write a plain timm checkpoint (safetensors).

    The file loads into timm.create_model(backbone, num_classes=N, **backbone_kwargs), values in
    its header metadata, with no shpeft installed.

    Example: shpeft export store/deltas/busi.safetensors --merged busi_vitb16.safetensors
    """
    from orchestrator.serving.export import export_merged
    from shpeft_core.delta import DeltaError
    from shpeft_core.io import StorageError

    if not out.endswith(".safetensors"):
        _fail(f"--merged {out!r} must end in .safetensors", EXIT_INVALID)
    try:
        res = export_merged(delta, out, backbone_source=backbone_source)
    except FileNotFoundError as exc:  # the delta, or the backbone weights it names
        _fail(str(exc), EXIT_INVALID)
    except (DeltaError, StorageError) as exc:
        _fail(str(exc), EXIT_INVALID)
    click.echo(
        f"wrote {res['uri']} ({res['bytes']} bytes, {res['tensors']} tensors, sha256 {res['sha256']}); "
        f"load with timm.create_model({res['backbone']!r}, num_classes={res['num_classes']})"
    )


# ---------------------------------------------------------------- serve


@main.command(short_help="Serve many task deltas from one backbone over HTTP (Ray Serve).")
@click.argument("job_file", metavar="[JOB.yaml]", required=False, type=click.Path(dir_okay=False))
@click.option("--backbone", default=None, help="timm backbone name (instead of a job file's backbone section).")
@click.option("--backbone-source", default=None, help="With --backbone: 'hub', a weights file or URI; default: random init.")
@click.option("--backbone-kwargs", default=None, metavar="JSON", help='With --backbone: timm.create_model kwargs, e.g. \'{"img_size": 224}\'.')
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0 to listen on every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--route-prefix", default="/", show_default=True, help="URL path the app answers under.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Replicas, each with one backbone.")
@click.option("--max-deltas-per-replica", type=click.IntRange(min=1), default=16, show_default=True,
              help="Deltas each replica keeps loaded (least recently used are dropped).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests batched into one pass (grouped by delta).")
@click.option("--delta-root", default=None, metavar="URI",
              help="Serve only deltas under this folder or URI; relative delta ids are resolved against it.")
@click.option("--device", default="cpu", show_default=True, help="torch device of each replica, e.g. cuda.")
@click.option("--address", default=None, help="Ray cluster to join; default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the local embedded Ray.")
def serve(job_file, backbone, backbone_source, backbone_kwargs, host, port, route_prefix, replicas,
          max_deltas_per_replica, max_batch_size, delta_root, device, address, num_cpus) -> None:
    """Serve task deltas over HTTP: one backbone per replica, any delta chosen per request.

    POST image bytes (PNG/JPEG/... or DICOM) with the header `serve_multiplexed_model_id: DELTA_URI`;
    the answer is JSON with the task, class index and name, and every class's probability. The
    backbone comes from JOB.yaml's backbone section or from --backbone; every delta must have been
    trained on those weights. Runs until Ctrl-C.

    Example: shpeft serve examples/demo.yaml --delta-root demo-store/deltas --port 8000
    """
    from orchestrator.stages.task_run import build_backbone

    if bool(job_file) == bool(backbone):
        _fail("give either a job file (its backbone section) or --backbone NAME", EXIT_INVALID)
    if job_file:
        if backbone_source or backbone_kwargs:
            _fail("--backbone-source and --backbone-kwargs go with --backbone, not a job file", EXIT_INVALID)
        spec = _load_job_or_exit(job_file).backbone.model_dump(mode="json")
    else:
        try:
            kwargs = json.loads(backbone_kwargs) if backbone_kwargs else {}
        except json.JSONDecodeError as exc:
            _fail(f"--backbone-kwargs is not JSON: {exc}", EXIT_INVALID)
        if not isinstance(kwargs, dict):
            _fail("--backbone-kwargs must be a JSON object", EXIT_INVALID)
        spec = {"name": backbone, "source": backbone_source, "kwargs": kwargs}
    if not route_prefix.startswith("/"):
        _fail(f"--route-prefix {route_prefix!r} must start with '/'", EXIT_INVALID)
    if delta_root and "://" not in delta_root:
        delta_root = os.path.abspath(delta_root)
    try:  # here, so a wrong name or missing weights is one line, not a replica that never starts
        build_backbone(spec, 1)
    except (OSError, ValueError, RuntimeError) as exc:
        _fail(f"backbone {spec['name']!r} from {spec.get('source')!r} cannot be built: {exc}", EXIT_INVALID)

    import signal
    import time

    from ray import serve as ray_serve

    from orchestrator.runtime.console import quiet_frameworks
    from orchestrator.runtime.resources import connect_ray
    from orchestrator.serving.server import APP_NAME, MODEL_ID_HEADER, build_app, start

    def _stop(signum, frame):
        raise KeyboardInterrupt

    quiet_frameworks()
    started = connect_ray(address, num_cpus)
    signal.signal(signal.SIGTERM, _stop)  # after Ray's own handler: a service manager's stop acts like Ctrl-C
    try:
        app = build_app(spec, replicas=replicas, max_deltas=max_deltas_per_replica, delta_root=delta_root,
                        device=device, max_batch_size=max_batch_size)
        try:
            url = start(app, host=host, port=port, route_prefix=route_prefix)
        except RuntimeError as exc:  # a replica that failed to start, a port in use
            _fail(f"the serve application did not start: {exc}")
        example = "busi/<job_id>-<hash>.safetensors" if delta_root else "/path/to/store/deltas/busi/<job_id>-<hash>.safetensors"
        click.echo(f"serving backbone {spec['name']} at {url} ({replicas} replica(s), up to "
                   f"{max_deltas_per_replica} deltas each); Ctrl-C stops")
        click.echo(f"  curl -X POST --data-binary @scan.png -H '{MODEL_ID_HEADER}: {example}' {url}")
        click.echo(f"  curl {url.rstrip('/')}/-/backbone")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        import ray

        if started:  # the embedded Ray goes, and Serve with it
            ray.shutdown()
        else:  # on a shared cluster only this application goes
            ray_serve.delete(APP_NAME)


# ---------------------------------------------------------------- demo


@main.command(short_help="The synthetic end-to-end demo job on a local Ray.")
@click.option("--store", default=None, help="Folder or fsspec URI for the demo's data and outputs [default: ./demo-store].")
@click.option("--smoke-test", is_flag=True, help="Smallest settings (under 2 minutes on 2 CPUs).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the embedded Ray (default: all visible).")
@click.option("--all-methods", is_flag=True,
              help="Compare also the ablations (specific, agnostic, random masks, the other hybrid rule).")
@_show_logs_option
def demo(store: str | None, smoke_test: bool, num_cpus: int | None, all_methods: bool) -> None:
    """Run the main job on a local embedded Ray: synthetic medical-like tasks, a small ViT pre-trained
    on a disjoint source corpus (shipped with shpeft), importance, sparse fine-tuning, a short sweep,
    then SH-PEFT beside head-only and full fine-tuning over 3 seeds (shpeft compare).

    Example: shpeft demo --smoke-test
    """
    from orchestrator.workflows.demo import run_demo

    raise click.exceptions.Exit(int(run_demo(store, smoke_test, num_cpus=num_cpus, all_methods=all_methods)))


main.add_command(tasks_cli)


if __name__ == "__main__":  # pragma: no cover
    main()
