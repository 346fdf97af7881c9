"""Paired comparisons of two methods evaluated on the same test images over the same seeds (numpy + SciPy).

Input: the images' labels [N] and, per method, every seed's per-image outputs in the same image order
([S, N] predicted classes, or [S, N, C] class probabilities); for a multi-label task the labels are
[N, C] findings (1 / 0 / NaN unknown) and the outputs [S, N, C] per-finding probabilities. Seed s of one method is paired with seed
s of the other: both ran with the same data order and augmentation (and, where seeds vary them, the
same importance batches and warm head).

- difference: mean over seeds of metric(labels, A_s) minus the same for B (A minus B throughout).
- 95% interval: ``scipy.stats.bootstrap`` over seeds and images. Seed indices and image indices are
  two samples resampled independently with replacement (the "pigeonhole" bootstrap of a crossed design,
  Owen 2007, mildly conservative), and both methods are scored on the same resampled seeds and images,
  so every bootstrap difference stays paired. BCa by default; where every resample gives the same
  difference (identical methods) the interval is that single value.
- p-value: ``scipy.stats.permutation_test`` with ``permutation_type="samples"``: under "no difference"
  the two methods' outputs on an image are exchangeable, so each image's outputs (all seeds together)
  are swapped between the methods at random; two-sided, with SciPy's +1 correction for sampled
  permutations (p is never 0).
- Holm's step-down correction over a family of comparisons, and the verdict in words: "better" or
  "worse" (by the sign of the difference) where the Holm-adjusted p-value is below alpha AND the
  interval lies on that side of zero, otherwise "no evidence of a difference". Both are needed because
  they answer different questions: the permutation test holds the seeds fixed (do these runs' predictions
  differ, image by image?), the interval adds seed-to-seed variation (would other seeds agree?). With
  three seeds a difference can be clear on the images and still within what another seed could undo.
  The interval is per comparison, not adjusted for the family.

Every result is a function of the inputs and ``seed`` only. Metrics are functions of (labels, outputs);
``metric_statistic`` gives macro-F1, accuracy and macro one-vs-rest AUC vectorised over resamples, and
for multi-label findings the unweighted mean over findings of each finding's AUROC on its known labels.
``recovery_fraction`` is (method - floor) / (ceiling - floor) of three methods on the same images and
seeds, with a percentile interval from the same bootstrap over seeds and images.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StatsError", "PairedDifference", "metric_statistic", "paired_difference", "holm", "verdict",
           "adjust_family", "compare_to_reference", "recovery_fraction", "VERDICTS"]

VERDICTS = ("better", "no evidence of a difference", "worse")


class StatsError(ValueError):
    """Inputs that cannot be compared: shapes that do not pair up, too few images, bad p-values."""


@dataclass(frozen=True)
class PairedDifference:
    """Method A against method B on one metric. ``p_adjusted`` and ``verdict`` are set by ``adjust_family``."""

    metric_a: float  # mean over seeds
    metric_b: float
    difference: float  # metric_a - metric_b
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float  # two-sided paired permutation test, unadjusted
    n_seeds: int
    n_images: int
    p_adjusted: float | None = None
    verdict: str | None = None


# ---------------------------------------------------------------- metrics vectorised over resamples


def _batched(fn: Callable) -> Callable:
    fn.batched = True  # takes leading batch dimensions: labels [..., N], outputs [..., N(, C)] -> [...]
    return fn


def _auc_ovr_macro(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Unweighted mean of the one-vs-rest ROC AUCs over the classes with positives and negatives (as
    ``shpeft_core.metrics.class_metrics``), by the rank-sum (Mann-Whitney) formula, ties averaged."""
    from scipy.stats import rankdata

    aucs = []
    for c in range(probs.shape[-1]):
        pos = labels == c
        n_pos = pos.sum(-1)
        n_neg = pos.shape[-1] - n_pos
        ranks = rankdata(probs[..., c], axis=-1)
        u = (ranks * pos).sum(-1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan))
    stacked = np.stack(aucs, -1)
    defined = np.isfinite(stacked)
    return np.where(defined.any(-1), np.nansum(stacked, -1) / np.maximum(defined.sum(-1), 1), np.nan)


def _auc_findings_mean(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Unweighted mean over findings of each finding's AUROC on the images whose label is known (as
    ``shpeft_core.label_metrics``: findings without both a positive and a negative are left out), by the
    rank-sum formula over the known entries, ties averaged. labels [..., N, C] with NaN unknown."""
    from scipy.stats import rankdata

    known = ~np.isnan(labels)
    pos = known & (labels == 1)
    n_pos = pos.sum(-2)
    n_neg = known.sum(-2) - n_pos
    ranks = rankdata(np.where(known, probs, np.nan), axis=-2, nan_policy="omit")  # NaN where unknown
    u = np.nansum(np.where(pos, ranks, 0.0), -2) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    defined = np.isfinite(auc)
    return np.where(defined.any(-1), np.nansum(auc, -1) / np.maximum(defined.sum(-1), 1), np.nan)


def metric_statistic(name: str, num_classes: int) -> Callable:
    """A metric of (labels, outputs) vectorised over leading dimensions: ``macro_f1`` (over all
    ``num_classes`` classes, ``shpeft_core.metrics.macro_f1``), ``accuracy`` or ``auc`` (macro
    one-vs-rest; needs probabilities). Predicted classes or probabilities for the first two. ``auc``
    of multi-label findings (float labels [..., N, C], NaN unknown) is the mean over findings of their AUROC."""
    from shpeft_core.metrics import macro_f1

    def preds(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return outputs.argmax(-1) if outputs.ndim == labels.ndim + 1 else outputs

    if name == "macro_f1":
        return _batched(lambda y, out: np.asarray(macro_f1(y, out, num_classes), dtype=np.float64))
    if name == "accuracy":
        return _batched(lambda y, out: (preds(out, y) == y).mean(-1))
    if name == "auc":
        def auc(y, out):
            if y.ndim == out.ndim and np.issubdtype(y.dtype, np.floating):
                # multi-label: findings [.., N, C] (float, NaN unknown) against probabilities [.., N, C]
                return _auc_findings_mean(y, out)
            if out.ndim != y.ndim + 1:
                raise StatsError("auc needs class probabilities [.., N, C], not predicted classes")
            return _auc_ovr_macro(y, out)
        return _batched(auc)
    raise StatsError(f"metric must be macro_f1, accuracy or auc, got {name!r}")


# ---------------------------------------------------------------- one paired comparison


def _check(labels, *outputs) -> tuple[np.ndarray, ...]:
    y = np.asarray(labels)
    arrays = [np.asarray(o) for o in outputs]
    a = arrays[0]
    if y.ndim not in (1, 2) or y.shape[0] < 2:
        raise StatsError(f"labels must be one label (or one row of findings) per image, at least 2 images, got "
                         f"shape {y.shape}")
    for b in arrays[1:]:
        if a.shape != b.shape:
            raise StatsError(f"outputs_a has shape {a.shape} and outputs_b {b.shape}: the same seeds and images "
                             "are needed to pair them")
    n = y.shape[0]
    if a.ndim not in (2, 3) or a.shape[1] != n or (y.ndim == 2 and a.shape[1:] != y.shape):
        raise StatsError(f"outputs must be [seeds, {n} images] or [seeds, {n} images, classes], got {a.shape}")
    return (y, *arrays)


def _scores(metric: Callable, batched: bool, labels: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """metric per (batch, seed) of ``outputs`` [B, S, N, ...] against ``labels`` [B, N(, C)] -> [B, S]."""
    if batched:
        y = np.broadcast_to(labels[:, None], outputs.shape[:2] + labels.shape[1:])
        return np.asarray(metric(y, outputs), dtype=np.float64)
    return np.array([[metric(labels[i], outputs[i, s]) for s in range(outputs.shape[1])]
                     for i in range(outputs.shape[0])], dtype=np.float64)


def paired_difference(labels, outputs_a, outputs_b, metric: Callable, *, batched: bool | None = None,
                      confidence: float = 0.95, n_resamples: int = 2000, n_permutations: int = 2000,
                      seed: int = 0, method: str = "BCa") -> PairedDifference:
    """Method A minus method B on ``metric``, with its bootstrap interval and paired permutation p-value.

    ``outputs_a`` / ``outputs_b``: [S, N] predicted classes or [S, N, C] probabilities, seed s of A paired
    with seed s of B, images in the order of ``labels``. ``metric(labels, outputs) -> float``; with
    ``batched`` (default: the metric's ``batched`` attribute, set by ``metric_statistic``) it takes
    leading batch dimensions instead, which is what makes thousands of resamples cheap.
    """
    from scipy.stats import bootstrap, permutation_test

    y, a, b = _check(labels, outputs_a, outputs_b)
    batched = bool(getattr(metric, "batched", False)) if batched is None else batched
    n_seeds, n_images = a.shape[0], a.shape[1]
    per_value = int(np.prod(a.shape[2:], dtype=np.int64)) if a.ndim > 2 else 1
    batch = max(1, int(4e6 // (n_seeds * n_images * per_value)))  # resamples scored at once (memory)

    def seed_mean(outputs: np.ndarray, seed_idx: np.ndarray, img_idx: np.ndarray) -> np.ndarray:
        sub = outputs[seed_idx[:, :, None], img_idx[:, None, :]]  # [B, S, N, ...]
        return _scores(metric, batched, y[img_idx], sub).mean(1)

    def difference(*idx, axis=-1):
        # idx: (seed indices, image indices), or image indices alone when there is one seed
        img = np.atleast_2d(idx[-1]).astype(np.intp)
        seeds = np.atleast_2d(idx[0]).astype(np.intp) if len(idx) == 2 else np.zeros((img.shape[0], 1), np.intp)
        out = seed_mean(a, seeds, img) - seed_mean(b, seeds, img)
        return out if np.ndim(idx[-1]) > 1 else out[0]

    all_seeds, all_images = np.arange(n_seeds), np.arange(n_images)
    observed = float(difference(all_seeds, all_images))
    metric_a = float(seed_mean(a, all_seeds[None], all_images[None])[0])
    metric_b = float(seed_mean(b, all_seeds[None], all_images[None])[0])
    samples = (all_seeds, all_images) if n_seeds > 1 else (all_images,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate bootstrap distribution is handled below
        boot = bootstrap(samples, difference, paired=False, vectorized=True, n_resamples=n_resamples,
                         confidence_level=confidence, method=method, batch=batch,
                         rng=np.random.default_rng([seed, 0]))
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    dist = boot.bootstrap_distribution
    if not (np.isfinite(low) and np.isfinite(high)):
        if np.ptp(dist) > 1e-12:
            raise StatsError(f"the {method} interval is undefined for this bootstrap distribution; use "
                             "method='percentile'")
        low = high = float(dist[0])  # every resample agrees: the interval is that one value

    # The permutation swaps, per image, which method's outputs count as A: indices into [A | B] stacked.
    stacked = np.concatenate([a, b], axis=1)  # [S, 2N, ...]

    def swapped_stat(ia, ib, axis=-1):
        two_d = np.ndim(ia) > 1
        ia2, ib2 = np.atleast_2d(ia).astype(np.intp), np.atleast_2d(ib).astype(np.intp)
        seeds = np.broadcast_to(all_seeds, (ia2.shape[0], n_seeds))
        pa = stacked[seeds[:, :, None], ia2[:, None, :]]
        pb = stacked[seeds[:, :, None], ib2[:, None, :]]
        ys = np.broadcast_to(y, ia2.shape + y.shape[1:])
        out = _scores(metric, batched, ys, pa).mean(1) - _scores(metric, batched, ys, pb).mean(1)
        return out if two_d else out[0]

    perm = permutation_test((all_images, all_images + n_images), swapped_stat, permutation_type="samples",
                            vectorized=True, n_resamples=n_permutations, batch=batch, alternative="two-sided",
                            rng=np.random.default_rng([seed, 1]))
    return PairedDifference(metric_a=metric_a, metric_b=metric_b, difference=observed, ci_low=low, ci_high=high,
                            confidence=confidence, p_value=float(perm.pvalue), n_seeds=n_seeds,
                            n_images=n_images)


# ---------------------------------------------------------------- a family of comparisons


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order.

    Written out: SciPy ships only false-discovery-rate corrections (``false_discovery_control``), and
    statsmodels' ``multipletests`` would be a new dependency for these few lines.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise StatsError(f"p-values must be a list of numbers in [0, 1], got {p_values!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def verdict(difference: float, p_adjusted: float, ci_low: float | None = None, ci_high: float | None = None,
            alpha: float = 0.05) -> str:
    """"better" / "worse" (A than B, by the sign of the difference) where p_adjusted < alpha and the
    interval, when given, excludes zero on the same side; otherwise "no evidence of a difference"."""
    if p_adjusted < alpha and difference > 0 and (ci_low is None or ci_low > 0):
        return "better"
    if p_adjusted < alpha and difference < 0 and (ci_high is None or ci_high < 0):
        return "worse"
    return "no evidence of a difference"


def adjust_family(results: Sequence[PairedDifference], alpha: float = 0.05) -> list[PairedDifference]:
    """The family's results with Holm-adjusted p-values and a verdict each (the input is not changed)."""
    adjusted = holm([r.p_value for r in results]) if results else []
    return [dataclasses.replace(r, p_adjusted=float(p), verdict=verdict(r.difference, float(p), r.ci_low, r.ci_high,
                                                                        alpha))
            for r, p in zip(results, adjusted)]


def compare_to_reference(labels, outputs: dict[str, np.ndarray], reference: str, metric: Callable, *,
                         alpha: float = 0.05, seed: int = 0, **kwargs) -> dict[str, PairedDifference]:
    """``reference`` against every other method in ``outputs`` (reference minus other: "better" means the
    reference is better), Holm-adjusted over these comparisons. ``kwargs`` go to ``paired_difference``."""
    if reference not in outputs:
        raise StatsError(f"reference method {reference!r} has no outputs; methods: {sorted(outputs)}")
    others = [m for m in outputs if m != reference]
    raw = [paired_difference(labels, outputs[reference], outputs[m], metric, seed=seed, **kwargs) for m in others]
    return dict(zip(others, adjust_family(raw, alpha)))


def recovery_fraction(labels, method, floor, ceiling, metric: Callable, *, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(method - floor) / (ceiling - floor) of the seed-mean metric (e.g. head-only as the floor and full
    fine-tuning as the ceiling), with a percentile interval from ``scipy.stats.bootstrap`` over seeds and
    images as in ``paired_difference`` (all three scored on the same resampled seeds and images). Outputs as
    in ``paired_difference``. Returns (fraction, low, high); NaN where the ceiling does not exceed the floor
    (for the interval: in half the resamples or more; otherwise the undefined resamples are left out)."""
    from scipy.stats import bootstrap

    y, m, lo, hi = _check(labels, method, floor, ceiling)
    batched = bool(getattr(metric, "batched", False))
    n_seeds, n_images = m.shape[0], m.shape[1]
    per_value = int(np.prod(m.shape[2:], dtype=np.int64)) if m.ndim > 2 else 1
    batch = max(1, int(4e6 // (3 * n_seeds * n_images * per_value)))

    def fraction(*idx, axis=-1):
        img = np.atleast_2d(idx[-1]).astype(np.intp)
        seeds = np.atleast_2d(idx[0]).astype(np.intp) if len(idx) == 2 else np.zeros((img.shape[0], 1), np.intp)
        vm, vl, vh = (_scores(metric, batched, y[img], o[seeds[:, :, None], img[:, None, :]]).mean(1)
                      for o in (m, lo, hi))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(vh - vl > 0, (vm - vl) / (vh - vl), np.nan)
        return out if np.ndim(idx[-1]) > 1 else out[0]

    all_seeds, all_images = np.arange(n_seeds), np.arange(n_images)
    point = float(fraction(all_seeds, all_images))
    if not np.isfinite(point):
        return point, float("nan"), float("nan")
    samples = (all_seeds, all_images) if n_seeds > 1 else (all_images,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = bootstrap(samples, fraction, paired=False, vectorized=True, n_resamples=n_resamples,
                         confidence_level=confidence, method="percentile", batch=batch,
                         rng=np.random.default_rng([seed, 2]))
    dist = np.asarray(boot.bootstrap_distribution, dtype=np.float64)
    finite = dist[np.isfinite(dist)]
    if finite.size < 0.5 * dist.size:  # the gap itself is not there in most resamples: no interval
        return point, float("nan"), float("nan")
    # Resamples where the ceiling does not exceed the floor have no fraction; the percentile interval is
    # taken over the others (SciPy's own would be NaN as soon as one resample is undefined).
    tail = 50 * (1 - confidence)
    low, high = np.percentile(finite, [tail, 100 - tail])
    return point, float(low), float(high)
