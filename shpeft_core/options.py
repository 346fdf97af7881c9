"""The choices and help texts of importance and selection, in one place (no torch import).

The core's config dataclasses and functions validate against these tuples, and the job file's schema
(`orchestrator.job.spec`) builds its fields from them, so a new estimator, loss or rule is added here once
and appears in both. Methods are a registry of their own (``shpeft_core.methods``).
"""

from __future__ import annotations

__all__ = [
    "ESTIMATORS", "LOSSES", "HEAD_WARMUPS", "NORMALIZATIONS", "REDUCES", "GRANULARITIES", "MIXES",
    "HEAD_INITS", "HELP", "METRICS", "SUMMARY_METRICS", "DEFAULT_METRIC", "METRIC_LABELS", "SPLITS",
    "EVAL_SPLITS", "KINDS", "AGNOSTIC_SOURCES",
]

# Task-specific importance estimators (per-batch gradient g of the task loss, weight w).
ESTIMATORS = ("grad2", "grad1", "taylor1", "taylor2")
LOSSES = ("ce", "supcon")
HEAD_WARMUPS = ("linear_probe", "ridge", "none")
# How one dataset's map is normalised before maps are combined, and how they are combined.
NORMALIZATIONS = ("rank", "max", "zscore", "none")
REDUCES = ("mean", "median", "max")
# Where the top-k is taken, and how the task-specific and task-agnostic rankings are mixed.
GRANULARITIES = ("global", "per_tensor", "per_row")
MIXES = ("union", "rank_sum")
HEAD_INITS = ("warm", "random")
# Where a task's task-agnostic map comes from: auto = the pool, or the magnitude map when the pool is empty.
AGNOSTIC_SOURCES = ("auto", "pool", "magnitude")

# A dataset's splits, and the ones every artifact is evaluated on.
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
# Task kinds (shpeft_core.objectives): one class per image, any number of findings, or ordered grades.
KINDS = ("single_label", "multi_label", "ordinal")
# Metrics a task may select models by; every evaluation reports SUMMARY_METRICS per split (result columns
# "<split>_<metric>"; kappa, quadratic weighted, for ordinal tasks only). Macro-F1 is the default, as in
# SH-PEFT's tables; for multi_label tasks auc is the mean AUROC over findings.
METRICS = ("macro_f1", "accuracy", "auc", "kappa")
SUMMARY_METRICS = ("accuracy", "macro_f1", "auc", "loss", "kappa")
DEFAULT_METRIC = "macro_f1"
METRIC_LABELS = {"macro_f1": "macro-F1", "accuracy": "accuracy", "auc": "macro AUC", "loss": "loss",
                 "kappa": "quadratic weighted kappa"}

HELP = {
    "estimator": "Per-weight task importance: grad2 = sum of g^2 (Fisher/SPT), grad1 = |sum g| (GPS), "
                 "taylor1 = |sum g*w|, taylor2 = sum (g*w)^2.",
    "loss": "ce with a warmed-up head, or GPS's head-free supervised-contrastive loss (supcon).",
    "head_warmup": "How the task head is fitted on frozen features before gradients are taken "
                   "(linear_probe: Adam steps; ridge: closed form; none).",
    "normalization": "How each dataset's map is normalised before maps are combined (rank percentile by default).",
    "reduce": "How normalised maps are combined into the task-agnostic map.",
    "granularity": "global top-k, per-tensor budget, or per-row (GPS) top-k.",
    "mix": "Hybrid rule: union = round(alpha*k) entries from the task-specific ranking plus the rest from the "
           "task-agnostic ranking; rank_sum = top-k of alpha*N(specific) + (1-alpha)*N(agnostic).",
    "agnostic": "The task-agnostic map: pool = the importance pooled over the other datasets of the job (its "
                "other tasks and importance.pool_datasets; an empty pool is an error), magnitude = the pre-trained "
                "weights' |w| (needs no data), auto = the pool, or magnitude when the pool is empty (a lone task).",
    "head_init": "Training head start: warm = the head fitted on frozen features in the importance pass "
                 "(the same for every method), random = a fresh head.",
}
