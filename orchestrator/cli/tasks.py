"""`shpeft tasks ...`: list the catalogue, check a dataset before training on it."""

from __future__ import annotations

import json
import sys

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.catalogue import CATALOGUE
from tasks.formats import CLASSES_FROM_LAYOUT
from tasks.spec import FORMATS, TaskSpec

__all__ = ["tasks_cli"]


@click.group(name="tasks")
def tasks_cli() -> None:
    """Medical task catalogue and dataset checks."""


@tasks_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def list_cmd(as_json: bool) -> None:
    """The built-in catalogue of medical datasets."""
    if as_json:
        click.echo(json.dumps({k: {"title": e.title, "modality": e.modality, "classes": list(e.class_names),
                                   "licence": e.licence, "obtain": e.obtain, "format": e.format}
                               for k, e in CATALOGUE.items()}, indent=2))
        return
    table = Table(title="shpeft task catalogue", show_lines=False)
    for col in ("key", "modality", "classes", "format", "size", "licence", "where to obtain"):
        table.add_column(col, overflow="fold")
    for key, e in CATALOGUE.items():
        classes = f"{e.num_classes}" + (" (multi-label)" if e.multilabel else "")
        table.add_row(key, e.modality, classes, e.format, e.size_note, e.licence, e.obtain)
    Console(width=200).print(table)


@tasks_cli.command("check")
@click.argument("uri")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Dataset format.")
@click.option("--num-classes", type=int, default=None,
              help="Number of classes, checked against the data (default: from --class-names, the catalogue entry, "
                   "or the class folders of imagefolder and dicom).")
@click.option("--class-names", default=None, help="Comma-separated class names in label order.")
@click.option("--name", default="check", show_default=True, help="Task name (a slug).")
@click.option("--catalogue", "catalogue_key", default=None, help="Take classes and modality from this catalogue entry.")
@click.option("--image-size", type=int, default=None)
@click.option("--image-column", default="image", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--split-column", default=None, help="Parquet split column (default 'split' when present).")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--multilabel", type=click.Choice(["error", "any"]), default="error", show_default=True)
@click.option("--no-decode", is_flag=True, help="Skip decoding every image (faster, checks less).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(uri, fmt, num_classes, class_names, name, catalogue_key, image_size, image_column, label_column,
              split_column, split_seed, multilabel, no_decode, as_json) -> None:
    """Validate the dataset at URI; exit 0 when usable, 2 when not (naming the file or row)."""
    from tasks.codecs.images import DatasetError
    from tasks.check import check_dataset

    err = Console(stderr=True)
    try:
        fields = dict(source=uri, format=fmt, name=name, image_column=image_column,
                      label_column=label_column, split_seed=split_seed)
        if image_size is not None:
            fields["image_size"] = image_size
        if split_column is not None:
            fields["split_column"] = split_column
        if multilabel != "error":
            fields["multilabel"] = multilabel
        names = [c.strip() for c in class_names.split(",")] if class_names else None
        if names:
            fields.update(class_names=names, num_classes=len(names))
        if num_classes is not None:
            fields["num_classes"] = num_classes
        if catalogue_key is not None:
            if catalogue_key not in CATALOGUE:
                raise DatasetError(f"--catalogue {catalogue_key!r} is not in the catalogue")
            fields = {**CATALOGUE[catalogue_key].to_spec(uri, name=name).model_dump(exclude_defaults=True), **fields}
        if "num_classes" not in fields and fmt not in CLASSES_FROM_LAYOUT:
            raise DatasetError(f"--num-classes (or --class-names / --catalogue) is required for --format {fmt}; "
                               f"{' and '.join(CLASSES_FROM_LAYOUT)} take the classes from the class folders")
        spec = TaskSpec(**fields)
        report = check_dataset(spec, decode=not no_decode)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "spec"
        err.print(f"[red]invalid[/red]: {escape(loc)}: {escape(first['msg'])}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (DatasetError, OSError, ImportError) as e:
        err.print(f"[red]invalid[/red]: {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    console = Console(width=160)
    table = Table(title=f"{spec.name}: {uri} ({fmt})")
    table.add_column("class")
    for s in report.counts:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for k, cname in enumerate(report.class_names):
        row = [report.counts[s][k] for s in report.counts]
        table.add_row(escape(f"{k}: {cname}"), *map(str, row), str(sum(row)))
    totals = [sum(report.counts[s]) for s in report.counts]
    table.add_row("all", *map(str, totals), str(sum(totals)), style="bold")
    console.print(table)
    console.print(f"labels {report.label_range[0]}..{report.label_range[1]}; image sizes {report.image_sizes or 'not decoded'}; "
                  f"modes {report.modes or 'not decoded'}", highlight=False)
    console.print(f"fingerprint {report.fingerprint}", highlight=False)
    if report.classes_inferred:
        # What to write in a job file to pin these classes (leaving them out gives the same job).
        console.print(f"classes from the class folders: num_classes: {len(report.class_names)}, "
                      f"class_names: {json.dumps(report.class_names)}", highlight=False, markup=False, soft_wrap=True)
    for w in report.warnings:
        console.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
    console.print("[green]valid[/green]")
