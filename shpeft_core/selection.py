"""Hybrid scores and mask selection.

Normalisation N: the rank percentile over all eligible entries jointly (ties share their mean
rank). Gradient-based scores span orders of magnitude with heavy tails and differ in scale
between datasets and estimators; a rank percentile maps any score map onto the same uniform
(0, 1] scale, is invariant to monotone rescaling (grad2 vs grad1, batch count, loss scale)
and cannot be dominated by a few outliers the way max- or z-normalisation can.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .options import GRANULARITIES, MIXES, NORMALIZATIONS

__all__ = [
    "Mask",
    "GRANULARITIES",
    "rank_normalize",
    "normalize_scores",
    "hybrid_scores",
    "select_mask",
    "hybrid_mask",
    "MIXES",
    "mask_size",
    "budget",
    "SelectionError",
]

Mask = dict[str, Tensor]


class SelectionError(ValueError):
    """Scores or selection settings that cannot give a mask."""


def _order(scores: dict[str, Tensor]) -> list[str]:
    # Canonical order for the global tie-break: independent of dict / file order.
    return sorted(scores)


def _check_finite(scores: dict[str, Tensor]) -> None:
    for name, t in scores.items():
        if not torch.isfinite(t).all():
            raise SelectionError(f"{name}: scores contain NaN or infinity")


def rank_normalize(x: Tensor) -> Tensor:
    """Rank percentile in (0, 1] (float64); tied entries get the mean of their ranks."""
    flat = x.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return flat.reshape(x.shape)
    sorted_vals, order = torch.sort(flat, stable=True)
    _, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks_sorted = torch.repeat_interleave(mean_rank, counts)
    out = torch.empty_like(flat)
    out[order] = ranks_sorted / n
    return out.reshape(x.shape)


def _flatten(scores: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    names = _order(scores)
    return names, torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])


def _unflatten(names: list[str], flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, pos = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = flat[pos : pos + k].reshape(like[n].shape)
        pos += k
    return out


def normalize_scores(scores: dict[str, Tensor], method: str = "rank") -> dict[str, Tensor]:
    """Normalise a score map jointly over all its entries: rank | max | zscore | none."""
    _check_finite(scores)
    names, flat = _flatten(scores)
    if method == "rank":
        flat = rank_normalize(flat)
    elif method == "max":
        top = flat.abs().max() if flat.numel() else flat.new_tensor(0.0)
        flat = flat / top if top > 0 else flat
    elif method == "zscore":
        std = flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)
        flat = (flat - flat.mean()) / std if std > 0 else flat - flat.mean()
    elif method != "none":
        raise SelectionError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    return _unflatten(names, flat, scores)


def _check_same_layout(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise SelectionError(f"{what}: parameter sets differ: {missing[:5]}")
    for n in a:
        if tuple(a[n].shape) != tuple(b[n].shape):
            raise SelectionError(f"{what}: {n} has shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}")


def _check_same_backbone(specific, agnostic) -> None:
    ms, ma = getattr(specific, "metadata", None) or {}, getattr(agnostic, "metadata", None) or {}
    for key in ("backbone", "backbone_fingerprint"):
        if ms.get(key) and ma.get(key) and ms[key] != ma[key]:
            raise SelectionError(f"specific and agnostic maps differ in {key}: {ms[key]} vs {ma[key]}")


def hybrid_scores(specific, agnostic, alpha: float) -> dict[str, Tensor]:
    """alpha * N(specific) + (1 - alpha) * N(agnostic), N = joint rank percentile (float64).

    Accepts ImportanceMap objects or plain dicts. alpha=1 gives N(specific) exactly (same
    ranking as specific), alpha=0 gives N(agnostic) exactly.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise SelectionError(f"alpha must be in [0, 1], got {alpha}")
    s = getattr(specific, "scores", specific) if specific is not None else None
    a = getattr(agnostic, "scores", agnostic) if agnostic is not None else None
    _check_same_backbone(specific, agnostic)
    if alpha == 1.0 or a is None:
        if s is None or (a is None and alpha != 1.0):
            raise SelectionError("alpha < 1 needs an agnostic map; alpha > 0 needs a specific map")
        return normalize_scores(s, "rank")
    if alpha == 0.0 or s is None:
        if s is None and alpha != 0.0:
            raise SelectionError("alpha > 0 needs a specific map")
        return normalize_scores(a, "rank")
    _check_same_layout(s, a, "hybrid_scores")
    ns, na = normalize_scores(s, "rank"), normalize_scores(a, "rank")
    return {n: alpha * ns[n] + (1.0 - alpha) * na[n] for n in _order(s)}


def budget(density: float, n: int) -> int:
    """round_half_up(density * n), at least 1, at most n."""
    if not 0.0 < density <= 1.0:
        raise SelectionError(f"density must be in (0, 1], got {density}")
    return min(n, max(1, int(density * n + 0.5)))


def _topk_flat(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of 1-D x; ties go to the smaller index. Sorted ascending."""
    if k >= x.numel():
        return torch.arange(x.numel())
    thresh = torch.topk(x, k, sorted=True).values[-1]
    above = (x > thresh).nonzero().reshape(-1)
    equal = (x == thresh).nonzero().reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def _topk_rows(rows: Tensor, k: int) -> Tensor:
    """Per row of 2-D ``rows``: column indices of the k largest (ties to the smaller index)."""
    return torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]


def _union_priority(ns: Tensor, na: Tensor, k_specific: int) -> Tensor:
    """N(agnostic), lifted above every rank for the k_specific entries the specific ranking picks.

    The top-k of the result is the specific top-k_specific plus the best agnostic entries that are
    not already chosen (no double counting). Works on 1-D (one group) or 2-D (a group per row).
    """
    prio = na.clone()
    if k_specific > 0:
        if ns.dim() == 1:
            prio[_topk_flat(ns, k_specific)] = 2.0  # rank percentiles are <= 1
        else:
            prio.scatter_(1, _topk_rows(ns, k_specific), 2.0)
    return prio


def _split_budget(k: int, alpha: float) -> int:
    return min(k, int(alpha * k + 0.5))


def select_mask(
    scores: dict[str, Tensor],
    density: float = 1e-4,
    granularity: Literal["global", "per_tensor", "per_row"] = "global",
    *,
    union_with: dict[str, Tensor] | None = None,
    union_alpha: float = 1.0,
) -> Mask:
    """Top entries by score -> {param: sorted flat row-major int32 indices}.

    global: one top-k over all entries, k = round_half_up(density * total), >= 1.
    per_tensor: the same k split over tensors in proportion to their size (largest remainder).
    per_row: K = max(1, round_half_up(density * row_length)) entries in every output row (GPS);
    the total can exceed the global budget when density * row_length < 0.5.
    Ties are broken by the smaller flat index (over parameters in sorted-name order).

    With ``union_with`` (the rank-normalised agnostic map) every group's budget k (the whole
    model, a tensor, or a row) is split: round_half_up(union_alpha * k) entries by ``scores``
    (the rank-normalised specific map), the rest by ``union_with`` among the entries not chosen.
    """
    if not scores:
        raise SelectionError("no scores to select from")
    if granularity not in GRANULARITIES:
        raise SelectionError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_finite(scores)
    if union_with is not None:
        _check_same_layout(scores, union_with, "select_mask")

    def flat(n: str, which: dict[str, Tensor]) -> Tensor:
        return which[n].reshape(-1).to(torch.float64).cpu()

    def pick(n_or_names, k: int) -> Tensor:
        names_ = [n_or_names] if isinstance(n_or_names, str) else n_or_names
        s_flat = torch.cat([flat(n, scores) for n in names_])
        if union_with is None:
            return _topk_flat(s_flat, k)
        a_flat = torch.cat([flat(n, union_with) for n in names_])
        return _topk_flat(_union_priority(s_flat, a_flat, _split_budget(k, union_alpha)), k)

    names = _order(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    k = budget(density, total)
    mask: Mask = {}
    if granularity == "global":
        chosen = pick(names, k)
        starts = torch.tensor([0] + sizes).cumsum(0)
        for i, n in enumerate(names):
            lo, hi = int(starts[i]), int(starts[i + 1])
            sel = chosen[(chosen >= lo) & (chosen < hi)] - lo
            if sel.numel():
                mask[n] = sel.to(torch.int32)
    elif granularity == "per_tensor":
        quotas = [k * s / total for s in sizes]
        alloc = [int(q) for q in quotas]
        rest = k - sum(alloc)
        by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[i] - alloc[i]), i))
        for i in by_remainder[:rest]:
            alloc[i] += 1
        for n, kn in zip(names, alloc):
            if kn > 0:
                mask[n] = pick(n, kn).to(torch.int32)
    else:
        for n in names:
            t = scores[n].to(torch.float64).cpu()
            rows = t.reshape(t.shape[0], -1)
            kr = min(rows.shape[1], budget(density, rows.shape[1]))
            if union_with is not None:
                other = union_with[n].to(torch.float64).cpu().reshape(rows.shape)
                rows = _union_priority(rows, other, _split_budget(kr, union_alpha))
            order = _topk_rows(rows, kr)
            flat_idx = order + torch.arange(rows.shape[0]).unsqueeze(1) * rows.shape[1]
            mask[n] = torch.sort(flat_idx.reshape(-1)).values.to(torch.int32)
    return mask


def hybrid_mask(
    specific,
    agnostic,
    alpha: float,
    density: float = 1e-4,
    granularity: Literal["global", "per_tensor", "per_row"] = "global",
    mix: Literal["rank_sum", "union"] = "rank_sum",
) -> Mask:
    """The hybrid selection under either rule; alpha=1 is the specific map only, alpha=0 the agnostic.

    rank_sum: top-k of alpha * N(specific) + (1 - alpha) * N(agnostic).
    union: round_half_up(alpha * k) entries from the specific ranking plus the best remaining ones
    from the agnostic ranking, i.e. the union of the task's key weights and the shared key weights
    (rank_sum instead favours entries that are middling in both maps).
    """
    if mix not in MIXES:
        raise SelectionError(f"mix must be one of {MIXES}, got {mix!r}")
    if mix == "rank_sum" or alpha in (0.0, 1.0) or specific is None or agnostic is None:
        return select_mask(hybrid_scores(specific, agnostic, alpha), density, granularity)
    if not 0.0 <= float(alpha) <= 1.0:
        raise SelectionError(f"alpha must be in [0, 1], got {alpha}")
    _check_same_backbone(specific, agnostic)
    ns, na = hybrid_scores(specific, None, 1.0), hybrid_scores(None, agnostic, 0.0)
    return select_mask(ns, density, granularity, union_with=na, union_alpha=float(alpha))


def mask_size(mask: Mask) -> int:
    return sum(int(v.numel()) for v in mask.values())
