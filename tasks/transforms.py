"""Image transforms: PIL RGB image -> float tensor [3,H,W].

``transform_for`` is the backbone's own preprocessing (timm); ``default_transform`` only resizes and
scales to [0,1] (torchvision), for loaders built without a model. ``two_views`` turns a transform into
one that returns two independent draws of it (a loader then yields ``([view1, view2], labels)``), and
``gps_views`` is the pair of augmented views GPS's importance pass contrasts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spec import TaskSpec

__all__ = ["default_transform", "transform_for", "two_views", "gps_views", "TwoViews"]


def default_transform(spec: TaskSpec) -> Callable:
    """No normalisation: float [3,H,W] in [0,1], resized (bilinear, by PIL) to ``spec.image_size`` when it is set."""
    from torchvision import transforms as T

    to_tensor = T.ToTensor()
    if spec.image_size is None:
        return to_tensor
    return T.Compose([T.Resize((spec.image_size, spec.image_size), interpolation=T.InterpolationMode.BILINEAR), to_tensor])


def transform_for(model_or_data_config, *, train: bool, **overrides) -> Callable:
    """The backbone's own preprocessing via timm.data.resolve_data_config / create_transform.

    Accepts a timm model, a data-config dict (input_size, mean, std, interpolation, crop_pct)
    or an int image size. Training defaults are mild for medical images: random resized crop
    with scale (0.6, 1), no flip, no colour jitter; ``overrides`` go to create_transform.
    """
    from timm.data import create_transform, resolve_data_config

    if isinstance(model_or_data_config, torch.nn.Module):
        from shpeft_core.backbone import unwrap

        # DDP / Ray Train wrap the model; the data config lives on the inner timm model
        model = unwrap(model_or_data_config)
        cfg = dict(resolve_data_config(model=model))
        # timm keeps the pretrained config's input size (160 for test_vit) even when the model was
        # built with another img_size; the patch embedding knows the size it really takes.
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
            if tuple(cfg["input_size"][1:]) != size:
                cfg["input_size"] = (cfg["input_size"][0], *size)
                cfg["crop_pct"] = 1.0  # no centre-crop margin at a training-sized input
    elif isinstance(model_or_data_config, int):
        cfg = resolve_data_config(args={"input_size": (3, model_or_data_config, model_or_data_config)})
    elif isinstance(model_or_data_config, dict):
        cfg = resolve_data_config(args=dict(model_or_data_config))
    else:
        raise TypeError(f"transform_for: expected a timm model, a data-config dict or an int, got {type(model_or_data_config).__name__}")
    kwargs = dict(
        input_size=cfg["input_size"],
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
    )
    if train:
        # No horizontal flip: left/right carries meaning in medical images (laterality, lesion side).
        kwargs.update(scale=(0.6, 1.0), hflip=0.0, color_jitter=None)
    kwargs.update(overrides)
    return create_transform(is_training=train, **kwargs)


class TwoViews:
    """``image -> [transform(image), transform(image)]``: two independent draws of a random transform.

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def two_views(transform: Callable) -> TwoViews:
    return TwoViews(transform)


def gps_views(model_or_data_config, **overrides) -> TwoViews:
    """The two augmented views of GPS's importance pass (github.com/FightingFighting/GPS,
    data/transforms_factory.py, transforms_contrastaug_train): random resized crop at timm's default
    scale (0.08, 1), horizontal flip 0.5, colour jitter (0.4, 0.4, 0.4, 0.1) applied with p 0.8,
    grayscale with p 0.2. Unlike training (no flip, for laterality), the reference's flip is kept: the
    views only decide which weights GPS ranks first, and GPS is run as published. ``overrides`` go to
    ``transform_for`` (e.g. ``hflip=0.0``)."""
    kwargs = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8,
                  grayscale_prob=0.2)
    kwargs.update(overrides)
    return TwoViews(transform_for(model_or_data_config, train=True, **kwargs))
