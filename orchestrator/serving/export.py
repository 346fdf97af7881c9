"""Export a task delta as a plain timm checkpoint, for users who do not have shpeft installed.

The output is a safetensors file holding the merged model's full ``state_dict`` under timm's own
names, with header metadata saying how to build the model it loads into::

    meta = safetensors.safe_open(path, "pt").metadata()
    model = timm.create_model(meta["backbone"], num_classes=int(meta["num_classes"]),
                              **json.loads(meta["backbone_kwargs"]))
    model.load_state_dict(safetensors.torch.load_file(path))
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save as safetensors_save

from shpeft_core.delta import TaskDelta, create_model_for_delta, load_delta, merge_delta
from shpeft_core.io import atomic_write_bytes

__all__ = ["EXPORT_FORMAT", "merged_state_dict", "export_metadata", "export_merged"]

EXPORT_FORMAT = "timm-merged-1"


def merged_state_dict(delta: TaskDelta, *, backbone_source: str | None = None, uri: str = "") -> dict[str, torch.Tensor]:
    """The full timm state_dict of the backbone with ``delta`` merged in and its head installed.

    The weights come from ``backbone_source``; the delta's own ``backbone_source`` only when it names no
    file or URL (``orchestrator.serving.predict.configured_source``): a delta never chooses which file is read.
    """
    from orchestrator.serving.predict import configured_source

    source = configured_source(delta, backbone_source, uri)
    try:
        base = create_model_for_delta(delta, backbone_source=source)
    except OSError as exc:  # missing file, hub unreachable or offline
        raise FileNotFoundError(
            f"weights of backbone {delta.metadata['backbone']!r} from {source!r} cannot be loaded: {exc}"
        ) from None
    model = merge_delta(delta, base)
    # safetensors refuses tensors that share storage; clone gives each its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def export_metadata(delta: TaskDelta, *, delta_uri: str = "", sha256: str = "") -> dict[str, str]:
    meta = delta.metadata
    out = {
        "format": EXPORT_FORMAT,
        "backbone": meta["backbone"],
        "num_classes": str(meta["num_classes"]),
        "backbone_kwargs": meta.get("backbone_kwargs", "{}") or "{}",
        "backbone_source": meta.get("backbone_source", "") or "",
        "class_names": meta.get("class_names", "") or "",
        "task": meta.get("task", "") or "",
    }
    if delta_uri:
        out["source_delta"] = delta_uri
    if sha256:
        out["source_delta_sha256"] = sha256
    return out


def export_merged(delta_uri: str, out_uri: str, *, backbone_source: str | None = None) -> dict[str, object]:
    """Merge the delta at ``delta_uri`` into its backbone and write ``out_uri`` atomically.

    Returns ``{"uri", "sha256", "bytes", "backbone", "num_classes", "tensors"}``.
    """
    from shpeft_core.io import sha256_file

    try:
        delta = load_delta(delta_uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"delta {delta_uri} cannot be read: {exc}") from None
    state = merged_state_dict(delta, backbone_source=backbone_source, uri=delta_uri)
    meta = export_metadata(delta, delta_uri=delta_uri, sha256=sha256_file(delta_uri))
    if backbone_source is not None:
        meta["backbone_source"] = backbone_source
    json.loads(meta["backbone_kwargs"])  # fail here, not in the user's loader, if it is not JSON
    data = safetensors_save(state, metadata=meta)
    digest = atomic_write_bytes(out_uri, data)
    return {
        "uri": out_uri,
        "sha256": digest,
        "bytes": len(data),
        "backbone": meta["backbone"],
        "num_classes": int(meta["num_classes"]),
        "tensors": len(state),
    }
