"""Task-specific importance from gradients, and task-agnostic importance pooled over datasets or taken
from the pre-trained weights' magnitude (the data-free map of a task that has no other dataset beside it).

Every map holds one float32 score per eligible weight entry, under the weight's parameter name.

Invariants: ``compute_importance`` never changes the model it is given (it works on a copy); with a
``seed`` the map, and the warmed head stored with it, are a function of (model, data, config, seed)
only, bit for bit: the seed draws the head initialisation, the loader's order (``set_epoch``) and
the in-process augmentation, and every RNG it touches is restored afterwards. A batch may carry
several augmented views of the same images (``[view1, view2]``, as ``tasks.transforms.two_views``
yields); the supervised-contrastive loss then treats the views of an image as positives (GPS).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _st, io
from .backbone import backbone_fingerprint, head_parameter_names, unwrap
from .backbone import backbone_name as model_backbone_name
from .eligibility import eligible_parameters
from .options import ESTIMATORS, HEAD_WARMUPS, LOSSES, REDUCES
from .objectives import TaskKindError, check_targets, supcon_loss, target_keys, task_loss
from .selection import normalize_scores

__all__ = [
    "ESTIMATORS",
    "ImportanceConfig",
    "ImportanceMap",
    "ImportanceError",
    "compute_importance",
    "combine_importance",
    "magnitude_importance",
    "warm_head",
    "load_warm_head",
]

IMPORTANCE_FORMAT = "shpeft-importance/1"


class ImportanceError(ValueError):
    """Bad importance input: unknown estimator, empty loader, maps that do not match."""


@dataclass
class ImportanceConfig:
    estimator: Literal["grad2", "grad1", "taylor1", "taylor2"] = "grad2"
    num_batches: int | None = 16  # None: one whole pass over the loader (GPS)
    head_warmup: Literal["linear_probe", "ridge", "none"] = "linear_probe"
    head_warmup_steps: int = 100
    head_warmup_lr: float = 1e-2
    ridge_lambda: float = 1e-3
    loss: Literal["ce", "supcon"] = "ce"
    supcon_temperature: float = 0.07
    rules: tuple[str, ...] | None = None  # eligibility rules; None = DEFAULT_RULES

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ImportanceError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.num_batches is not None and self.num_batches < 1:
            raise ImportanceError(f"num_batches must be >= 1 or None (one whole pass), got {self.num_batches}")
        if self.head_warmup not in HEAD_WARMUPS:
            raise ImportanceError(f"head_warmup must be one of {HEAD_WARMUPS}, got {self.head_warmup!r}")
        if self.loss not in LOSSES:
            raise ImportanceError(f"loss must be one of {LOSSES}, got {self.loss!r}")


# Tensors of the head warmed for the importance pass are stored under this prefix (timm names after it).
HEAD_PREFIX = "warm_head/"


@dataclass
class ImportanceMap:
    """Parameter name -> float32 score tensor of that parameter's shape, plus string metadata.

    ``head`` holds the classifier warmed on the task's frozen features during the importance pass
    (timm parameter names), so training can start from it instead of a random head.
    """

    scores: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    head: dict[str, Tensor] | None = None

    def save(self, uri: str) -> str:
        """Atomic safetensors write through fsspec, then its sha256 sidecar; returns the sha256."""
        meta = {"shpeft_importance": IMPORTANCE_FORMAT, **self.metadata}
        tensors = {k: v.detach().to(torch.float32) for k, v in self.scores.items()}
        tensors.update({HEAD_PREFIX + k: v.detach() for k, v in (self.head or {}).items()})
        sha = _st.write(uri, tensors, meta)[0]
        io.write_checksum(uri, sha)
        return sha

    @classmethod
    def load(cls, uri: str) -> "ImportanceMap":
        tensors, meta = _st.read(uri)
        if meta.get("shpeft_importance") != IMPORTANCE_FORMAT:
            raise ImportanceError(f"{uri}: not an importance map (metadata shpeft_importance missing)")
        head = {k[len(HEAD_PREFIX):]: t for k, t in tensors.items() if k.startswith(HEAD_PREFIX)}
        scores = {k: t for k, t in tensors.items() if not k.startswith(HEAD_PREFIX)}
        for name, t in scores.items():
            if t.dtype != torch.float32:
                raise ImportanceError(f"{uri}: {name} is {t.dtype}, expected float32")
            if not torch.isfinite(t).all():
                raise ImportanceError(f"{uri}: {name} holds NaN or infinite scores")
        meta = {k: v for k, v in meta.items() if k != "shpeft_importance"}
        return cls(scores=scores, metadata=meta, head=head or None)


def load_warm_head(model: nn.Module, imap: ImportanceMap) -> bool:
    """Copy the importance pass's warmed head into ``model``'s classifier; False when there is none.

    Raises when the map's head does not fit the classifier (another class count or backbone).
    """
    if not imap.head:
        return False
    net = unwrap(model)
    params = dict(net.named_parameters())
    names = head_parameter_names(net)
    if set(imap.head) != set(names):
        raise ImportanceError(f"warmed head {sorted(imap.head)} does not match the classifier {sorted(names)}")
    with torch.no_grad():
        for n in names:
            src = imap.head[n]
            if tuple(src.shape) != tuple(params[n].shape):
                raise ImportanceError(f"warmed head {n}: shape {tuple(src.shape)} vs classifier {tuple(params[n].shape)}")
            params[n].copy_(src.to(params[n].dtype))
    return True


def _features(model: nn.Module, x: Tensor) -> Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _ridge_targets(labels: Tensor, num_classes: int, kind: str) -> Tensor:
    """One-hot classes, or the findings with each unknown entry set to its finding's known mean."""
    if kind != "multi_label":
        return F.one_hot(labels, num_classes).to(torch.float64)
    y = labels.to(torch.float64)
    known = ~torch.isnan(y)
    mean = torch.where(known, y, torch.zeros_like(y)).sum(0) / known.sum(0).clamp(min=1)
    return torch.where(known, y, mean.expand_as(y))


@torch.no_grad()
def _ridge(head: nn.Linear, feats: Tensor, labels: Tensor, num_classes: int, lam: float,
           kind: str = "single_label") -> None:
    f = feats.to(torch.float64)
    mu = f.mean(0, keepdim=True)
    fc = f - mu
    y = _ridge_targets(labels, num_classes, kind)
    ym = y.mean(0, keepdim=True)
    a = fc.t() @ fc + lam * f.shape[0] * torch.eye(f.shape[1], dtype=torch.float64, device=f.device)
    w = torch.linalg.solve(a, fc.t() @ (y - ym))  # [D, C]
    head.weight.copy_(w.t().to(head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_((ym - mu @ w).reshape(-1).to(head.bias.dtype))


def _reset_head(model: nn.Module, num_classes: int, seed: int) -> None:
    """A fresh classifier for ``num_classes`` drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unwrap(model).reset_classifier(num_classes)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seed torch (CPU), ``random`` and NumPy for the block (the transforms draw from them), then restore."""
    if seed is None:
        yield
        return
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(int(seed))
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def warm_head(model: nn.Module, feats: Tensor, labels: Tensor, config: ImportanceConfig, num_classes: int,
              kind: str = "single_label", *, seed: int | None = None) -> None:
    """Fit the classifier on frozen features so task gradients are not driven by a random head.

    The linear probe minimises the task kind's loss (``shpeft_core.objectives.task_loss``); ridge regresses
    one-hot classes, or the findings (unknown entries at their finding's mean) for multi_label.

    With ``seed`` the classifier is first re-initialised from it (linear_probe starts from that head;
    ridge is closed-form and does not depend on it).
    """
    if seed is not None:
        device = feats.device
        _reset_head(model, num_classes, seed)
        unwrap(model).get_classifier().to(device)
    head = unwrap(model).get_classifier()
    if config.head_warmup == "none":
        return
    if not isinstance(head, nn.Linear):
        raise ImportanceError(f"head warm-up needs a Linear classifier, got {type(head).__name__}")
    if config.head_warmup == "ridge":
        _ridge(head, feats, labels, num_classes, config.ridge_lambda, kind)
        return
    params = list(head.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.head_warmup_lr)
    feats = feats.detach()
    for _ in range(config.head_warmup_steps):
        opt.zero_grad(set_to_none=True)
        task_loss(head(feats), labels, kind).backward()
        opt.step()
    for p, s in zip(params, saved):
        p.requires_grad_(s)


def _views(x) -> tuple[Tensor, int]:
    """A batch's images with its augmented views concatenated ([view1; view2; ...]) and the view count."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ImportanceError("a batch holds an empty list of views")
        return torch.cat(list(x)), len(x)
    return x, 1


def _draw(loader, n: int | None, device, num_classes: int, kind: str = "single_label"):
    """The first ``n`` batches of ``loader`` (all of them when n is None) on ``device``, targets checked
    against the task kind (``shpeft_core.objectives``)."""
    for i, (x, y) in enumerate(loader):
        if n is not None and i >= n:
            break
        try:
            check_targets(y, kind, num_classes)
        except TaskKindError as exc:
            raise ImportanceError(str(exc)) from None
        x, views = _views(x)
        yield x.to(device), y.to(device).repeat(views, *([1] * (y.dim() - 1))), views


def _total_batches(loader, n: int | None) -> int:
    try:
        size = len(loader)
    except TypeError:  # an iterable without a length
        return n or 0
    return size if n is None else min(n, size)


def compute_importance(
    model: nn.Module,
    loader,
    config: ImportanceConfig | None = None,
    *,
    num_classes: int,
    dataset_fingerprint: str = "",
    device: str = "cpu",
    backbone_name: str = "",
    on_batch=None,
    seed: int | None = None,
    kind: str = "single_label",
) -> ImportanceMap:
    """Per-weight task importance over the first ``config.num_batches`` batches of ``loader`` (all of
    them, one whole pass, when it is None).

    ``on_batch(done, total)`` is called after each batch's gradients (progress display).

    Works on a copy of ``model``: the head is resized to ``num_classes`` and, for the cross-entropy
    loss, warmed up on frozen features; then per-batch gradients of the task loss w.r.t. the eligible
    weights give grad2 = sum g^2, grad1 = |sum g|, taylor1 = |sum g*w|, taylor2 = sum (g*w)^2.

    ``seed`` (the run's seed) draws what a run should vary: the head's initialisation, the batches
    (a loader with ``set_epoch``, such as ``tasks.loaders.TaskLoader``, is moved to epoch ``seed``, so
    its shuffled order comes from (loader seed, ``seed``)), and the augmentation drawn in this process.
    None keeps the model's own head and the loader's next epoch, as before seeds existed.
    """
    config = config or ImportanceConfig()
    name = backbone_name or model_backbone_name(model)
    fingerprint = backbone_fingerprint(model)
    m = copy.deepcopy(unwrap(model))
    if seed is not None:
        _reset_head(m, num_classes, seed)
    elif m.get_classifier() is None or getattr(m, "num_classes", num_classes) != num_classes:
        m.reset_classifier(num_classes)
    m.to(device)
    m.eval()  # no dropout / drop-path: the gradient of the deterministic network
    for p in m.parameters():
        p.requires_grad_(False)
    params = eligible_parameters(m, config.rules)
    if not params:
        raise ImportanceError(f"no eligible parameters in {name or type(m).__name__}")
    total = _total_batches(loader, config.num_batches)
    warmed = None
    # float32 accumulation (float64 kept for float64 models): half-precision grads would lose the tails.
    acc_dtype = {n: torch.float64 if p.dtype == torch.float64 else torch.float32 for n, p in params.items()}
    acc = {n: torch.zeros_like(p, dtype=acc_dtype[n]) for n, p in params.items()}
    weights = {n: p.detach().to(acc_dtype[n]) for n, p in params.items()}
    done, images, views = 0, 0, 1
    with _seeded(seed):
        if seed is not None and hasattr(loader, "set_epoch"):
            loader.set_epoch(int(seed))
        batches = _draw(loader, config.num_batches, device, num_classes, kind)
        if config.loss == "ce" and config.head_warmup != "none":
            # The head is fitted on every batch's features first, so these batches are held in memory.
            batches = list(batches)
            if batches:
                with torch.no_grad():
                    feats = torch.cat([_features(m, x) for x, _, _ in batches])
                warm_head(m, feats, torch.cat([y for _, y, _ in batches]), config, num_classes, kind)
                for p in m.parameters():
                    p.requires_grad_(False)
                params_by_name = dict(m.named_parameters())
                warmed = {n: params_by_name[n].detach().cpu().clone() for n in head_parameter_names(m)}
        for p in params.values():
            p.requires_grad_(True)
        for x, y, views in batches:
            if on_batch is not None:
                on_batch(done, total)
            if config.loss == "supcon":
                loss = supcon_loss(_features(m, x), target_keys(y, kind), config.supcon_temperature)
            else:
                loss = task_loss(m(x), y, kind)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is None:
                    continue
                g = g.to(acc_dtype[n])
                if config.estimator == "grad2":
                    acc[n] += g.square()
                elif config.estimator == "grad1":
                    acc[n] += g
                elif config.estimator == "taylor1":
                    acc[n] += g * weights[n]
                else:
                    acc[n] += (g * weights[n]).square()
            done += 1
            images += y.shape[0] // views
    if done == 0:
        raise ImportanceError("importance loader yielded no batches")
    if on_batch is not None:
        on_batch(done, done)
    if config.estimator in ("grad1", "taylor1"):
        acc = {n: t.abs() for n, t in acc.items()}
    metadata = {
        "backbone": name,
        "backbone_fingerprint": fingerprint,
        "estimator": config.estimator,
        "batches": str(done),
        "images": str(images),
        "views": str(views),
        "dataset_fingerprint": dataset_fingerprint,
        "loss": config.loss,
        "head_warmup": config.head_warmup if config.loss == "ce" else "none",
        "num_classes": str(num_classes),
        "seed": "" if seed is None else str(int(seed)),
        "kind": "specific",
    }
    return ImportanceMap(scores={n: t.to(torch.float32).cpu() for n, t in acc.items()}, metadata=metadata,
                         head=warmed)


def combine_importance(
    maps: list[ImportanceMap],
    *,
    normalization: str = "rank",
    reduce: str = "mean",
    magnitude_blend: float = 0.0,
    model: nn.Module | None = None,
) -> ImportanceMap:
    """Task-agnostic importance: normalise each map over all its entries, reduce, blend in |w|.

    normalization: rank (default; see selection.rank_normalize), max, zscore or none.
    reduce: mean (default), median or max over datasets.
    magnitude_blend b: result = (1 - b) * combined + b * N(|w|), |w| from ``model``.
    """
    if not maps:
        raise ImportanceError("combine_importance needs at least one map")
    if reduce not in REDUCES:
        raise ImportanceError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if not 0.0 <= magnitude_blend <= 1.0:
        raise ImportanceError(f"magnitude_blend must be in [0, 1], got {magnitude_blend}")
    ref = maps[0]
    for i, m in enumerate(maps[1:], 1):
        if set(m.scores) != set(ref.scores):
            diff = sorted(set(m.scores) ^ set(ref.scores))
            raise ImportanceError(f"map {i}: parameter set differs from map 0: {diff[:5]}")
        for n, t in m.scores.items():
            if tuple(t.shape) != tuple(ref.scores[n].shape):
                raise ImportanceError(f"map {i}: {n} has shape {tuple(t.shape)}, map 0 has {tuple(ref.scores[n].shape)}")
        for key in ("backbone", "backbone_fingerprint"):
            a, b = ref.metadata.get(key, ""), m.metadata.get(key, "")
            if a and b and a != b:
                raise ImportanceError(f"map {i}: {key} {b!r} differs from map 0's {a!r}")
    normed = [normalize_scores(m.scores, normalization) for m in maps]
    combined = {}
    for n in ref.scores:
        stack = torch.stack([nm[n] for nm in normed])
        if reduce == "mean":
            combined[n] = stack.mean(0)
        elif reduce == "median":
            combined[n] = stack.median(0).values
        else:
            combined[n] = stack.max(0).values
    if magnitude_blend > 0:
        if model is None:
            raise ImportanceError("magnitude_blend > 0 needs the backbone model")
        params = dict(unwrap(model).named_parameters())
        missing = [n for n in ref.scores if n not in params]
        if missing:
            raise ImportanceError(f"magnitude_blend: model lacks {missing[:5]}")
        mag = normalize_scores({n: params[n].detach().abs() for n in ref.scores}, "rank")
        combined = {n: (1 - magnitude_blend) * combined[n] + magnitude_blend * mag[n] for n in combined}
    fps = sorted(m.metadata.get("dataset_fingerprint", "") for m in maps)
    metadata = {
        "backbone": ref.metadata.get("backbone", ""),
        "backbone_fingerprint": ref.metadata.get("backbone_fingerprint", ""),
        "estimator": "+".join(sorted({m.metadata.get("estimator", "") for m in maps})),
        "batches": str(sum(int(m.metadata.get("batches", "0") or 0) for m in maps)),
        "dataset_fingerprint": hashlib.sha256(json.dumps(fps).encode()).hexdigest(),
        "datasets": json.dumps(fps),
        "normalization": normalization,
        "reduce": reduce,
        "magnitude_blend": repr(float(magnitude_blend)),
        "kind": "agnostic",
    }
    return ImportanceMap(scores={n: t.to(torch.float32) for n, t in combined.items()}, metadata=metadata)


def magnitude_importance(model: nn.Module, rules: tuple[str, ...] | list[str] | None = None) -> ImportanceMap:
    """The pre-trained weights' magnitude |w| as a task-agnostic map: needs no data, one score per eligible entry.

    Ranked like any agnostic map (rank percentile), it equals ``combine_importance(..., magnitude_blend=1)``
    of any pool, so a task with no other dataset beside it can still be selected by the hybrid rules.
    """
    net = unwrap(model)
    params = eligible_parameters(net, rules)
    if not params:
        raise ImportanceError(f"no eligible parameters in {model_backbone_name(net) or type(net).__name__}")
    metadata = {
        "backbone": model_backbone_name(net),
        "backbone_fingerprint": backbone_fingerprint(net),
        "estimator": "magnitude",
        "batches": "0",
        "dataset_fingerprint": hashlib.sha256(json.dumps([]).encode()).hexdigest(),
        "datasets": json.dumps([]),
        "kind": "agnostic",
    }
    return ImportanceMap(scores={n: p.detach().abs().to(torch.float32).cpu() for n, p in params.items()},
                         metadata=metadata)
