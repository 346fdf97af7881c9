"""LoRA (peft) adapters on the attention and MLP projections, plus the head; saved as peft's adapter
folder with the head beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import register_method
from .base import Method

# Regex full-matched against module paths (peft's target_modules): timm ViT/DeiT blocks' projections.
LORA_TARGETS = r".*blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = LORA_TARGETS


@register_method
class LoRA(Method):
    name = "lora"
    help = "peft LoRA adapters on qkv/proj/fc1/fc2 + head"
    artifact = "lora"
    default_lr = 3e-3
    settings_section = "lora"

    def tuning_space(self) -> dict[str, list]:
        return {"rank": [4, 8, 16]}

    def budget_label(self, *, density, granularity, equal_budget, settings=None) -> str:
        lora = LoraSettings(**(settings or {}))
        return f"own: LoRA rank {lora.rank} on qkv/proj/fc1/fc2 + head"

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        from peft import LoraConfig, get_peft_model

        from .dense import freeze_all, unfreeze_head

        lora = LoraSettings(**(settings or {}))
        freeze_all(model)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.targets, bias="none")
        # peft injects its layers into the timm model in place; training goes through the timm model
        # itself so its head keeps its timm names (peft would otherwise wrap it as modules_to_save).
        wrapper = get_peft_model(model, config)
        inner = wrapper.base_model.model
        unfreeze_head(inner)
        return inner, wrapper
