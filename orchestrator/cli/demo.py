"""`shpeft demo`: the synthetic end-to-end job (what `make demo` runs), exiting with its code."""

from __future__ import annotations

import click

from orchestrator.cli.common import show_logs_option

__all__ = ["demo"]


@click.command(short_help="The synthetic end-to-end demo job on a local Ray.")
@click.option("--store", default=None, help="Folder or fsspec URI for the demo's data and outputs [default: ./demo-store].")
@click.option("--smoke-test", is_flag=True, help="Smallest settings (under 2 minutes on 2 CPUs).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs for the embedded Ray (default: all visible).")
@click.option("--all-methods", is_flag=True,
              help="Compare also the ablations (specific, agnostic, random masks at both densities, the other hybrid rule).")
@show_logs_option
def demo(store: str | None, smoke_test: bool, num_cpus: int | None, all_methods: bool) -> None:
    """Run the main job on a local embedded Ray: synthetic medical-like tasks, a small ViT pre-trained
    on a disjoint source corpus (shipped with shpeft), importance, sparse fine-tuning, a short sweep,
    then SH-PEFT at the job's density and at a paper-like 1e-3 beside head-only and full fine-tuning over
    3 seeds, each method's learning rate chosen on validation (shpeft compare).

    Example: shpeft demo --smoke-test
    """
    from orchestrator.workflows.demo import run_demo

    raise click.exceptions.Exit(int(run_demo(store, smoke_test, num_cpus=num_cpus, all_methods=all_methods)))
