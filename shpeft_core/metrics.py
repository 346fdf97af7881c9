"""Per-class metrics of a classifier's outputs: confusion matrix, sensitivity, specificity, one-vs-rest AUC.

A value that is undefined on the data at hand is ``None``, never a crash and never a made-up number:
sensitivity and AUC of a class with no sample in the split, specificity and AUC of a class that every
sample belongs to. Macro values average the classes where the value is defined.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["class_metrics", "json_safe"]


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def class_metrics(labels, probs, num_classes: int) -> dict[str, Any]:
    """Per-class metrics of integer ``labels`` [N] against class probabilities ``probs`` [N, C].

    The prediction is the arg-max of ``probs``. Returns ``confusion`` (rows: true class, columns:
    predicted class), per-class lists ``support``, ``sensitivity`` (TP/(TP+FN), the recall),
    ``specificity`` (TN/(TN+FP)) and ``auc`` (one-vs-rest ROC AUC of the class's probability), and
    ``macro_sensitivity``, ``macro_specificity``, ``macro_auc``.
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
