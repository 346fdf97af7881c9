"""The console tables: a job's results, a comparison, a store's catalogue, one job's rows, predictions.

Invariants: a missing value (None or NaN) shows as ``-``; a row's ``val``/``test`` columns show its own
selection metric (``metric``, default macro-F1); nothing here reads or writes the store: callers pass the
rows. ``print_*`` functions print on a console at least 120 columns wide; the others return a
``rich.table.Table`` for the caller's console. Only rich is imported at load (the command line's start
stays fast); the comparison's statistics load with its table.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from shpeft_core.options import DEFAULT_METRIC

__all__ = ["short_cause", "print_results_table", "print_compare_table", "catalogue_table", "job_row_tables", "predictions_table"]

_CATALOGUE_COLUMNS = ("job_id", "task", "status", "metric", "val", "test", "density", "alpha", "trainable", "bytes",
                     "finished_at")
_RIGHT_ALIGNED = ("val", "test", "density", "alpha", "trainable", "bytes")


def _wide_console() -> Console:
    return Console(width=max(120, Console().width))


def short_cause(error: str, limit: int = 72) -> str:
    """The gist of an error for a table cell: its first clause without the exception's class name, cut at a
    word boundary (never inside a word) with '…' when longer than ``limit``. The full text stays in the log."""
    import re

    text = " ".join(error.split())
    text = re.sub(r"^[A-Za-z_][\w.]*(?:Error|Exception): ", "", text)
    first, depth = text, 0
    for i, ch in enumerate(text):  # the first clause: up to '; ' or '. X' outside parentheses
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and (text.startswith("; ", i) or re.match(r"\. [A-Z]", text[i:i + 3])):
            first = text[:i]
            break
    first = first.rstrip(".")
    if len(first) > limit:  # asides in parentheses go first
        first = re.sub(r" ?\([^()]*\)", "", first).strip()
    if len(first) <= limit:
        return first + ("…" if first != text.rstrip(".") else "")
    cut = first.rfind(" ", 0, limit)
    if cut <= 0:  # one word longer than the limit (a path): kept whole
        cut = first.find(" ") if " " in first else len(first)
    return first[:cut].rstrip(" ,:;(") + "…"


def print_results_table(rows: list[dict[str, Any]], store: str | None = None, job_id: str | None = None) -> None:
    """A job's rows as `shpeft run` ends: each task's status, metrics, selection and its delta, or for a failed
    task the short cause and the command that prints its whole log (``store`` and ``job_id`` given)."""
    table = Table(title="shpeft results")
    for col in ("task", "status", "metric", "val", "test", "density", "alpha", "trainable", "trained"):
        table.add_column(col)
    table.add_column("delta / error", overflow="fold")  # long paths fold onto the next line, never cut

    def failure(r) -> str:
        cause = short_cause(r.get("error") or "no error recorded")
        if store and job_id:
            return f"{cause}\nfull log: shpeft logs {store} {job_id} --task {r['task']}"
        return cause

    def fmt(v, spec="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)

    for r in rows:
        m = r.get("metric") or DEFAULT_METRIC
        table.add_row(
            r["task"], r.get("status", "?"), m, fmt(r.get(f"val_{m}")), fmt(r.get(f"test_{m}")),
            fmt(r.get("density"), "{:.2e}"), fmt(r.get("alpha"), "{:.2f}"), fmt(r.get("trainable"), "{:d}"),
            "yes" if r.get("trained") else "no",
            (r.get("delta_uri") or "") if r.get("status") == "ok" else failure(r),
        )
    console = Console()
    # A terminal's width; piped or logged, wide enough that a path or command in a cell stays on one line
    # (the table takes only the width its cells need).
    Console(width=max(120, console.width) if console.is_terminal else 400).print(table)


def print_compare_table(rows: list[dict[str, Any]], tasks: list[str], labels: list[str], job_mix: str) -> None:
    """A comparison's test macro-F1, mean ± std over seeds, one row per method label and its mean over tasks."""
    # The report module loads matplotlib; only a comparison needs it.
    from orchestrator.reporting.compare_report import mean_over_tasks, summarise

    test = summarise(rows, job_mix, "test")
    table = Table(title="shpeft compare: test macro-F1, mean ± std over seeds")
    table.add_column("method")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("mean", justify="right")
    for lab in labels:
        cells = [f"{test[(t, lab)][0]:.3f} ± {test[(t, lab)][1]:.3f}" if (t, lab) in test else "-" for t in tasks]
        mean = mean_over_tasks(test, lab, tasks)
        table.add_row(lab, *cells, "-" if mean is None else f"{mean:.3f}")
    _wide_console().print(table)


def _fmt(value) -> str:
    """A catalogue value for a table: 4 significant decimals, scientific when tiny or huge, ``-`` when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)) else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _metric_value(row: dict, split: str):
    metric = row.get("metric") or DEFAULT_METRIC
    return row.get(f"{split}_{metric}")


def catalogue_table(store: str, rows: list[dict[str, Any]]) -> Table:
    """`shpeft list`: every job and task of a store's catalogue, oldest job first."""
    table = Table(title=f"catalogue of {store}")
    for col in _CATALOGUE_COLUMNS:
        table.add_column(col, justify="right" if col in _RIGHT_ALIGNED else "left")
    for r in sorted(rows, key=lambda r: (r.get("started_at") or "", r["job_id"], r["task"])):
        cells = {**r, "val": _metric_value(r, "val"), "test": _metric_value(r, "test")}
        table.add_row(*[_fmt(cells.get(c)) for c in _CATALOGUE_COLUMNS])
    return table


def job_row_tables(job_id: str, rows: list[dict[str, Any]]) -> list[Table]:
    """`shpeft show`: one two-column table per task with every field that has a value."""
    tables = []
    for r in rows:
        table = Table(title=f"job {job_id} · task {r['task']} · {r.get('status')}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in r.items():
            if value is not None and key not in ("job_id", "task"):
                table.add_row(key, _fmt(value))
        tables.append(table)
    return tables


def predictions_table(predictions: Sequence[Any], images: Sequence[str]) -> Table:
    """`shpeft predict` on a few files: one row per image and task, images in the order given."""
    table = Table(title="predictions")
    for col in ("image", "task", "class", "label", "probability"):
        table.add_column(col, justify="right" if col in ("label", "probability") else "left")
    for p in sorted(predictions, key=lambda p: (images.index(p.image), p.task)):
        table.add_row(p.image, p.task, p.class_name, str(p.label), f"{p.probability:.4f}")
    return table
