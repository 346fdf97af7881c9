"""A method's saved artifact, whatever its kind: how it is named, written, read, hashed, sized, copied and
recognised, in one place.

| kind         | what it is                                              | name suffix                | sha256 of            |
|--------------|---------------------------------------------------------|----------------------------|----------------------|
| `delta`      | a task delta (sparse values + head + metadata; dense biases) | `.safetensors`             | the file             |
| `checkpoint` | a plain timm state dict (every weight)                  | `.checkpoint.safetensors`  | the file             |
| `lora`       | a folder: peft's adapter files + the head               | `.lora` (a folder)         | the files' digests   |

Which kind a method writes is the method's ``artifact`` attribute (``shpeft_core.methods``). Every write is
atomic (``io.atomic_write_bytes``); a folder artifact's sha256 covers its files in a fixed order, so a
changed or missing file changes it. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from . import io

__all__ = ["ArtifactError", "ArtifactKind", "KINDS", "CHECKPOINT_FORMAT", "get_kind", "artifact_name",
           "strip_suffix", "kind_of", "artifact_files", "artifact_sha256", "artifact_size", "artifact_metadata",
           "copy_artifact", "save_artifact", "load_artifact"]

CHECKPOINT_FORMAT = "shpeft-checkpoint/1"


class ArtifactError(ValueError):
    """An artifact that cannot be written, read or recognised; the message names its URI."""


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    suffix: str
    files: tuple[str, ...] = ()  # a folder artifact's files, in the order its sha256 covers them

    @property
    def is_folder(self) -> bool:
        return bool(self.files)


KINDS = {
    "delta": ArtifactKind("delta", ".safetensors"),
    "checkpoint": ArtifactKind("checkpoint", ".checkpoint.safetensors"),
    "lora": ArtifactKind("lora", ".lora", ("adapter_config.json", "adapter_model.safetensors", "head.safetensors")),
}


def get_kind(kind: str) -> ArtifactKind:
    if kind not in KINDS:
        raise ArtifactError(f"artifact kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def artifact_name(name: str, kind: str) -> str:
    """``name`` with its kind's suffix: the file (or folder) name of an artifact."""
    return name + get_kind(kind).suffix


def strip_suffix(uri: str) -> str:
    """``uri`` without its artifact suffix (the longest one that matches); raises ArtifactError if none does."""
    for suffix in sorted((k.suffix for k in KINDS.values()), key=len, reverse=True):
        if uri.rstrip("/").endswith(suffix):
            return uri.rstrip("/")[: -len(suffix)]
    raise ArtifactError(f"{uri}: not an artifact name (expected one of {sorted(k.suffix for k in KINDS.values())})")


def _header_metadata(uri: str) -> dict[str, str]:
    """A safetensors file's header metadata, read without loading tensors; {} when it is none (or not a
    regular file: a FIFO or device is never opened to sniff it)."""
    import fsspec

    try:
        local = io.local_path(uri)
        if local is not None:
            io.check_regular_file(local)
        with fsspec.open(uri, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < (100 << 20):
                return {}
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, io.StorageError):
        return {}


def kind_of(uri: str) -> str | None:
    """The kind of the artifact at ``uri`` from its name and header, or None when it is none of them."""
    if uri.rstrip("/").endswith(KINDS["lora"].suffix) or io.exists(io.join_uri(uri, KINDS["lora"].files[0])):
        return "lora"
    meta = _header_metadata(uri)
    if "shpeft_checkpoint" in meta:
        return "checkpoint"
    if "shpeft_format" in meta:
        return "delta"
    return None


def artifact_files(uri: str, kind: str) -> list[str]:
    """The files an artifact consists of: itself, or a folder artifact's files."""
    k = get_kind(kind)
    return [io.join_uri(uri, n) for n in k.files] if k.is_folder else [uri]


def artifact_sha256(uri: str, kind: str) -> str:
    """sha256 of a file artifact; of a folder artifact, the sha256 of its files' digests in order."""
    if not get_kind(kind).is_folder:
        return io.sha256_file(uri)
    return io.sha256_bytes("".join(io.sha256_file(u) for u in artifact_files(uri, kind)).encode())


def artifact_size(uri: str, kind: str) -> int:
    from fsspec.core import url_to_fs

    total = 0
    for u in artifact_files(uri, kind):
        fs, path = url_to_fs(u)
        total += int(fs.size(path))
    return total


def artifact_metadata(uri: str, kind: str) -> dict[str, str]:
    """The header metadata the artifact was saved with (a lora folder: its head file's)."""
    from . import _st

    _, meta = _st.read(io.join_uri(uri, "head.safetensors") if kind == "lora" else uri)
    return meta


def copy_artifact(src: str, dst: str, kind: str) -> None:
    """Copy an artifact file by file, each write atomic."""
    if not get_kind(kind).is_folder:
        io.atomic_write_bytes(dst, io.read_bytes(src))
        return
    for f in artifact_files(src, kind):
        io.atomic_write_bytes(io.join_uri(dst, f.rsplit("/", 1)[-1]), io.read_bytes(f))


def _head_state(model) -> dict:
    from .backbone import head_parameter_names, unwrap

    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in head_parameter_names(unwrap(model))}


def save_artifact(model, handle, kind: str, uri: str, metadata: dict[str, str]) -> dict:
    """Write the trained model's artifact of ``kind`` at ``uri``; returns {"sha256", "bytes", "kind"}.

    delta: ``extract_delta`` of the model (``handle``, where not None, is ``{"dense": {name: value before
    training}}``: whole tensors it trained beside its mask, GPS's biases). checkpoint: the plain timm state dict. lora:
    peft's adapter files (``handle`` is the peft wrapper) plus head.safetensors with the metadata.
    """
    from . import _st

    get_kind(kind)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    if kind == "delta":
        from .delta import extract_delta, save_delta

        dense = (handle or {}).get("dense") if isinstance(handle, dict) else None
        return {**save_delta(extract_delta(model, metadata=meta, dense=dense), uri), "kind": kind}
    if kind == "checkpoint":
        from .backbone import unwrap

        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
        sha, size = _st.write(uri, state, {"shpeft_checkpoint": CHECKPOINT_FORMAT, **meta})
        return {"sha256": sha, "bytes": size, "kind": kind}
    with tempfile.TemporaryDirectory(prefix="shpeft-lora-") as tmp:
        handle.save_pretrained(tmp, safe_serialization=True)
        _st.write(os.path.join(tmp, "head.safetensors"), _head_state(model), {"shpeft_lora_head": "1", **meta})
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                io.atomic_write_bytes(io.join_uri(uri, name), f.read())
    return {"sha256": artifact_sha256(uri, kind), "bytes": artifact_size(uri, kind), "kind": kind}


def load_artifact(model, kind: str, uri: str):
    """The backbone ``model`` (fresh, same base weights) with the artifact applied; returns the model to run."""
    import torch

    from . import _st
    from .backbone import unwrap

    get_kind(kind)
    if kind == "delta":
        from .delta import apply_delta, load_delta

        apply_delta(model, load_delta(uri))
        return model
    if kind == "checkpoint":
        tensors, meta = _st.read(uri)
        if meta.get("shpeft_checkpoint") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"{uri}: not a shpeft checkpoint")
        missing, unexpected = unwrap(model).load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"{uri}: does not fit the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="shpeft-lora-") as tmp:
        for src in artifact_files(uri, kind):
            with open(os.path.join(tmp, src.rsplit("/", 1)[-1]), "wb") as f:
                f.write(io.read_bytes(src))
        wrapper = PeftModel.from_pretrained(model, tmp)
        head, _ = _st.read(os.path.join(tmp, "head.safetensors"))
    inner = wrapper.base_model.model
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for n, t in head.items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise ArtifactError(f"{uri}: head tensor {n} does not fit the backbone's classifier")
            params[n].copy_(t)
    return inner
