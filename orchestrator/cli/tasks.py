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
from tasks.format_registry import CLASSES_FROM_LAYOUT
from tasks.spec import FORMATS, KINDS, LABEL_POLICIES, TaskSpec

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
                                   "kind": e.kind, "metric": e.metric, "licence": e.licence, "obtain": e.obtain,
                                   "format": e.format, "notes": e.notes}
                               for k, e in CATALOGUE.items()}, indent=2))
        return
    table = Table(title="shpeft task catalogue", show_lines=False)
    for col in ("key", "modality", "classes", "format", "size", "licence", "where to obtain"):
        table.add_column(col, overflow="fold")
    for key, e in CATALOGUE.items():
        classes = f"{e.num_classes}" + {"multi_label": " findings (multi-label)", "ordinal": " grades (ordinal)"}.get(
            e.kind, "")
        table.add_row(key, e.modality, classes, e.format, e.size_note, e.licence, e.obtain)
    Console(width=200).print(table)


@tasks_cli.command("check")
@click.argument("uri")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Dataset format (default: the --catalogue entry's; else required).")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="single_label (default), multi_label (findings) or ordinal (grades).")
@click.option("--num-classes", type=int, default=None,
              help="Number of classes, checked against the data (default: from --class-names, the catalogue entry, "
                   "or the class folders of imagefolder and dicom).")
@click.option("--class-names", default=None, help="Comma-separated class names in label order.")
@click.option("--name", default="check", show_default=True, help="Task name (a slug).")
@click.option("--catalogue", "catalogue_key", default=None,
              help="Take format, kind, classes, modality and table layout from this catalogue entry.")
@click.option("--image-size", type=int, default=None)
@click.option("--image-column", default="image", show_default=True)
@click.option("--label-column", default="label", show_default=True, help="Parquet or label-table label column.")
@click.option("--split-column", default=None, help="Parquet or label-table split column (default 'split' when present).")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--multilabel", type=click.Choice(["error", "any"]), default="error", show_default=True)
@click.option("--table", "table_file", default=None, help="Label table inside URI (format table; else URI is the table).")
@click.option("--path-column", default=None, help="Label table: the image path column (default 'path').")
@click.option("--label-columns", default=None, help="Label table: comma-separated one-hot or per-finding columns.")
@click.option("--separator", default=None, help="Label table: separator of the findings in the label column, e.g. '|'.")
@click.option("--group-column", default=None, help="Label table: patient / study id column (drawn splits keep it together).")
@click.option("--uncertain", type=click.Choice(LABEL_POLICIES), default=None,
              help="Label table: a finding marked -1 is ignored (default), positive or negative.")
@click.option("--no-decode", is_flag=True, help="Skip decoding every image (faster, checks less).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(uri, fmt, kind, num_classes, class_names, name, catalogue_key, image_size, image_column, label_column,
              split_column, split_seed, multilabel, table_file, path_column, label_columns, separator, group_column,
              uncertain, no_decode, as_json) -> None:
    """Validate the dataset at URI; exit 0 when usable, 2 when not (naming the file or row)."""
    from tasks.codecs.images import DatasetError
    from tasks.check import check_dataset

    err = Console(stderr=True)
    try:
        fields = dict(source=uri, name=name, split_seed=split_seed)
        if fmt is not None:
            fields["format"] = fmt
        if kind is not None:
            fields["kind"] = kind
        table = {k: v for k, v in (("files", table_file), ("path_column", path_column), ("separator", separator),
                                   ("group_column", group_column), ("uncertain", uncertain)) if v is not None}
        if label_columns:
            table["label_columns"] = [c.strip() for c in label_columns.split(",")]
        if fmt == "table" or (fmt is None and catalogue_key and CATALOGUE.get(catalogue_key) and
                              CATALOGUE[catalogue_key].format == "table"):
            if label_column != "label":
                table["label_column"] = label_column
            if split_column is not None:
                table["split_column"] = split_column
        else:
            fields.update(image_column=image_column, label_column=label_column)
            if split_column is not None:
                fields["split_column"] = split_column
        if table:
            fields["table"] = table
        if image_size is not None:
            fields["image_size"] = image_size
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
            entry = CATALOGUE[catalogue_key]
            if "table" in fields:  # merged into the entry's layout, as a job's overrides are
                fields["table"] = {**(entry.table or {}), **fields["table"]}
            fields = {**entry.to_spec(uri, name=name, **({"multilabel": multilabel} if multilabel != "error" else {}))
                      .model_dump(exclude_defaults=True), **fields}
        if "format" not in fields:
            raise DatasetError("--format (or --catalogue) is required")
        if "num_classes" not in fields and fields["format"] not in CLASSES_FROM_LAYOUT:
            raise DatasetError(f"--num-classes (or --class-names / --catalogue) is required for --format "
                               f"{fields['format']}; {' and '.join(CLASSES_FROM_LAYOUT)} take the classes from the "
                               f"class folders")
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
    console.print(_counts_table(spec, uri, report))
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


def _counts_table(spec: TaskSpec, uri: str, report) -> Table:
    """Images per class and split; for multi_label, images with each finding present (and unknown)."""
    multi = report.kind == "multi_label"
    what = {"multi_label": "finding: positive images (unknown)", "ordinal": "grade"}.get(report.kind, "class")
    table = Table(title=f"{spec.name}: {uri} ({spec.format}, {report.kind})")
    table.add_column(what)
    splits = list(report.counts)
    for s in splits:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for k, cname in enumerate(report.class_names):
        row = [report.counts[s][k] for s in splits]
        cells = [str(v) for v in row] + [str(sum(row))]
        if multi and any(report.unknown[s][k] for s in splits):
            unk = [report.unknown[s][k] for s in splits]
            cells = [f"{v} ({u})" for v, u in zip(row + [sum(row)], unk + [sum(unk)])]
        table.add_row(escape(f"{k}: {cname}"), *cells)
    images = [report.images.get(s, sum(report.counts[s])) for s in splits]
    table.add_row("images", *map(str, images), str(sum(images)), style="bold")
    if report.groups:
        groups = [report.groups.get(s, 0) for s in splits]
        table.add_row("groups (patients)", *map(str, groups), str(sum(groups)))
    return table
