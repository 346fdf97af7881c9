"""Inference with many task deltas on one backbone instance.

The backbone is built once and never written: each batch of images runs with every task in one
mixed-task forward (shpeft_core.mixed), each row the frozen backbone plus one task's sparse
correction and head, so all tasks share one pass and each image is decoded once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from shpeft_core.delta import DeltaError, TaskDelta, create_model_for_delta, load_delta
from shpeft_core.mixed import MixedTaskModel, PreparedDelta

__all__ = [
    "PredictError",
    "TaskPrediction",
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
    "model_for_delta",
    "predict_files",
]


class PredictError(ValueError):
    """Inputs that cannot be predicted on; the message names the delta, option or image."""


@dataclass(frozen=True)
class TaskPrediction:
    task: str
    image: str
    label: int
    class_name: str
    probability: float


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
    from shpeft_core.io import read_bytes

    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise PredictError(f"image {path} cannot be read: {exc}") from None
    return decode_image_bytes(data, path)


def _safetensors_metadata(uri: str) -> dict:
    """The header metadata of a safetensors file ({} when it is not one)."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < (100 << 20):
                return {}
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


def _artifact_kind(uri: str) -> str | None:
    """'lora' or 'checkpoint' for the other methods' artifacts (see shpeft_core.methods), else None."""
    from shpeft_core.io import exists, join_uri

    if uri.rstrip("/").endswith(".lora") or exists(join_uri(uri, "adapter_config.json")):
        return "lora"
    if "shpeft_checkpoint" in _safetensors_metadata(uri):
        return "checkpoint"
    return None


def load_task_delta(uri: str) -> TaskDelta:
    """A verified task delta (tensor digests checked), or PredictError naming ``uri``.

    LoRA folders and full/bitfit checkpoints from ``shpeft compare`` are refused with what they are:
    they change every layer, so they cannot share a backbone instance the way sparse deltas do.
    """
    try:
        return load_delta(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, DeltaError) as exc:
        kind = _artifact_kind(uri)
        if kind is not None:
            raise PredictError(
                f"{uri} is a {kind} artifact; only sparse task deltas (.safetensors from shpeft, specific, "
                f"agnostic, random, gps or linear) share one backbone. Load it with "
                f"shpeft_core.methods.load_artifact, or `shpeft export` a delta instead"
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
    deltas = [load_task_delta(uri) for uri in delta_uris]
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


def model_for_delta(delta: TaskDelta, backbone_source: str | None = None, device: str = "cpu") -> nn.Module:
    """The delta's backbone (weights from ``backbone_source`` or its metadata), or PredictError naming them."""
    try:
        return create_model_for_delta(delta, backbone_source=backbone_source).to(device)
    except OSError as exc:  # missing file, hub unreachable or offline
        source = backbone_source if backbone_source is not None else delta.metadata.get("backbone_source")
        raise PredictError(
            f"weights of backbone {delta.metadata['backbone']!r} from {source!r} cannot be loaded: {exc}"
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
    """Top-``top_k`` predictions per task and image; the backbone is built once from the first delta."""
    from tasks.transforms import transform_for

    deltas, names = load_deltas(delta_uris, backbone)
    model = model_for_delta(deltas[0], backbone_source, device)
    images = load_images(image_paths, transform_for(model, train=False))  # as in evaluation
    logits = task_logits(model, deltas, images, batch_size=batch_size, device=device)
    preds: list[TaskPrediction] = []
    for delta, name, lg in zip(deltas, names, logits):
        labels = class_names(delta)
        probs = lg.softmax(dim=-1)
        k = min(top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=-1)
        for row, path in enumerate(image_paths):
            for p, i in zip(top_p[row].tolist(), top_i[row].tolist()):
                preds.append(TaskPrediction(name, path, int(i), labels[i], float(p)))
    return preds
