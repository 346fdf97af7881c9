"""What the driver prints: progress lines and short errors (the tables are in ``reporting/tables.py``)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

log = logging.getLogger("shpeft.pipeline")

__all__ = ['say', 'now', 'error_chain', 'short_error', 'quiet_frameworks']


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
