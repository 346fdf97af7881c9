"""Per-class metrics of a classifier's outputs: confusion matrix, sensitivity, specificity, one-vs-rest AUC,
and macro-F1 over the task's fixed label set.

A value that is undefined on the data at hand is ``None``, never a crash and never a made-up number:
sensitivity and AUC of a class with no sample in the split, specificity and AUC of a class that every
sample belongs to. Macro sensitivity / specificity / AUC average the classes where the value is defined;
the macro AUC is the unweighted mean of the one-vs-rest ROC AUCs (each class's probability against
all other classes), over the classes with both positives and negatives in the split.

Macro-F1 is different on purpose: it always averages all ``num_classes`` classes 0..C-1, whatever the
split holds, so its value on a split (or a bootstrap resample of one) is comparable across methods and
a class cannot silently drop out. A class absent from the split and never predicted has made no error
and counts F1 = 1 (scikit-learn's ``zero_division=1``); absent but predicted counts 0, as does present
but never predicted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["class_metrics", "macro_f1", "json_safe"]


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def macro_f1(labels, predictions, num_classes: int):
    """Macro-F1 over the fixed label set 0..num_classes-1 (see the module docstring for absent classes).

    ``labels`` [..., N] integer classes; ``predictions`` [..., N] predicted classes, or [..., N, C] class
    scores / probabilities whose arg-max (first maximum on ties) is the prediction. Leading dimensions
    are a batch (bootstrap resamples, seeds): the result has their shape, a float for 1-D input.
    Equals ``sklearn.metrics.f1_score(labels, preds, labels=range(C), average="macro", zero_division=1)``.
    """
    y = np.asarray(labels)
    p = np.asarray(predictions)
    if p.ndim == y.ndim + 1:
        if p.shape[-1] != num_classes:
            raise ValueError(f"predictions have {p.shape[-1]} class scores; expected {num_classes}")
        p = p.argmax(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions have shape {p.shape}; labels have {y.shape}")
    classes = np.arange(num_classes)
    is_y = y[..., None] == classes  # [..., N, C]
    is_p = p[..., None] == classes
    tp = (is_y & is_p).sum(-2)
    denom = is_y.sum(-2) + is_p.sum(-2)  # 2TP + FP + FN
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    out = f1.mean(-1)
    return float(out) if out.ndim == 0 else out


def class_metrics(labels, probs, num_classes: int) -> dict[str, Any]:
    """Per-class metrics of integer ``labels`` [N] against class probabilities ``probs`` [N, C].

    The prediction is the arg-max of ``probs``. Returns ``confusion`` (rows: true class, columns:
    predicted class), per-class lists ``support``, ``sensitivity`` (TP/(TP+FN), the recall),
    ``specificity`` (TN/(TN+FP)) and ``auc`` (one-vs-rest ROC AUC of the class's probability), and
    ``macro_sensitivity``, ``macro_specificity``, ``macro_auc`` (means over the classes where defined).
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], num_classes):
        raise ValueError(f"probs has shape {p.shape}; expected ({y.shape[0]}, {num_classes})")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {int(y.min())}..{int(y.max())}")
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(num_classes)))
    total = int(cm.sum())
    sens, spec, auc, support = [], [], [], []
    for c in range(num_classes):
        tp = int(cm[c, c])
        fn = int(cm[c].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = total - tp - fn - fp
        support.append(tp + fn)
        sens.append(_ratio(tp, tp + fn))
        spec.append(_ratio(tn, tn + fp))
        pos = y == c
        # One-vs-rest AUC needs both positives and negatives of the class in the split.
        auc.append(float(roc_auc_score(pos.astype(np.int64), p[:, c])) if pos.any() and (~pos).any() else None)
    return {
        "confusion": cm.astype(int).tolist(),
        "support": support,
        "sensitivity": sens,
        "specificity": spec,
        "auc": auc,
        "macro_sensitivity": _mean(sens),
        "macro_specificity": _mean(spec),
        "macro_auc": _mean(auc),
    }


def json_safe(x: Any) -> Any:
    """``x`` with NaN / inf as None and NumPy scalars as Python numbers, so strict JSON can hold it."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
