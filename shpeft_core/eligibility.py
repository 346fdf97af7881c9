"""Which weights may be selected: exact module-path rules over supported layer types; and which whole
parameters a delta may carry densely (``dense_eligible_parameters``: biases and layer-scale gammas, what
GPS trains in full), never normalisation layers, embeddings, tokens or the head."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .backbone import head_module_paths, head_parameter_names, unwrap

__all__ = ["DEFAULT_RULES", "eligible_parameters", "eligible_modules", "is_supported_module",
           "dense_eligible_parameters"]

# Full-matched against module paths. Covers timm ViT/DeiT (blocks.N), Swin (layers.N.blocks.M)
# and ConvNeXt (stages.N.blocks.M) block Linears, plus the patch embedding (ViT/Swin
# patch_embed.proj, ConvNeXt stem.0). Norms, position embeddings, cls tokens and the head
# are never matched; depthwise convs (groups > 1) are skipped by the type check.
DEFAULT_RULES: tuple[str, ...] = (
    r"(?:.+\.)?blocks\.\d+\.attn\.(?:qkv|proj)",
    r"(?:.+\.)?blocks\.\d+\.mlp\.(?:fc1|fc2)",
    r"patch_embed\.proj",
    r"stem\.0",
)


def is_supported_module(mod: nn.Module) -> bool:
    """Layers the sparse-delta modules can stand in for: Linear and plain groups=1 Conv2d."""
    if getattr(mod, "SPARSE_STATE_KEYS", None):  # already a sparse-delta module
        return True
    if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # used by nn.MultiheadAttention through its weight, not its forward
    if isinstance(mod, nn.Linear):
        return True
    return (
        type(mod) is nn.Conv2d
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


def eligible_modules(model: nn.Module, rules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    m = unwrap(model)
    compiled = [re.compile(r) for r in (DEFAULT_RULES if rules is None else rules)]
    heads = head_module_paths(m)
    out = {}
    for name, mod in m.named_modules():
        if not name or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if any(r.fullmatch(name) for r in compiled) and is_supported_module(mod):
            out[name] = mod
    return out


def eligible_parameters(model: nn.Module, rules: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """Parameter name -> weight of every eligible module, in model order."""
    return {f"{name}.weight": mod.weight for name, mod in eligible_modules(model, rules).items()}


# Never trained densely: position embeddings and class / distillation / register tokens (GPS's reference
# freezes them by name, as it does every parameter with "norm" in its name).
_DENSE_FROZEN = ("pos_embed", "cls_token", "dist_token", "reg_token")


def dense_eligible_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name -> parameter, in model order, of what a delta may store as a whole tensor beside
    its sparse values: every bias outside normalisation layers (Swin's relative-position bias tables
    included) and every layer-scale gamma, outside the head. Normalisation layers are excluded by type
    (timm's LayerNorm2d has no "norm" in its name) and by name, as in GPS's reference."""
    m = unwrap(model)
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    in_norm = {f"{path}.{n}" if path else n for path, mod in m.named_modules() if isinstance(mod, norm_types)
               for n, _ in mod.named_parameters(recurse=False)}
    heads = set(head_parameter_names(m))
    out = {}
    for name, p in m.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name in heads or name in in_norm or "norm" in name:
            continue
        if any(t in name for t in _DENSE_FROZEN):
            continue
        if "bias" in leaf or "gamma" in leaf:
            out[name] = p
    return out
