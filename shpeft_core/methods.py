"""The fine-tuning methods shpeft compares, behind one interface: what trains, and what is saved.

Every method starts from the same backbone (with the same head initialisation) and trains with the
same ``fit``; they differ only in which parameters receive gradients and in the artifact written:

| method     | trains                                                   | artifact                          |
|------------|----------------------------------------------------------|-----------------------------------|
| shpeft     | hybrid top-`density` entries (alpha, mix) + head         | task delta (safetensors)          |
| specific   | the same with alpha = 1 (task-specific importance only)  | task delta                        |
| agnostic   | the same with alpha = 0 (task-agnostic importance only)  | task delta                        |
| random     | a seeded uniform random mask of the same size + head     | task delta                        |
| gps        | per-row top entries of the task's \\|sum of grads\\| + head| task delta                        |
| linear     | the head only                                            | task delta without values         |
| bitfit     | every bias + head                                        | plain timm checkpoint             |
| lora       | peft LoRA adapters on qkv/proj/fc1/fc2 + head            | peft adapter folder + head file   |
| full       | every weight                                             | plain timm checkpoint             |
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _st, io
from .backbone import head_parameter_names, unwrap
from .eligibility import eligible_parameters
from .options import DEFAULT_LR, IMPORTANCE_METHODS, LORA_TARGETS, METHODS, SPARSE_METHODS, artifact_kind, method_alpha
from .selection import Mask, hybrid_mask, select_mask
from .sparse import apply_sparse_training

__all__ = [
    "METHODS",
    "SPARSE_METHODS",
    "IMPORTANCE_METHODS",
    "DEFAULT_LR",
    "LoraSettings",
    "MethodError",
    "artifact_kind",
    "method_alpha",
    "random_mask",
    "method_mask",
    "prepare_model",
    "save_artifact",
    "load_artifact",
    "artifact_metadata",
    "artifact_size",
]

_CHECKPOINT_FORMAT = "shpeft-checkpoint/1"


class MethodError(ValueError):
    """A method name or setting that cannot be used, or an artifact that does not load."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = LORA_TARGETS  # regex full-matched against module paths (peft's target_modules)


def random_mask(model: nn.Module, density: float, seed: int, rules=None) -> Mask:
    """A uniform random mask over the eligible weights with the global budget of ``density``."""
    params = eligible_parameters(unwrap(model), rules)
    if not params:
        raise MethodError("random mask: the model has no eligible weights")
    gen = torch.Generator().manual_seed(int(seed))
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in sorted(params.items())}
    return select_mask(scores, density, "global")


def method_mask(method: str, *, model: nn.Module, specific=None, agnostic=None, density: float,
                alpha: float, granularity: str = "global", mix: str = "rank_sum", seed: int = 0,
                rules=None) -> Mask:
    """The mask a sparse method trains. ``specific`` is the task's map (grad1 for gps)."""
    if method == "random":
        return random_mask(model, density, seed, rules)
    if method == "gps":
        if specific is None:
            raise MethodError("gps needs the task's importance map")
        return hybrid_mask(specific, None, 1.0, density, "per_row")
    if method not in ("shpeft", "specific", "agnostic"):
        raise MethodError(f"{method!r} is not a sparse method; sparse methods: {SPARSE_METHODS}")
    a = method_alpha(method, alpha)
    return hybrid_mask(specific if a > 0 else None, agnostic if a < 1 else None, a, density, granularity, mix)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _unfreeze_head(model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for n in head_parameter_names(model):
        params[n].requires_grad_(True)


def prepare_model(model: nn.Module, method: str, *, mask: Mask | None = None,
                  lora: LoraSettings | None = None):
    """Make exactly the method's parameters trainable (in place where possible).

    Returns ``(model_to_train, handle)``: the timm model to pass to ``fit``, and what
    ``save_artifact`` needs besides it (the peft wrapper for lora, else None).
    """
    kind = artifact_kind(method)
    if method in SPARSE_METHODS:
        if mask is None:
            raise MethodError(f"{method} needs a mask")
        return apply_sparse_training(model, mask), None
    _freeze_all(model)
    if method == "linear":
        _unfreeze_head(model)
        return model, None
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    if method == "bitfit":
        for n, p in model.named_parameters():
            if n.endswith(".bias") or n == "bias":
                p.requires_grad_(True)
        _unfreeze_head(model)
        return model, None
    assert kind == "lora"
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.targets, bias="none")
    # peft injects its layers into the timm model in place; training goes through the timm model
    # itself so its head keeps its timm names (peft would otherwise wrap it as modules_to_save).
    wrapper = get_peft_model(model, config)
    inner = wrapper.base_model.model
    _unfreeze_head(inner)
    return inner, wrapper


def _head_state(model: nn.Module) -> dict[str, Tensor]:
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in head_parameter_names(unwrap(model))}


def save_artifact(model: nn.Module, handle, method: str, uri: str, metadata: dict[str, str]) -> dict:
    """Write the trained method's artifact at ``uri``; returns {"sha256", "bytes", "kind"}.

    delta: one safetensors file (``extract_delta``). checkpoint: one safetensors file holding the
    plain timm state dict. lora: a folder with peft's adapter_model.safetensors and
    adapter_config.json plus head.safetensors; its sha256 covers the three files.
    """
    kind = artifact_kind(method)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    meta["method"] = method
    if kind == "delta":
        from .delta import extract_delta, save_delta

        return {**save_delta(extract_delta(model, metadata=meta), uri), "kind": kind}
    if kind == "checkpoint":
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
        sha, size = _st.write(uri, state, {"shpeft_checkpoint": _CHECKPOINT_FORMAT, **meta})
        return {"sha256": sha, "bytes": size, "kind": kind}
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shpeft-lora-") as tmp:
        handle.save_pretrained(tmp, safe_serialization=True)
        _st.write(os.path.join(tmp, "head.safetensors"), _head_state(model), {"shpeft_lora_head": "1", **meta})
        files = sorted(os.listdir(tmp))
        for name in files:
            with open(os.path.join(tmp, name), "rb") as f:
                io.atomic_write_bytes(io.join_uri(uri, name), f.read())
    return {"sha256": artifact_sha256(uri, kind), "bytes": artifact_size(uri, kind), "kind": kind}


def artifact_files(uri: str) -> list[str]:
    return [io.join_uri(uri, n) for n in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors")]


def artifact_sha256(uri: str, kind: str) -> str:
    if kind != "lora":
        return io.sha256_file(uri)
    return io.sha256_bytes("".join(io.sha256_file(u) for u in artifact_files(uri)).encode())


def artifact_metadata(uri: str, kind: str) -> dict[str, str]:
    """The header metadata the artifact was saved with (for lora: its head file's)."""
    _, meta = _st.read(io.join_uri(uri, "head.safetensors") if kind == "lora" else uri)
    return meta


def artifact_size(uri: str, kind: str) -> int:
    if kind != "lora":
        return len(io.read_bytes(uri))
    return sum(len(io.read_bytes(u)) for u in artifact_files(uri))


def load_artifact(model: nn.Module, method: str, uri: str) -> nn.Module:
    """The backbone ``model`` (fresh, same base weights) with the artifact applied; returns the model to run."""
    kind = artifact_kind(method)
    if kind == "delta":
        from .delta import apply_delta, load_delta

        apply_delta(model, load_delta(uri))
        return model
    if kind == "checkpoint":
        tensors, meta = _st.read(uri)
        if meta.get("shpeft_checkpoint") != _CHECKPOINT_FORMAT:
            raise MethodError(f"{uri}: not a shpeft checkpoint")
        missing, unexpected = unwrap(model).load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise MethodError(f"{uri}: does not fit the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model
    import os
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="shpeft-lora-") as tmp:
        for src in artifact_files(uri):
            with open(os.path.join(tmp, src.rsplit("/", 1)[-1]), "wb") as f:
                f.write(io.read_bytes(src))
        wrapper = PeftModel.from_pretrained(model, tmp)
        head, _ = _st.read(os.path.join(tmp, "head.safetensors"))
    inner = wrapper.base_model.model
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for n, t in head.items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise MethodError(f"{uri}: head tensor {n} does not fit the backbone's classifier")
            params[n].copy_(t)
    return inner

