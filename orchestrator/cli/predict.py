"""`shpeft predict`, `export`: finished task deltas used on images, or merged into a plain timm checkpoint.

Invariants: a delta, backbone or input that cannot be used is one line and exit 2 before any output is
written; folders, URIs and Parquet inputs go to Ray Data and need --output.
"""

from __future__ import annotations

import json

import click

from orchestrator.cli.common import EXIT_INVALID, console, fail

__all__ = ["predict", "export"]


@click.command(short_help="Predict images with several task deltas on one backbone (files, folders, Parquet).")
@click.option("--backbone", default=None, help="timm backbone name; default and check: the first delta's.")
@click.option("--backbone-source", default=None,
              help="Base weights ('hub', a file or URI); default: where the first delta says it was trained from.")
@click.option("--delta", "deltas", multiple=True, required=True, metavar="URI", help="A task delta (repeat for several tasks).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Classes shown per image and task (multi-label tasks show every finding).")
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
@click.option("--data-root", default=None, metavar="DIR",
              help="Parquet path column: paths must resolve under DIR [default: the Parquet file's folder].")
@click.option("--allow-urls", is_flag=True, help="Parquet path column: also read URLs (http://, s3://, ...) in the data.")
@click.argument("images", nargs=-1, required=True, metavar="INPUTS...")
def predict(backbone, backbone_source, deltas, top_k, batch_size, device, as_json, output, column, id_column,
            concurrency, address, num_cpus, data_root, allow_urls, images) -> None:
    """Predict INPUTS with several task deltas on one backbone instance.

    Every task runs in one forward per batch of images; the backbone is never written. A few local
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
            fail("folders, URIs and Parquet inputs are predicted on Ray Data: give --output OUT.parquet", EXIT_INVALID)
        from orchestrator.serving.batch_predict import predict_dataset

        try:
            res = predict_dataset(list(deltas), list(images), output, backbone=backbone,
                                  backbone_source=backbone_source, column=column, id_column=id_column,
                                  batch_size=batch_size, concurrency=concurrency, device=device,
                                  address=address, num_cpus=num_cpus, data_root=data_root, allow_urls=allow_urls)
        except (PredictError, DeltaError, StorageError, FileNotFoundError) as exc:
            fail(str(exc), EXIT_INVALID)
        click.echo(f"wrote {res['output']}: {res['rows']} rows ({res['images']} images x {len(deltas)} task(s)), "
                   f"{res['errors']} image(s) could not be decoded (see its error column)")
        return
    try:
        preds = predict_files(list(deltas), list(images), backbone=backbone, backbone_source=backbone_source,
                              batch_size=batch_size, device=device, top_k=top_k)
    except (PredictError, DeltaError, StorageError, FileNotFoundError) as exc:
        fail(str(exc), EXIT_INVALID)
    if as_json:
        for p in preds:
            click.echo(json.dumps({"task": p.task, "image": p.image, "label": p.label,
                                   "class_name": p.class_name, "probability": p.probability, "kind": p.kind}))
        return
    from orchestrator.reporting.tables import predictions_table

    console().print(predictions_table(preds, images))


@click.command(short_help="Merge a delta into a plain timm checkpoint (safetensors).")
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
    from orchestrator.serving.predict import PredictError
    from shpeft_core.delta import DeltaError
    from shpeft_core.io import StorageError

    if not out.endswith(".safetensors"):
        fail(f"--merged {out!r} must end in .safetensors", EXIT_INVALID)
    try:
        res = export_merged(delta, out, backbone_source=backbone_source)
    except FileNotFoundError as exc:  # the delta, or the backbone weights it names
        fail(str(exc), EXIT_INVALID)
    except (DeltaError, StorageError, PredictError) as exc:
        fail(str(exc), EXIT_INVALID)
    click.echo(
        f"wrote {res['uri']} ({res['bytes']} bytes, {res['tensors']} tensors, sha256 {res['sha256']}); "
        f"load with timm.create_model({res['backbone']!r}, num_classes={res['num_classes']})"
    )
