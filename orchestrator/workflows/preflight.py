"""What every workflow checks and resolves before its stages run: the store takes writes, the backbone
builds and has weights the job's methods can select (before Ray starts), and the job's targets and pool
datasets resolved once, with a note where images are resized for the backbone."""

from __future__ import annotations

from dataclasses import dataclass

from shpeft_core.io import check_writable
from shpeft_core.methods import get_method

from orchestrator.job.keys import backbone_dict
from orchestrator.job.spec import JobSpec, JobSpecError, resolve_task, task_name
from orchestrator.runtime.console import say, short_error
from orchestrator.store.layout import normalise_store

__all__ = ["preflight", "note_input_sizes", "Targets", "resolve_targets"]


def preflight(job: JobSpec):
    """Checks that need no cluster, run before Ray starts: the store takes writes, and the backbone
    builds and has weights the job's methods can select. Returns the backbone (the driver needs it)."""
    from shpeft_core.backbone import BackboneError, build_backbone
    from shpeft_core.eligibility import eligible_parameters

    check_writable(normalise_store(job.store))
    try:
        model = build_backbone(backbone_dict(job), 2)
    except BackboneError as exc:
        raise JobSpecError(f"backbone.source: {exc}") from None
    methods = {job.method.for_task(task_name(t)) for t in job.tasks}
    if any(get_method(m).uses_mask for m in methods) and not eligible_parameters(model, job.selection.rules):
        layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv2d")][:8]
        raise JobSpecError(
            f"selection.rules: no weight of {job.backbone.name} is eligible for sparse training "
            f"(rules {job.selection.rules or 'built-in ViT/Swin/ConvNeXt rules'}); write rules that full-match "
            f"module paths of its Linear/Conv2d layers, e.g. {layers}")
    return model


def note_input_sizes(model, targets: list, progress: bool) -> None:
    """Say when a task's images are resized to another size for the backbone (a choice the user may not know)."""
    from timm.data import resolve_data_config

    input_px = int(resolve_data_config(model=model)["input_size"][-1])
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        input_px = int(img[-1] if isinstance(img, (tuple, list)) else img)
    for t in targets:
        if t.image_size and int(t.image_size) != input_px:
            say(f"[{t.name}] note: images are {t.image_size} px and the backbone takes {input_px} px; they are "
                 f"resized to {input_px} px (set backbone.kwargs.img_size to train at another size)", progress)


@dataclass
class Targets:
    """The job's tasks as TaskSpecs (those that resolve), the errors of those that do not (by task name),
    and the datasets used only for the task-agnostic pool."""

    specs: list
    errors: dict[str, str]
    pool_extra: list


def resolve_targets(job: JobSpec, model, progress: bool) -> Targets:
    """Resolve every task entry once; a task that cannot be resolved fails alone (its error kept)."""
    specs, errors = [], {}
    for entry in job.tasks:
        try:
            specs.append(resolve_task(entry))
        except Exception as exc:
            errors[task_name(entry)] = short_error(exc)
    pool_extra = [resolve_task(e) for e in job.importance.pool_datasets]
    note_input_sizes(model, specs, progress)
    return Targets(specs, errors, pool_extra)
