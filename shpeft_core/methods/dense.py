"""Methods that train a fixed set of whole parameters: the head only, or every bias and the head. They need
no importance map (they still start from the same warm head as every other method)."""

from __future__ import annotations

from typing import Any

from . import register_method
from .base import Method


def freeze_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model) -> None:
    from ..backbone import head_parameter_names

    params = dict(model.named_parameters())
    for n in head_parameter_names(model):
        params[n].requires_grad_(True)


@register_method
class HeadOnly(Method):
    name = "linear"
    help = "the head only (linear probe)"
    artifact = "delta"  # a task delta without values
    head_only = True

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        freeze_all(model)
        unfreeze_head(model)
        return model, None


@register_method
class BitFit(Method):
    name = "bitfit"
    help = "every bias and the head (BitFit)"
    artifact = "checkpoint"
    default_lr = 1e-3

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        freeze_all(model)
        for n, p in model.named_parameters():
            if n.endswith(".bias") or n == "bias":
                p.requires_grad_(True)
        unfreeze_head(model)
        return model, None
