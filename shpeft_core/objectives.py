"""Task kinds: what a task's targets are, and what that means for the head's loss and probabilities.

| kind           | target of one image                                   | head      | loss                              | probabilities        |
|----------------|-------------------------------------------------------|-----------|-----------------------------------|----------------------|
| `single_label` | class index, int64                                    | C logits  | cross-entropy                     | softmax              |
| `ordinal`      | grade index 0..C-1, int64 (grades ordered)            | C logits  | cross-entropy                     | softmax              |
| `multi_label`  | C floats: 1 finding present, 0 absent, NaN unknown    | C logits  | binary cross-entropy per finding  | sigmoid per finding  |

Every place that turns logits into a loss or probabilities (training, evaluation, the importance pass,
the warm head, serving) goes through :func:`task_loss` and :func:`probabilities`, so a method never
decides the loss itself. Invariants: the multi-label loss is the mean over the *known* (non-NaN)
entries of the batch, unknown entries contribute neither loss nor gradient, and a batch without any
known entry gives a zero loss with a zero gradient (never NaN). Ordinal tasks keep cross-entropy: their
order shows in the metric (quadratic weighted kappa, ``shpeft_core.label_metrics``), not the loss.
``supcon_loss`` is the head-free loss of GPS's importance pass: it compares targets by ``target_keys``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import KINDS

__all__ = ["KINDS", "TaskKindError", "check_kind", "task_loss", "supcon_loss", "probabilities", "check_targets",
           "target_keys"]


class TaskKindError(ValueError):
    """An unknown task kind, or targets that do not fit the task's kind and size."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise TaskKindError(f"task kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def task_loss(logits: Tensor, targets: Tensor, kind: str = "single_label", *, label_smoothing: float = 0.0) -> Tensor:
    """The task's training loss of ``logits`` [B, C] against ``targets`` (see the module table)."""
    if check_kind(kind) != "multi_label":
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    targets = targets.to(logits.dtype)
    known = ~torch.isnan(targets)
    if not bool(known.any()):
        return (logits * 0).sum()  # nothing known in this batch: no loss, no gradient
    y = torch.where(known, targets, torch.zeros_like(targets))
    if label_smoothing:
        y = y * (1 - label_smoothing) + 0.5 * label_smoothing
    per_entry = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return per_entry[known].mean()


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) on L2-normalised features; no head involved.

    ``features`` [N, D] hold every view of every image (views concatenated, ``labels`` repeated): each
    anchor's positives are the other rows with its label, its own other views included. This is the
    reference SupConLoss with contrast_mode 'all' and temperature = base_temperature, as GPS uses it.
    Float64 features are kept in float64; anything else is computed in float32.
    """
    z = F.normalize(features if features.dtype == torch.float64 else features.float(), dim=1)
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


def probabilities(logits: Tensor, kind: str = "single_label") -> Tensor:
    """Per-class probabilities (softmax over classes) or per-finding ones (a sigmoid each, multi_label)."""
    if check_kind(kind) == "multi_label":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def check_targets(targets: Tensor, kind: str, num_classes: int) -> None:
    """Raise TaskKindError when ``targets`` cannot be targets of a ``kind`` task with ``num_classes`` outputs."""
    if check_kind(kind) == "multi_label":
        if targets.dim() != 2 or targets.shape[1] != num_classes or not targets.is_floating_point():
            raise TaskKindError(f"multi_label targets must be float [batch, {num_classes}] (1 / 0 / NaN unknown), "
                                f"got {targets.dtype} {tuple(targets.shape)}")
        known = targets[~torch.isnan(targets)]
        if known.numel() and not bool(((known == 0) | (known == 1)).all()):
            raise TaskKindError("multi_label targets must be 1 (present), 0 (absent) or NaN (unknown)")
        return
    if targets.dim() != 1 or targets.is_floating_point():
        raise TaskKindError(f"{kind} targets must be integer class indices [batch], got {targets.dtype} "
                            f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise TaskKindError(f"labels must be in [0, {num_classes}), got [{int(targets.min())}, {int(targets.max())}]")


def target_keys(targets: Tensor, kind: str) -> Tensor:
    """One integer per image that is equal exactly when two images have the same target (unknown findings
    count as their own value): what a label-equality loss such as supervised contrastive compares."""
    if check_kind(kind) != "multi_label":
        return targets
    coded = torch.where(torch.isnan(targets), torch.full_like(targets, 2.0), targets).to(torch.int64)
    return torch.unique(coded, dim=0, return_inverse=True)[1]
