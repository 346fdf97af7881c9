"""What the driver prints: progress lines, short errors and the results table."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

from shpeft_core.options import DEFAULT_METRIC

log = logging.getLogger("shpeft.pipeline")

__all__ = ['say', 'now', 'error_chain', 'short_error', 'print_results_table', 'quiet_frameworks']


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


def print_results_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shpeft results")
    for col in ("task", "status", "metric", "val", "test", "density", "alpha", "trainable", "trained", "delta / error"):
        table.add_column(col)

    def fmt(v, spec="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)

    for r in rows:
        m = r.get("metric") or DEFAULT_METRIC
        table.add_row(
            r["task"], r.get("status", "?"), m, fmt(r.get(f"val_{m}")), fmt(r.get(f"test_{m}")),
            fmt(r.get("density"), "{:.2e}"), fmt(r.get("alpha"), "{:.2f}"), fmt(r.get("trainable"), "{:d}"),
            "yes" if r.get("trained") else "no",
            (r.get("delta_uri") or "") if r.get("status") == "ok" else (r.get("error") or "")[:120],
        )
    Console(width=max(120, Console().width)).print(table)
