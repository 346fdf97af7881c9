"""Metrics of the task kinds beyond single-label classes: per-finding metrics of multi-label tasks and the
quadratic weighted kappa of ordinal grades (scikit-learn computes AUROC, F1 and kappa).

Multi-label targets are [N, C] floats: 1 present, 0 absent, NaN unknown (an uncertain label the task
ignores); every metric of a finding uses only the images where that finding is known. A value that is
undefined on the data (the AUROC of a finding with no positive or no negative case) is ``None``; macro
values average the findings where the value is defined.

F1 needs a threshold on each finding's probability: :func:`best_thresholds` picks, per finding, the one
with the highest F1 on the data it is given (the validation split); :func:`finding_metrics` applies
thresholds chosen elsewhere, so a test split's F1 uses thresholds it never saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["quadratic_kappa", "best_thresholds", "finding_metrics", "ROC_POINTS"]

ROC_POINTS = 101  # ROC curves are kept at this many false-positive rates (evaluation files stay small)


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def quadratic_kappa(labels, predictions, num_classes: int) -> float | None:
    """Cohen's kappa with quadratic weights over grades 0..num_classes-1; None when it is undefined
    (every label and prediction the same grade: no disagreement is possible)."""
    from sklearn.metrics import cohen_kappa_score

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if y.size == 0:
        return None
    import warnings

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the undefined case is reported as None, not as a warning
        k = cohen_kappa_score(y, p, labels=list(range(num_classes)), weights="quadratic")
    return float(k) if np.isfinite(k) else None


def _known(targets: np.ndarray, probs: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(targets[:, c])
    return targets[keep, c].astype(np.int64), probs[keep, c]


def best_thresholds(targets, probs) -> list[float]:
    """Per finding, the probability threshold (predict present when p >= t) with the highest F1 on this
    data; 0.5 for a finding without a known positive."""
    from sklearn.metrics import precision_recall_curve

    t, p = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    out = []
    for c in range(t.shape[1]):
        y, s = _known(t, p, c)
        if y.sum() == 0:
            out.append(0.5)
            continue
        precision, recall, thresholds = precision_recall_curve(y, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
        out.append(float(thresholds[int(np.argmax(f1))]))
    return out


def _roc(y: np.ndarray, s: np.ndarray) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    grid = np.linspace(0.0, 1.0, ROC_POINTS)
    # The step curve's upper envelope at each grid point (the best sensitivity at that false-positive rate).
    tpr_grid = np.array([tpr[fpr <= g].max() for g in grid])
    return {"fpr": [round(float(v), 4) for v in grid], "tpr": [round(float(v), 4) for v in tpr_grid]}


def finding_metrics(targets, probs, thresholds: list[float] | None = None, *, roc: bool = True) -> dict[str, Any]:
    """Per-finding metrics of ``probs`` [N, C] (sigmoid outputs) against ``targets`` [N, C] (1 / 0 / NaN).

    ``thresholds``: one per finding (default: :func:`best_thresholds` on this data). Returns per-finding
    lists ``positives``, ``negatives``, ``unknown``, ``auc``, ``f1``, ``sensitivity``, ``specificity``,
    ``accuracy`` (at the threshold), ``threshold`` and, with ``roc``, ``roc`` (fpr/tpr lists, or None where
    undefined), plus ``macro_auc``, ``macro_f1``, ``macro_sensitivity``, ``macro_specificity`` and
    ``mean_accuracy`` (the mean per-finding accuracy).
    """
    from sklearn.metrics import f1_score, roc_auc_score

    t, p = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(f"targets {t.shape} and probs {p.shape} must both be [N, findings]")
    thresholds = list(thresholds) if thresholds is not None else best_thresholds(t, p)
    if len(thresholds) != t.shape[1]:
        raise ValueError(f"{len(thresholds)} thresholds for {t.shape[1]} findings")
    out: dict[str, list] = {k: [] for k in ("positives", "negatives", "unknown", "auc", "f1", "sensitivity",
                                            "specificity", "accuracy", "threshold", "roc")}
    for c in range(t.shape[1]):
        y, s = _known(t, p, c)
        pos, neg = int(y.sum()), int(y.size - y.sum())
        pred = (s >= thresholds[c]).astype(np.int64)
        both = pos > 0 and neg > 0
        out["positives"].append(pos)
        out["negatives"].append(neg)
        out["unknown"].append(int(t.shape[0] - y.size))
        out["auc"].append(float(roc_auc_score(y, s)) if both else None)
        out["f1"].append(float(f1_score(y, pred, zero_division=0)) if pos else None)
        out["sensitivity"].append(float(pred[y == 1].mean()) if pos else None)
        out["specificity"].append(float(1 - pred[y == 0].mean()) if neg else None)
        out["accuracy"].append(float((pred == y).mean()) if y.size else None)
        out["threshold"].append(float(thresholds[c]))
        out["roc"].append(_roc(y, s) if roc and both else None)
    if not roc:
        del out["roc"]
    return {
        **out,
        "macro_auc": _mean(out["auc"]),
        "macro_f1": _mean(out["f1"]),
        "macro_sensitivity": _mean(out["sensitivity"]),
        "macro_specificity": _mean(out["specificity"]),
        "mean_accuracy": _mean(out["accuracy"]),
    }
