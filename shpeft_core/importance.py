"""Task-specific importance from gradients, and task-agnostic importance pooled over datasets or taken
from the pre-trained weights' magnitude (the data-free map of a task that has no other dataset beside it).

Every map holds one float32 score per eligible weight entry, under the weight's parameter name."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _st, io
from .backbone import backbone_fingerprint, head_parameter_names, unwrap
from .backbone import backbone_name as model_backbone_name
from .eligibility import eligible_parameters
from .options import ESTIMATORS, HEAD_WARMUPS, LOSSES, REDUCES
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
    "supcon_loss",
]

IMPORTANCE_FORMAT = "shpeft-importance/1"


class ImportanceError(ValueError):
    """Bad importance input: unknown estimator, empty loader, maps that do not match."""


@dataclass
class ImportanceConfig:
    estimator: Literal["grad2", "grad1", "taylor1", "taylor2"] = "grad2"
    num_batches: int = 16
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
        if self.num_batches < 1:
            raise ImportanceError(f"num_batches must be >= 1, got {self.num_batches}")
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


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) on L2-normalised features; no head involved."""
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    sim = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return (z * 0).sum()  # no positive pair in the batch: zero loss, zero gradient
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


def _features(model: nn.Module, x: Tensor) -> Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def _ridge(head: nn.Linear, feats: Tensor, labels: Tensor, num_classes: int, lam: float) -> None:
    f = feats.to(torch.float64)
    mu = f.mean(0, keepdim=True)
    fc = f - mu
    y = F.one_hot(labels, num_classes).to(torch.float64)
    ym = y.mean(0, keepdim=True)
    a = fc.t() @ fc + lam * f.shape[0] * torch.eye(f.shape[1], dtype=torch.float64, device=f.device)
    w = torch.linalg.solve(a, fc.t() @ (y - ym))  # [D, C]
    head.weight.copy_(w.t().to(head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_((ym - mu @ w).reshape(-1).to(head.bias.dtype))


def warm_head(model: nn.Module, feats: Tensor, labels: Tensor, config: ImportanceConfig, num_classes: int) -> None:
    """Fit the classifier on frozen features so task gradients are not driven by a random head."""
    head = unwrap(model).get_classifier()
    if config.head_warmup == "none":
        return
    if not isinstance(head, nn.Linear):
        raise ImportanceError(f"head warm-up needs a Linear classifier, got {type(head).__name__}")
    if config.head_warmup == "ridge":
        _ridge(head, feats, labels, num_classes, config.ridge_lambda)
        return
    params = list(head.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.head_warmup_lr)
    feats = feats.detach()
    for _ in range(config.head_warmup_steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(feats), labels).backward()
        opt.step()
    for p, s in zip(params, saved):
        p.requires_grad_(s)


def _batches(loader, n: int, device) -> list[tuple[Tensor, Tensor]]:
    out = []
    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        out.append((x.to(device), y.to(device)))
    return out


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
) -> ImportanceMap:
    """Per-weight task importance over the first ``config.num_batches`` batches of ``loader``.

    ``on_batch(done, total)`` is called after each batch's gradients (progress display).

    Works on a copy of ``model``: the head is resized to ``num_classes`` and warmed up on frozen
    features, then per-batch gradients of the task loss w.r.t. the eligible weights give
    grad2 = sum g^2, grad1 = |sum g|, taylor1 = |sum g*w|, taylor2 = sum (g*w)^2.
    """
    config = config or ImportanceConfig()
    name = backbone_name or model_backbone_name(model)
    fingerprint = backbone_fingerprint(model)
    m = copy.deepcopy(unwrap(model)).to(device)
    if m.get_classifier() is None or getattr(m, "num_classes", num_classes) != num_classes:
        m.reset_classifier(num_classes)
    m.eval()  # no dropout / drop-path: the gradient of the deterministic network
    for p in m.parameters():
        p.requires_grad_(False)
    batches = _batches(loader, config.num_batches, device)
    if not batches:
        raise ImportanceError("importance loader yielded no batches")
    for x, y in batches:
        if y.min() < 0 or y.max() >= num_classes:
            raise ImportanceError(f"labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    warmed = None
    if config.loss == "ce" and config.head_warmup != "none":
        with torch.no_grad():
            feats = torch.cat([_features(m, x) for x, _ in batches])
        warm_head(m, feats, torch.cat([y for _, y in batches]), config, num_classes)
        for p in m.parameters():
            p.requires_grad_(False)
        params_by_name = dict(m.named_parameters())
        warmed = {n: params_by_name[n].detach().cpu().clone() for n in head_parameter_names(m)}
    params = eligible_parameters(m, config.rules)
    if not params:
        raise ImportanceError(f"no eligible parameters in {name or type(m).__name__}")
    for p in params.values():
        p.requires_grad_(True)
    # float32 accumulation (float64 kept for float64 models): half-precision grads would lose the tails.
    acc_dtype = {n: torch.float64 if p.dtype == torch.float64 else torch.float32 for n, p in params.items()}
    acc = {n: torch.zeros_like(p, dtype=acc_dtype[n]) for n, p in params.items()}
    weights = {n: p.detach().to(acc_dtype[n]) for n, p in params.items()}
    for i, (x, y) in enumerate(batches):
        if on_batch is not None:
            on_batch(i, len(batches))
        if config.loss == "supcon":
            loss = supcon_loss(_features(m, x), y, config.supcon_temperature)
        else:
            loss = F.cross_entropy(m(x), y)
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
    if on_batch is not None:
        on_batch(len(batches), len(batches))
    if config.estimator in ("grad1", "taylor1"):
        acc = {n: t.abs() for n, t in acc.items()}
    metadata = {
        "backbone": name,
        "backbone_fingerprint": fingerprint,
        "estimator": config.estimator,
        "batches": str(len(batches)),
        "dataset_fingerprint": dataset_fingerprint,
        "loss": config.loss,
        "head_warmup": config.head_warmup if config.loss == "ce" else "none",
        "num_classes": str(num_classes),
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
