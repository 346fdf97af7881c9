"""Shared test set-up for the orchestrator tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shpeft_core.backbone import BackboneSpec, create_backbone, head_parameter_names
from shpeft_core.delta import TaskDelta, extract_delta, save_delta
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.selection import select_mask
from shpeft_core.sparse import apply_sparse_training
from tasks.synthetic import write_task_family


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


# ---------------------------------------------------------------- a backbone file and tasks shared by the Ray tests

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


def write_seeded_backbone(path: str, kwargs: dict) -> str:
    """A seeded test_vit's weights as a safetensors file at ``path`` (the same weights for the same kwargs)."""
    import safetensors.torch
    import timm

    torch.manual_seed(123)
    model = timm.create_model("test_vit", num_classes=7, **kwargs)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def backbone_file(tmp_path_factory):
    """A 'pre-trained' backbone as a local safetensors file, like a user's own weights."""
    assert BACKBONE["name"] == "test_vit"
    path = write_seeded_backbone(str(tmp_path_factory.mktemp("weights") / "test_vit.safetensors"), BACKBONE["kwargs"])
    BACKBONE["source"] = path
    yield path


@pytest.fixture(scope="module")
def task_specs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    return write_task_family(root, n_tasks=2, images_per_task=60, formats=("medmnist", "imagefolder"), seed=3)


def colour_task(root, name, seed):
    """A task any backbone can learn: the class is the image's dominant colour (plus noise)."""
    from tasks.synthetic import write_colour_task

    return write_colour_task(root, name, seed, n_train=48, n_eval=24, noise=40.0)
