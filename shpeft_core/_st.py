"""Safetensors (de)serialisation with metadata, over bytes: no pickle anywhere."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from . import io


class SafetensorsError(ValueError):
    """The bytes are not a readable safetensors file."""


def dumps(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not str: {bad}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _save_tensors(cpu, metadata=dict(metadata))


def loads(data: bytes, *, where: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file's bytes."""
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
    return tensors, dict(metadata)


def write(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int]:
    """Atomically write; returns (sha256, size in bytes)."""
    data = dumps(tensors, metadata)
    return io.atomic_write_bytes(uri, data), len(data)


def read(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not io.exists(uri):
        raise FileNotFoundError(f"{uri}: no such file")
    return loads(io.read_bytes(uri), where=uri)
