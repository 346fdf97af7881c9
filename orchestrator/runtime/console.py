"""What the driver prints: progress lines, short errors and the results table."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("shpeft.pipeline")

__all__ = ['say', 'now', 'error_chain', 'short_error', 'short_cause', 'print_results_table', 'quiet_frameworks']


def quiet_frameworks() -> None:
    """Keep Ray's, Tune's and Optuna's own INFO/WARNING chatter off the console (SHPEFT_VERBOSE=1 keeps it).

    What shpeft prints says what happens; the frameworks' lines (start-up notices, experiment boxes,
    where Tune wrote its state) are for their own debugging. Their errors still show.
    """
    import os

    if os.environ.get("SHPEFT_VERBOSE"):
        return
    # Ray Tune's newer console output ignores verbose=0; the classic reporter honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass


def say(msg: str, progress: bool) -> None:
    log.info(msg)
    if progress:
        print(msg, flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def error_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps through ``cause`` (Ray's RayTaskError wraps the remote one)."""
    chain = [exc]
    while getattr(chain[-1], "cause", None) is not None and all(chain[-1].cause is not e for e in chain):
        chain.append(chain[-1].cause)
    return chain


def short_error(exc: BaseException) -> str:
    cause = error_chain(exc)[-1]  # the innermost carries the user's message
    text = f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if len(lines) > 3 else " ".join(lines))[:2000]


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
    """The job's table: one row per task, its delta, or for a failed task the short cause and the command
    that prints its whole log (``store`` and ``job_id`` given)."""
    from rich.console import Console
    from rich.table import Table

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
        m = r.get("metric") or "macro_f1"
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
