"""`shpeft run`, `compare`, `validate`, `schema`: a job file checked, then run here or on a cluster Ray joins.

Invariants: an invalid job file exits 2 before anything is written or Ray starts; `run` and `compare`
exit with their workflow's code (1 when any task or run failed).
"""

from __future__ import annotations

import json
import os

import click

from orchestrator.cli.common import (
    EXIT_INVALID,
    fail,
    invalid_input_exits,
    load_job_or_exit,
    show_logs_option,
    validate_or_exit,
)

__all__ = ["run", "compare", "validate", "schema"]


@click.command(short_help="Validate a job file and run it (local Ray or a cluster).")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to join (e.g. 'auto', HEAD:6379); default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the local embedded Ray (default: all visible).")
@click.option("--force", is_flag=True, help="Redo every task even if a verified delta exists.")
@click.option("--no-progress", is_flag=True, help="No progress view or per-task lines.")
@show_logs_option
def run(job_file: str, address: str | None, num_cpus: int | None, force: bool, no_progress: bool) -> None:
    """Validate JOB.yaml and run it: shared importance, per-task fine-tuning, sweeps, catalogue.

    An invalid job file exits with code 2 before anything is written. The exit code is 1 when
    any task failed (the others still complete).

    Example: shpeft run examples/demo.yaml --num-cpus 2
    """
    job = load_job_or_exit(job_file)
    validate_or_exit(job, job_file, data=True, cpus=None if address else (num_cpus or os.cpu_count() or 1))
    from orchestrator.workflows.run import run_job

    with invalid_input_exits():
        result = run_job(job, address=address, num_cpus=num_cpus, force=force, progress=not no_progress)
    raise click.exceptions.Exit(int(result.exit_code))


def _methods_help() -> str:
    """The registered methods, a hybrid with each of its rules (``shpeft:rank_sum``)."""
    from shpeft_core.methods import all_methods
    from shpeft_core.options import MIXES

    return ", ".join(m.name + "".join(f", {m.name}:{mix}" for mix in MIXES) * m.takes_mix for m in all_methods())


@click.command(short_help="Compare SH-PEFT with baselines (methods x tasks x seeds) and write a report.")
@click.argument("job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--methods", default=None, metavar="M1,M2,...",
              help=f"Methods to run ({_methods_help()}) [default: all of them].")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per (task, method).")
@click.option("--address", default=None, help="Ray cluster to join; default: a local embedded Ray.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the local embedded Ray.")
@click.option("--force", is_flag=True, help="Redo runs whose verified artifact already exists.")
@click.option("--smoke-test", is_flag=True, help="One seed, one epoch, shpeft/linear/full only: a quick check.")
@click.option("--tune-points", type=click.IntRange(min=0), default=3, show_default=True,
              help="Learning rates tried per (task, method) on validation, on a log grid around the method's "
              "default (x3 apart); 0: no tuning. A method pinned by the job's method.lr is not tuned.")
@click.option("--tune-extensions", type=click.IntRange(min=0), default=2, show_default=True,
              help="Where an end of the grid wins, try one more rate a step beyond it, at most this many times.")
@click.option("--fixed-importance", is_flag=True,
              help="Every seed uses the importance maps and warm head of training.seed [default: each seed draws its own].")
@click.option("--equal-budget", is_flag=True, help="Every mask method (gps included) selects the job's k.")
@click.option("--reference", default="shpeft", show_default=True, metavar="METHOD[@DENSITY]",
              help="The method the report's paired statistics compare every other against.")
@click.option("--no-progress", is_flag=True, help="No per-run progress lines.")
@show_logs_option
def compare(job_file: str, methods: str | None, seeds: int, address: str | None, num_cpus: int | None, force: bool,
            smoke_test: bool, tune_points: int, tune_extensions: int, fixed_importance: bool, equal_budget: bool,
            reference: str, no_progress: bool) -> None:
    """Run the job's tasks with SH-PEFT and the methods users would pick instead, in one harness.

    Every run uses the same data, transforms, schedule, epochs and evaluation of its saved artifact;
    each method's learning rate is chosen on validation first (training.lr is not used; method.lr pins
    one). M@DENSITY runs a mask method at its own density (e.g. shpeft@0.001). Writes
    <store>/reports/<id>/results.parquet (one row per task, method and seed), tuning.parquet and
    report.md (paired differences against --reference with 95% intervals and Holm-adjusted p-values)
    with its plots, and prints the table of mean ± std test macro-F1.

    Example: shpeft compare examples/compare_medmnist224_vitb16_gpu.yaml --seeds 3
    """
    job = load_job_or_exit(job_file)
    from orchestrator.workflows.compare import compare_settings, parse_methods, run_compare

    try:
        job, chosen, seeds = compare_settings(job, methods, seeds, smoke_test=smoke_test)
    except ValueError as exc:
        fail(str(exc), EXIT_INVALID)
    validate_or_exit(job, job_file, data=True, cpus=None if address else (num_cpus or os.cpu_count() or 1),
                     methods=[m.partition("@")[0].partition(":")[0] for m in chosen])
    compared = [m.partition("@")[0].partition(":")[0] for m in chosen]
    try:  # a method name, or one --methods entry (e.g. shpeft@0.001 where shpeft runs at two densities)
        named = reference in compared or parse_methods([reference])[0] in parse_methods(chosen)
    except ValueError:
        named = False
    if not named:
        fail(f"--reference: {reference!r} is not among the methods compared ({', '.join(chosen)}); name one of them with --reference", EXIT_INVALID)
    with invalid_input_exits():
        result = run_compare(job, methods=chosen, seeds=seeds, address=address, num_cpus=num_cpus, force=force,
                             progress=not no_progress, tune=tune_points > 0, tune_points=tune_points,
                             tune_extensions=tune_extensions,
                             fixed_importance=fixed_importance, equal_budget=equal_budget, reference=reference)
    raise click.exceptions.Exit(int(result.exit_code))


@click.command(short_help="Check a job file before any compute: every problem, each naming its field.")
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
    from orchestrator.job.agnostic import agnostic_notes

    job = load_job_or_exit(job_file)
    validate_or_exit(job, job_file, data=not no_data, cpus=num_cpus or os.cpu_count() or 1, gpus=num_gpus)
    click.echo(f"{job_file}: ok ({len(job.tasks)} task(s), backbone {job.backbone.name}, store {job.store})")
    for note in agnostic_notes(job):
        click.echo(f"note: {note}")


@click.command(short_help="Print the JSON schema of the job file (for editors).")
def schema() -> None:
    """Print the job file's JSON schema: every section and field with its type, default and help text.

    Example: shpeft schema > shpeft-job.schema.json
    """
    from orchestrator.job.spec import JobSpec

    click.echo(json.dumps(JobSpec.model_json_schema(), indent=1))
