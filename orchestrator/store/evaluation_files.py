"""Evaluation files, the sealed JSON written beside each artifact (``layout.eval_file``): their format
names, atomic writing and verified reading. What goes into one is decided by
``orchestrator.stages.evaluation``; the store reads them back to heal a catalogue without knowing how
they were computed."""

from __future__ import annotations

from typing import Any

__all__ = ["EVAL_FORMAT", "READABLE_FORMATS", "EvalFileError", "read_eval", "write_eval"]

EVAL_FORMAT = "shpeft-eval/3"  # /2: the catalogue fields and the file's own checksum; /3: per-image predictions
READABLE_FORMATS = ("shpeft-eval/2", EVAL_FORMAT)


class EvalFileError(ValueError):
    """An evaluation file that cannot be trusted: unreadable, damaged, or of another format."""


def write_eval(uri: str, doc: dict[str, Any]) -> None:
    """Write an evaluation file atomically, sealed with the sha256 of its content."""
    from shpeft_core.io import write_sealed_json
    from shpeft_core.metrics import json_safe

    write_sealed_json(uri, json_safe(doc))


def read_eval(uri: str) -> dict[str, Any] | None:
    """The evaluation file at ``uri`` after checking its checksum, or None when there is none (an artifact
    of an older version). Raises EvalFileError for a file that is unreadable, of another format, or damaged."""
    from shpeft_core.io import DamagedFileError, exists, read_sealed_json

    if not exists(uri):
        return None
    try:
        doc = read_sealed_json(uri)
    except DamagedFileError as exc:
        raise EvalFileError(f"evaluation file {exc}") from None
    if doc.get("format") not in READABLE_FORMATS:
        raise EvalFileError(f"evaluation file {uri}: format {doc.get('format')!r}, expected one of {READABLE_FORMATS}")
    return doc
