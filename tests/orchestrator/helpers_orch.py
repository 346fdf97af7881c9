"""Shared test set-up for the orchestrator tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shpeft_core.backbone import BackboneSpec, create_backbone, head_parameter_names
from shpeft_core.delta import TaskDelta, extract_delta, save_delta
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.selection import select_mask
from shpeft_core.sparse import apply_sparse_training


def random_delta(spec: BackboneSpec, path: Path, task: str, class_names: list[str], *, seed: int,
                 density: float, scale: float) -> TaskDelta:
    """A seeded delta saved at ``path``: a random mask of ``density``, sparse values of std ``scale`` and a
    random head, standing in for a trained one (non-zero values, a non-trivial head)."""
    gen = torch.Generator().manual_seed(seed)
    model = create_backbone(spec, len(class_names))
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in eligible_parameters(model).items()}
    apply_sparse_training(model, select_mask(scores, density, "global"))
    heads = set(head_parameter_names(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".values"):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            elif name in heads:
                p.copy_(torch.randn(p.shape, generator=gen))
    delta = extract_delta(model, metadata={"alpha": "0.5", "estimator": "grad2", "importance_key": "k" + task,
                                           "task": task, "class_names": json.dumps(class_names)})
    save_delta(delta, str(path))
    return delta
