"""Inference with many task deltas on one backbone instance.

The backbone is built once and never written: each batch of images runs with every task in one
mixed-task forward (shpeft_core.mixed), each row the frozen backbone plus one task's sparse
correction and head, so all tasks share one pass and each image is decoded once.

Probabilities follow the task kind the delta records (``task_kind`` in its metadata; absent means
single_label): a softmax over classes, or for multi_label one sigmoid per finding, with the findings
at probability >= ``FINDING_THRESHOLD`` named as present.

A delta is data from outside. Every delta is validated against the built backbone
(``shpeft_core.delta.validate_delta``) before any is used, and the backbone a delta names is only a hint:
its weights come from what the user configures (``--backbone-source``); a delta's ``backbone_source``
is used only when it names no file or URL ("hub", "random"), so a delta never chooses which file is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from shpeft_core.delta import DeltaError, TaskDelta, create_model_for_delta, load_delta, validate_delta
from shpeft_core.mixed import MixedTaskModel, PreparedDelta

__all__ = [
    "PredictError",
    "TaskPrediction",
    "FINDING_THRESHOLD",
    "task_kind",
    "task_probabilities",
    "present_findings",
    "task_name",
    "class_names",
    "check_same_backbone",
    "decode_image",
    "decode_image_bytes",
    "load_images",
    "load_task_delta",
    "backbone_identity",
    "task_logits",
    "mixed_logits",
    "load_deltas",
    "check_base_weights",
    "check_device",
    "configured_source",
    "validate_deltas",
    "model_for_delta",
    "predict_files",
]


class PredictError(ValueError):
    """Inputs that cannot be predicted on; the message names the delta, option or image."""


FINDING_THRESHOLD = 0.5  # a finding is named present at this sigmoid probability (thresholds chosen on
# validation are in the artifact's evaluation file)


@dataclass(frozen=True)
class TaskPrediction:
    """One class of a task's top-k for an image; for a multi_label task, one finding (every finding is
    returned, each with its own probability)."""

    task: str
    image: str
    label: int
    class_name: str
    probability: float
    kind: str = "single_label"


def task_kind(delta: TaskDelta) -> str:
    """The kind of task the delta was trained for (shpeft_core.objectives.KINDS)."""
    return delta.metadata.get("task_kind") or "single_label"


def task_probabilities(logits: torch.Tensor, delta: TaskDelta) -> torch.Tensor:
    """Class probabilities (softmax) or, for a multi_label delta, per-finding probabilities (sigmoid), float64."""
    from shpeft_core.objectives import probabilities

    return probabilities(logits.double(), task_kind(delta))


def present_findings(probs, names: list[str]) -> list[str]:
    """The findings of one image at probability >= FINDING_THRESHOLD."""
    return [n for n, p in zip(names, probs) if float(p) >= FINDING_THRESHOLD]


def task_name(delta: TaskDelta, uri: str = "") -> str:
    name = delta.metadata.get("task") or ""
    if name:
        return name
    base = os.path.basename(uri.rstrip("/"))
    return base.split(".", 1)[0] or "task"


def class_names(delta: TaskDelta) -> list[str]:
    n = int(delta.metadata["num_classes"])
    raw = delta.metadata.get("class_names") or ""
    names = json.loads(raw) if raw else None
    if not names or len(names) != n:
        return [str(i) for i in range(n)]
    return [str(c) for c in names]


_IDENTITY_KEYS = ("backbone", "backbone_fingerprint", "backbone_kwargs")
# A delta is a few MB; a stalled remote read must not hold a command (or a replica) forever.
DELTA_READ_TIMEOUT_S = 120.0


def check_same_backbone(deltas: Sequence[TaskDelta], uris: Sequence[str], backbone: str | None = None) -> None:
    """All deltas must target the same backbone weights (and ``backbone`` when given)."""
    first = deltas[0].metadata
    if backbone is not None and first.get("backbone") != backbone:
        raise PredictError(
            f"--backbone {backbone!r} does not match delta {uris[0]} (trained on {first.get('backbone')!r})"
        )
    for d, uri in zip(deltas[1:], uris[1:]):
        for key in _IDENTITY_KEYS:
            a = first.get(key, "") or ""
            b = d.metadata.get(key, "") or ""
            if key == "backbone_kwargs":
                a, b = json.loads(a or "{}"), json.loads(b or "{}")
            if a != b:
                raise PredictError(
                    f"delta {uri} has {key}={d.metadata.get(key)!r} but {uris[0]} has {first.get(key)!r}; "
                    "deltas predicted together must share one backbone"
                )


def decode_image_bytes(data: bytes, where: str):
    """A PIL RGB image from PNG/JPEG/... bytes or a DICOM file's bytes (windowed to 8 bits)."""
    from tasks.codecs.dicom import decode_dicom, is_dicom_bytes
    from tasks.codecs.images import DICOM_EXTENSIONS, decode_image as decode_bytes

    try:
        if where.lower().endswith(DICOM_EXTENSIONS) or is_dicom_bytes(data[:132]):
            return decode_dicom(data, where=where)
        return decode_bytes(data, where=where)
    except ValueError as exc:  # tasks' DatasetError names the file
        raise PredictError(str(exc)) from None


def decode_image(path: str):
    """A PIL RGB image from a PNG/JPEG/... file or a DICOM file (windowed to 8 bits); path or URI."""
    from shpeft_core.io import StorageError, read_regular_bytes

    try:
        data = read_regular_bytes(path, timeout_s=DELTA_READ_TIMEOUT_S)
    except (OSError, StorageError) as exc:
        raise PredictError(f"image {path} cannot be read: {exc}") from None
    return decode_image_bytes(data, path)


def load_task_delta(uri: str, *, max_bytes: int | None = None, timeout_s: float | None = None) -> TaskDelta:
    """A verified task delta (tensor digests and structure checked), or PredictError naming ``uri``.

    LoRA folders and full/bitfit checkpoints from ``shpeft compare`` are refused with what they are:
    they change every layer, so they cannot share a backbone instance the way sparse deltas do. Only a
    regular file is read, at most ``max_bytes``; TimeoutError after ``timeout_s`` seconds.
    """
    try:
        return load_delta(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, DeltaError) as exc:
        from shpeft_core.artifacts import kind_of
        from shpeft_core.methods import all_methods

        kind = kind_of(uri)
        if kind not in (None, "delta"):
            sharing = ", ".join(m.name for m in all_methods() if m.artifact == "delta")
            raise PredictError(
                f"{uri} is a {kind} artifact; only sparse task deltas (from {sharing}) share one backbone. "
                f"Load it with shpeft_core.methods.load_artifact, or `shpeft export` a delta instead"
            ) from None
        if isinstance(exc, DeltaError):
            raise PredictError(str(exc)) from None
        raise PredictError(f"delta {uri} cannot be read: {exc}") from None


def backbone_identity(model: nn.Module) -> TaskDelta:
    """An empty delta carrying ``model``'s backbone identity, for check_same_backbone against a served model."""
    from shpeft_core.backbone import backbone_fingerprint, backbone_name, unwrap

    spec = getattr(unwrap(model), "shpeft_spec", None) or {}
    meta = {"backbone": backbone_name(model), "backbone_fingerprint": backbone_fingerprint(model),
            "backbone_kwargs": json.dumps(spec.get("kwargs", {}), sort_keys=True)}
    return TaskDelta(indices={}, values={}, head={}, metadata=meta)


def load_images(paths: Sequence[str], transform) -> torch.Tensor:
    """Decode and transform images into one float batch [N, 3, H, W]."""
    if not paths:
        raise PredictError("no images given")
    return torch.stack([transform(decode_image(p)) for p in paths])


@torch.no_grad()
def task_logits(
    model: nn.Module,
    deltas: Sequence[TaskDelta],
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    verified: bool = False,
) -> list[torch.Tensor]:
    """Logits [N, num_classes] per delta, each as if that delta alone were applied to ``model``.

    ``model`` is left as it was (see mixed_logits). ``verified``: the caller has already checked the
    model's fingerprint against the deltas (a long-lived predictor does it once), so the backbone is
    not hashed again.
    """
    fingerprints = {d.metadata.get("backbone_fingerprint") for d in deltas}
    if len(fingerprints) > 1:
        raise PredictError("deltas predicted together must share one backbone (backbone_fingerprint differs)")
    mixed = MixedTaskModel(model)
    try:
        # The deltas share one fingerprint (checked above), so the model is hashed at most once.
        prepared = [mixed.prepare(d, check_fingerprint=not verified) for d in deltas]
        return mixed_logits(mixed, prepared, images, batch_size=batch_size, device=device)
    finally:
        mixed.close()


@torch.no_grad()
def mixed_logits(mixed: MixedTaskModel, prepared: Sequence[PreparedDelta], images: torch.Tensor, *,
                 batch_size: int = 64, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Logits [N, num_classes] per prepared delta: one forward per ``batch_size`` images for every task.

    A forward holds ``batch_size`` x tasks rows (each image once per task, task after task, so the
    rows are already grouped by task); nothing is written to the backbone.
    """
    chunks: list[list[torch.Tensor]] = [[] for _ in prepared]
    n_tasks = len(prepared)
    for j in range(0, images.shape[0], batch_size):
        x = images[j : j + batch_size].to(device)
        rows = x.repeat(n_tasks, *([1] * (x.dim() - 1)))
        task_index = torch.arange(n_tasks).repeat_interleave(x.shape[0])
        for t, lg in enumerate(mixed(rows, prepared, task_index)):
            chunks[t].append(lg.float().cpu())
    return [torch.cat(c) if c else torch.zeros(0, p.num_classes) for c, p in zip(chunks, prepared)]


def load_deltas(delta_uris: Sequence[str], backbone: str | None = None) -> tuple[list[TaskDelta], list[str]]:
    """Verified deltas of distinct tasks on one backbone, and their task names."""
    if not delta_uris:
        raise PredictError("give at least one --delta")
    try:
        deltas = [load_task_delta(uri, timeout_s=DELTA_READ_TIMEOUT_S) for uri in delta_uris]
    except TimeoutError as exc:
        raise PredictError(f"delta {exc}") from None
    check_same_backbone(deltas, delta_uris, backbone)
    names = [task_name(d, u) for d, u in zip(deltas, delta_uris)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PredictError(f"several deltas are for the same task {dupes}; give each task once")
    return deltas, names


def check_base_weights(model: nn.Module, delta: TaskDelta, uri: str) -> str:
    """``model``'s backbone fingerprint, checked against the delta's base; PredictError naming ``uri``."""
    from shpeft_core.backbone import backbone_fingerprint

    fp = backbone_fingerprint(model)
    if fp != delta.metadata["backbone_fingerprint"]:
        raise PredictError(
            f"backbone weights differ from the base of delta {uri} (fingerprint {fp[:12]} vs "
            f"{delta.metadata['backbone_fingerprint'][:12]}); use the weights it was trained from (--backbone-source)"
        )
    return fp


def configured_source(delta: TaskDelta, backbone_source: str | None, uri: str = "") -> str:
    """Where the backbone's weights are read from: ``backbone_source`` (what the user configured), else the
    delta's own ``backbone_source`` only when it names no file or URL ('hub' or 'random'); PredictError
    otherwise. A delta is a hint for its backbone, never a way to choose which file is read."""
    if backbone_source is not None:
        return backbone_source
    named = delta.metadata.get("backbone_source") or "random"
    if named in ("random", "hub"):
        return named
    where = f"delta {uri}" if uri else "the delta"
    raise PredictError(
        f"{where} was trained on backbone weights it names as {named!r}; a delta never chooses which file is "
        f"read: give --backbone-source with the weights you trust (e.g. --backbone-source {named!r})")


def check_device(device: str, *, local: bool = True) -> None:
    """PredictError naming ``--device`` when it is not a torch device, or (``local``) is not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PredictError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if not local or dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise PredictError(f"--device {device!r}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise PredictError(f"--device {device!r}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PredictError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")
    else:
        raise PredictError(f"--device {device!r}: only cpu, cuda and mps are supported")


def validate_deltas(model: nn.Module, deltas: Sequence[TaskDelta], uris: Sequence[str]) -> None:
    """Every delta against the built backbone before any is applied; PredictError naming the delta."""
    for delta, uri in zip(deltas, uris):
        try:
            validate_delta(model, delta, where=f"delta {uri}")
        except DeltaError as exc:
            raise PredictError(str(exc)) from None


def model_for_delta(delta: TaskDelta, backbone_source: str | None = None, device: str = "cpu",
                    uri: str = "") -> nn.Module:
    """The delta's backbone (weights from ``configured_source``), or PredictError naming them."""
    source = configured_source(delta, backbone_source, uri)
    try:
        return create_model_for_delta(delta, backbone_source=source).to(device)
    except Exception as exc:  # missing file, hub offline, a pickle timm refuses, not weights at all: one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PredictError(
            f"weights of backbone {delta.metadata['backbone']!r} from {source!r} cannot be loaded: "
            f"{type(exc).__name__}: {first}"
        ) from None


def predict_files(
    delta_uris: Sequence[str],
    image_paths: Sequence[str],
    *,
    backbone: str | None = None,
    backbone_source: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    top_k: int = 1,
) -> list[TaskPrediction]:
    """Top-``top_k`` predictions per task and image (multi_label tasks: every finding's probability);
    the backbone is built once from the first delta."""
    from tasks.transforms import transform_for

    check_device(device)
    deltas, names = load_deltas(delta_uris, backbone)
    model = model_for_delta(deltas[0], backbone_source, device, delta_uris[0])
    validate_deltas(model, deltas, delta_uris)
    images = load_images(image_paths, transform_for(model, train=False))  # as in evaluation
    logits = task_logits(model, deltas, images, batch_size=batch_size, device=device)
    preds: list[TaskPrediction] = []
    for delta, name, lg in zip(deltas, names, logits):
        labels = class_names(delta)
        probs = task_probabilities(lg, delta)
        if task_kind(delta) == "multi_label":
            for row, path in enumerate(image_paths):
                preds += [TaskPrediction(name, path, i, labels[i], float(p), "multi_label")
                          for i, p in enumerate(probs[row].tolist())]
            continue
        k = min(top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=-1)
        for row, path in enumerate(image_paths):
            for p, i in zip(top_p[row].tolist(), top_i[row].tolist()):
                preds.append(TaskPrediction(name, path, int(i), labels[i], float(p)))
    return preds
