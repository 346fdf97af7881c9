"""Safetensors (de)serialisation with metadata, over bytes: no pickle anywhere.

Every file written here records a sha256 of its tensors (names, dtypes, shapes, bytes) in its own
header, and every read recomputes it: a file whose bytes were flipped, or that was cut and patched,
is refused instead of being used. A file travelling alone carries what is needed to check it.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from . import io


CHECKSUM_KEY = "shpeft_tensors_sha256"


class SafetensorsError(ValueError):
    """The bytes are not a readable safetensors file, or not the tensors that were written."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def dumps(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not str: {bad}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _save_tensors(cpu, metadata={**metadata, CHECKSUM_KEY: tensors_digest(cpu)})


def loads(data: bytes, *, where: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file's bytes, checked against the recorded digest."""
    if len(data) < 8:
        raise SafetensorsError(f"{where}: not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or 8 + n > len(data):
        raise SafetensorsError(f"{where}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{where}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: not a safetensors file (header is not an object)")
    metadata = header.get("__metadata__") or {}
    try:
        tensors = _load_tensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise SafetensorsError(f"{where}: unreadable safetensors payload: {exc}") from exc
    metadata = dict(metadata)
    recorded = metadata.pop(CHECKSUM_KEY, None)
    if recorded is None:
        raise SafetensorsError(f"{where}: no content checksum ({CHECKSUM_KEY}) in its header; not written by shpeft")
    if tensors_digest(tensors) != recorded:
        raise SafetensorsError(f"{where}: content does not match the checksum recorded when it was written "
                               "(corrupt or modified)")
    return tensors, metadata


def write(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int]:
    """Atomically write; returns (sha256, size in bytes)."""
    data = dumps(tensors, metadata)
    return io.atomic_write_bytes(uri, data), len(data)


def read(uri: str, *, max_bytes: int | None = None,
         timeout_s: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the file at ``uri``: a regular file only, bounded as io.read_regular_bytes."""
    return loads(io.read_regular_bytes(uri, max_bytes=max_bytes, timeout_s=timeout_s), where=uri)
