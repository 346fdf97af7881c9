"""`shpeft serve`: many task deltas over HTTP from one backbone per replica (Ray Serve), until Ctrl-C.

Invariants: the options are checked, and the backbone built once, before Ray starts (exit 2 naming the
option or the backbone); what runs, and the clean-up however it ends, is
``orchestrator.serving.server.serve_until_stopped``.
"""

from __future__ import annotations

import json
import os
import sys

import click

from orchestrator.cli.common import EXIT_FAILED, EXIT_INVALID, fail, load_job_or_exit

__all__ = ["serve"]


@click.command(short_help="Serve many task deltas from one backbone over HTTP (Ray Serve).")
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
              help="Requests batched into one pass, whatever deltas they name.")
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
    if bool(job_file) == bool(backbone):
        fail("give either a job file (its backbone section) or --backbone NAME", EXIT_INVALID)
    if job_file:
        if backbone_source or backbone_kwargs:
            fail("--backbone-source and --backbone-kwargs go with --backbone, not a job file", EXIT_INVALID)
        spec = load_job_or_exit(job_file).backbone.model_dump(mode="json")
    else:
        try:
            kwargs = json.loads(backbone_kwargs) if backbone_kwargs else {}
        except json.JSONDecodeError as exc:
            fail(f"--backbone-kwargs is not JSON: {exc}", EXIT_INVALID)
        if not isinstance(kwargs, dict):
            fail("--backbone-kwargs must be a JSON object", EXIT_INVALID)
        spec = {"name": backbone, "source": backbone_source, "kwargs": kwargs}
    if not route_prefix.startswith("/"):
        fail(f"--route-prefix {route_prefix!r} must start with '/'", EXIT_INVALID)
    if delta_root and "://" not in delta_root:
        delta_root = os.path.abspath(delta_root)

    from orchestrator.serving.server import MODEL_ID_HEADER, ServeError, serve_until_stopped

    def started(url: str) -> None:
        example = "busi/<job_id>-<hash>.safetensors" if delta_root else "/path/to/store/deltas/busi/<job_id>-<hash>.safetensors"
        click.echo(f"serving backbone {spec['name']} at {url} ({replicas} replica(s), up to "
                   f"{max_deltas_per_replica} deltas each); Ctrl-C stops")
        click.echo(f"  curl -X POST --data-binary @scan.png -H '{MODEL_ID_HEADER}: {example}' {url}")
        click.echo(f"  curl {url.rstrip('/')}/-/backbone")
        sys.stdout.flush()

    try:
        serve_until_stopped(spec, host=host, port=port, route_prefix=route_prefix, replicas=replicas,
                            max_deltas=max_deltas_per_replica, max_batch_size=max_batch_size, delta_root=delta_root,
                            device=device, address=address, num_cpus=num_cpus, on_start=started,
                            on_stop=lambda: click.echo("stopping"))
    except ServeError as exc:  # the backbone cannot be built (input), or the application did not start
        fail(str(exc), EXIT_INVALID if exc.status < 500 else EXIT_FAILED)
