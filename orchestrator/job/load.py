"""Reading a job file: YAML from a local path or any fsspec URI, validated against ``JobSpec``, every
problem in one ``JobSpecError`` whose message names the field path, what was given and what is allowed."""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.spec import TaskSpec

from orchestrator.job.spec import CatalogueTaskRef, JobSpec, JobSpecError

__all__ = ["parse_job", "load_job"]


def _format_location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if item in ("catalogue", "inline") and parts and parts[-1].endswith("]"):
            continue  # discriminator tag, not a field
        if isinstance(item, int):
            parts[-1 if parts else 0:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "<job>"


def _walk(loc: tuple) -> tuple[type[BaseModel] | None, str | None]:
    """The model class holding the last field of ``loc`` and that field's name."""
    model: Any = JobSpec
    parent, name = None, None
    for item in loc:
        if isinstance(item, int):
            continue
        if item == "catalogue":
            model = CatalogueTaskRef if parent is not None else model
            continue
        if item == "inline":
            model = TaskSpec
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or item not in model.model_fields:
            return (model if isinstance(model, type) and issubclass(model, BaseModel) else None), str(item)
        parent, name = model, str(item)
        ann = model.model_fields[item].annotation
        model = _inner_model(ann)
    return parent, name


def _inner_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _allowed_hint(err: dict) -> str:
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    model, name = _walk(tuple(err["loc"]))
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields) if model is not None else []
        return f"unknown key; allowed keys here: {allowed}"
    parts = []
    if "expected" in ctx:
        parts.append(f"allowed: {ctx['expected']}")
    bounds = [f"{op} {ctx[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in ctx]
    if bounds:
        parts.append("allowed: " + " and ".join(bounds))
    if model is not None and name in model.model_fields and model.model_fields[name].description:
        parts.append(f"{name}: {model.model_fields[name].description}")
    return "; ".join(parts)


def _error_message(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        path = _format_location(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        hint = _allowed_hint(err)
        given = err.get("input")
        given_s = "" if isinstance(given, (dict, list)) or err.get("type") == "missing" else f" (got {given!r})"
        lines.append(f"{path}: {msg}{given_s}" + (f" [{hint}]" if hint and hint not in msg else ""))
    head = f"invalid job file {source}: " if source else "invalid job: "
    return head + "; ".join(lines)


def parse_job(data: Any, source: str = "") -> JobSpec:
    """Validate a job given as a mapping; raises `JobSpecError`."""
    if not isinstance(data, dict):
        raise JobSpecError(f"invalid job file {source}: the top level must be a mapping with keys "
                           f"{sorted(JobSpec.model_fields)}, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError(_error_message(source, exc)) from None


def load_job(path_or_uri: str | os.PathLike) -> JobSpec:
    """Read and validate a YAML job file from a local path or fsspec URI; raises `JobSpecError`."""
    import fsspec

    source = str(path_or_uri)
    try:
        with fsspec.open(source, "r") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise JobSpecError(f"job file {source} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise JobSpecError(f"job file {source} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError(f"job file {source} is not valid YAML: {exc}") from None
    return parse_job(data, source)
