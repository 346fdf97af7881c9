"""Every choice and default a user can set, in one place, with its help text (no torch import).

The core's config dataclasses and functions validate against these tuples, and the job file's schema
(`orchestrator.job.spec`) builds its fields from them, so a new estimator, loss or method is added here
once and appears in both.
"""

from __future__ import annotations

__all__ = [
    "ESTIMATORS", "LOSSES", "HEAD_WARMUPS", "NORMALIZATIONS", "REDUCES", "GRANULARITIES", "MIXES",
    "METHODS", "SPARSE_METHODS", "IMPORTANCE_METHODS", "DEFAULT_LR", "LORA_TARGETS", "HEAD_INITS", "HELP",
    "AGNOSTIC_SOURCES", "method_alpha",
    "artifact_kind",
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

METHODS = ("shpeft", "specific", "agnostic", "random", "gps", "linear", "bitfit", "lora", "full")
# Methods whose trainable set is a mask over eligible weights (written as a task delta).
SPARSE_METHODS = ("shpeft", "specific", "agnostic", "random", "gps")
# Methods that rank weights by importance maps (the task's own, and the agnostic one for the hybrids).
IMPORTANCE_METHODS = ("shpeft", "specific", "agnostic", "gps")
# Learning-rate defaults per method (for the trained entries; the head uses training.head_lr or lr).
# Few zero-initialised values and a warm head take far larger steps than updating every weight.
DEFAULT_LR = {
    "shpeft": 1e-2, "specific": 1e-2, "agnostic": 1e-2, "random": 1e-2, "gps": 1e-2,
    "linear": 1e-2, "bitfit": 1e-3, "lora": 3e-3, "full": 3e-4,
}


def method_alpha(method: str, alpha: float) -> float:
    """The hybrid weight a method really uses: specific is alpha=1, agnostic alpha=0."""
    return {"specific": 1.0, "agnostic": 0.0}.get(method, float(alpha))


def artifact_kind(method: str) -> str:
    """delta (shpeft's format), lora (peft adapter folder) or checkpoint (plain timm state dict)."""
    if method in (*SPARSE_METHODS, "linear"):
        return "delta"
    if method == "lora":
        return "lora"
    if method in ("full", "bitfit"):
        return "checkpoint"
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


LORA_TARGETS = r".*blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"

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
    "method": "How each task is fine-tuned: shpeft (hybrid sparse), specific (alpha=1), agnostic (alpha=0), "
              "random (random mask, same size), gps (per-row top |grad|), linear (head only), bitfit (biases + "
              "head), lora (peft LoRA + head) or full (every weight).",
    "agnostic": "The task-agnostic map: pool = the importance pooled over the other datasets of the job (its "
                "other tasks and importance.pool_datasets; an empty pool is an error), magnitude = the pre-trained "
                "weights' |w| (needs no data), auto = the pool, or magnitude when the pool is empty (a lone task).",
    "head_init": "Training head start: warm = the head fitted on frozen features in the importance pass "
                 "(the same for every method), random = a fresh head.",
    "lr": f"Learning rate of the trained backbone entries for every method (method.lr sets it per method); "
          f"null = each method's default {DEFAULT_LR}.",
}
