"""Tiny models and data shared by the core tests."""

from __future__ import annotations

import torch

from shpeft_core import BackboneSpec, create_backbone

TINY = {
    "vit": BackboneSpec("test_vit", None, {"img_size": 32}),
    "convnext": BackboneSpec("test_convnext", None, {}),
    "deit_distilled": BackboneSpec("deit_tiny_distilled_patch16_224", None, {"img_size": 32, "depth": 2}),
    "swin": BackboneSpec(
        "swin_tiny_patch4_window7_224", None,
        {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 56, "window_size": 7},
    ),
}
IMG = {"vit": 32, "convnext": 32, "swin": 56, "deit_distilled": 32}


def tiny_model(kind: str = "vit", num_classes: int = 3):
    return create_backbone(TINY[kind], num_classes)


def separable_batches(n: int = 96, batch: int = 16, size: int = 32, num_classes: int = 2, seed: int = 0):
    """Images whose class is the sign of a colour-channel offset: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    for c in range(num_classes):
        x[y == c, c % 3] += 1.5
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
