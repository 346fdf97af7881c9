"""Evaluation of a saved artifact: a freshly built backbone with the artifact applied, on val and test."""

from __future__ import annotations

import time
from typing import Any

__all__ = ['evaluate_artifact']


def evaluate_artifact(plan, batch_size: int | None = None) -> dict[str, Any]:
    """Metrics of the saved artifact: a fresh backbone + the artifact, on val and test."""
    import torch

    from shpeft_core.methods import artifact_kind, artifact_sha256, artifact_size, load_artifact
    from shpeft_core.train import evaluate
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for
    from tasks.spec import TaskSpec

    from .train_loop import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(plan.task)
    device = "cuda" if plan.use_gpu and torch.cuda.is_available() else "cpu"
    model = load_artifact(build_backbone(plan.backbone, spec.num_classes), plan.method, plan.artifact_uri)
    model.to(device).eval()
    tf = transform_for(model, train=False)
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        loader = build_loader(spec, split, transform=tf, batch_size=batch_size or plan.batch_size)
        for k, v in evaluate(model, loader, num_classes=spec.num_classes, device=device).items():
            out[f"{split}_{k}"] = float(v)
    kind = artifact_kind(plan.method)
    if kind == "delta":
        from shpeft_core.delta import load_delta

        delta = load_delta(plan.artifact_uri)
        sparse = int(sum(v.numel() for v in delta.values.values()))
        out.update(sparse_values=sparse, trainable=sparse + int(sum(v.numel() for v in delta.head.values())))
    out.update(sha256=artifact_sha256(plan.artifact_uri, kind), bytes=artifact_size(plan.artifact_uri, kind),
               eval_s=time.perf_counter() - t0)
    return out
