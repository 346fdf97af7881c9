"""Full fine-tuning: every weight trains; the artifact is a plain timm checkpoint."""

from __future__ import annotations

from typing import Any

from . import register_method
from .base import Method


@register_method
class Full(Method):
    name = "full"
    help = "every weight (full fine-tuning)"
    artifact = "checkpoint"
    default_lr = 3e-4
    trains_all = True

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
