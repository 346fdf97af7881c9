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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import KINDS

__all__ = ["KINDS", "TaskKindError", "check_kind", "task_loss", "probabilities", "check_targets", "target_keys"]


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
