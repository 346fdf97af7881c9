"""Which weights may be selected: exact module-path rules over supported layer types."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .backbone import head_module_paths, unwrap

__all__ = ["DEFAULT_RULES", "eligible_parameters", "eligible_modules", "is_supported_module"]

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
