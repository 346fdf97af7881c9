"""Hybrid scores and mask selection.

Normalisation N: the rank percentile over all eligible entries jointly (ties share their mean
rank). Gradient-based scores span orders of magnitude with heavy tails and differ in scale
between datasets and estimators; a rank percentile maps any score map onto the same uniform
(0, 1] scale, is invariant to monotone rescaling (grad2 vs grad1, batch count, loss scale)
and cannot be dominated by a few outliers the way max- or z-normalisation can.

Invariants of every mask: flat row-major int32 indices, sorted, without repeats; the same scores
give the same mask (ties go to the smaller flat index, parameters in sorted-name order); its size
is ``selection_budget`` of the shapes, whatever the scores. Under the union rule the number of
entries taken from the task-specific ranking is exactly round_half_up(alpha * k) at every
granularity (``Mask.specific_count``; ``effective_alpha`` = that count / k).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._topk import equal_budget_rows, flat_true, top_in_rows, topk_flat, kth_in_rows
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
    "per_row_budget",
    "selection_budget",
    "effective_alpha",
    "random_mask",
    "SelectionError",
]


class Mask(dict):
    """{param name: sorted flat row-major int32 indices}, plus where its entries came from.

    ``specific_count``: how many entries the task-specific ranking chose (the union rule, and the
    alpha = 1 / alpha = 0 edges of either rule); None where the mask is no such split (rank_sum
    with 0 < alpha < 1, a plain score map, a random mask). A plain dict built from a Mask drops it.
    """

    specific_count: int | None = None

    @property
    def effective_alpha(self) -> float | None:
        return effective_alpha(self)


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


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as output rows: dim 0 is the output unit (Linear out_features, conv out_channels)."""
    numel = 1
    for d in shape:
        numel *= d
    rows = shape[0] if shape else 1
    return rows, (numel // rows if rows else 0)


def per_row_budget(shapes: dict, density: float) -> int:
    """GPS's own budget as a count: K = max(1, round_half_up(density * row length)) in every output row.

    ``shapes``: parameter name -> shape (or tensor). Where density * row length < 0.5 every row still
    gets one entry, so the count can be many times ``budget(density, total)``.
    """
    total = 0
    for s in shapes.values():
        rows, cols = _rows_cols(_shape(s))
        total += rows * min(cols, budget(density, cols))
    return total


def selection_budget(shapes: dict, density: float, granularity: str = "global", *,
                     equal_budget: bool = False) -> int:
    """How many entries ``select_mask`` selects for these shapes, whatever the scores."""
    if granularity not in GRANULARITIES:
        raise SelectionError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_row" and not equal_budget:
        return per_row_budget(shapes, density)
    total = sum(_rows_cols(_shape(s))[0] * _rows_cols(_shape(s))[1] for s in shapes.values())
    return budget(density, total)


def _split_budget(k: int, alpha: float) -> int:
    return min(k, int(alpha * k + 0.5))


def _specific_shares(k_groups: Tensor, alpha: float, next_specific) -> Tensor:
    """How many of each group's k_g entries come from the specific ranking (largest remainder).

    The shares sum to round_half_up(alpha * sum k_g). Each group first gets floor(alpha * k_g); the
    entries left go to the groups with the largest remainder alpha * k_g - floor, ties to the group
    whose next specific entry (``next_specific(floors)[g]``) ranks higher, then to the earlier group.
    """
    k_groups = k_groups.to(torch.int64)
    target = _split_budget(int(k_groups.sum()), alpha)
    quota = alpha * k_groups.to(torch.float64)
    floors = torch.floor(quota + 1e-9)  # 0.3 * 10 is 3.0000000000000004 in floating point, not 3 + a remainder
    rem = quota - floors
    rem[rem < 1e-9] = 0.0
    floors = torch.minimum(floors.to(torch.int64), k_groups)
    extra = target - int(floors.sum())
    if extra > 0:
        cand = (rem > 0).nonzero().reshape(-1)
        if cand.numel() < extra:  # cannot happen: the remainders sum to at least extra - 0.5
            raise SelectionError(f"union split: {extra} entries left for {cand.numel()} groups")
        nxt = next_specific(floors)[cand].numpy()
        order = np.lexsort((cand.numpy(), -nxt, -rem[cand].numpy()))  # last key is the primary one
        floors[cand[torch.from_numpy(order[:extra])]] += 1
    return floors


def _union_in_vector(ns: Tensor, na: Tensor, k: int, k_specific: int) -> Tensor:
    """k entries of one group: the specific ranking's top k_specific, then the best agnostic ones left."""
    prio = na.clone()
    prio[topk_flat(ns, k_specific)] = 2.0  # rank percentiles are <= 1
    return topk_flat(prio, k)


def _union_in_rows(ns: Tensor, na: Tensor, k_rows: Tensor, s_rows: Tensor) -> Tensor:
    """Per row r: the specific top s_rows[r], then the best agnostic entries left, k_rows[r] in all."""
    prio = na.clone()
    prio[top_in_rows(ns, s_rows)] = 2.0  # rank percentiles are <= 1
    return flat_true(top_in_rows(prio, k_rows))


def _per_tensor_alloc(k: int, sizes: list[int]) -> list[int]:
    """k split over tensors in proportion to their size (largest remainder, ties to the earlier tensor)."""
    total = sum(sizes)
    quotas = [k * s / total for s in sizes]
    alloc = [int(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - alloc[i]), i))
    for i in by_remainder[: k - sum(alloc)]:
        alloc[i] += 1
    return alloc


def select_mask(
    scores: dict[str, Tensor],
    density: float = 1e-4,
    granularity: Literal["global", "per_tensor", "per_row"] = "global",
    *,
    union_with: dict[str, Tensor] | None = None,
    union_alpha: float = 1.0,
    equal_budget: bool = False,
) -> Mask:
    """Top entries by score -> {param: sorted flat row-major int32 indices}.

    global: one top-k over all entries, k = round_half_up(density * total), >= 1.
    per_tensor: the same k split over tensors in proportion to their size (largest remainder).
    per_row: K = max(1, round_half_up(density * row_length)) entries in every output row (GPS); the
    total (``per_row_budget``) can exceed the global budget when density * row_length < 0.5. With
    ``equal_budget`` per_row selects the global k instead: entries ranked by their rank within their
    row, then by score, so every row's best entry comes before any row's second (rows whose best
    entry scores lowest get none when k is below the number of rows). No effect at other granularities.
    Ties are broken by the smaller flat index (over parameters in sorted-name order).

    With ``union_with`` (the rank-normalised agnostic map) exactly S = round_half_up(union_alpha * k)
    of the k entries come from ``scores`` (the rank-normalised specific map) and the rest from
    ``union_with`` among the entries not chosen. S is split over the groups (tensors, or rows) by
    largest remainder of union_alpha * k_group, ties to the group whose next specific entry ranks
    higher: so where a row's K is 1 (GPS's budget at low density) the row takes either its best
    specific entry or its best agnostic one, and the S rows whose best specific entry ranks highest
    take the specific one. Under ``equal_budget`` per row, the S specific entries and then the k - S
    agnostic ones (from the entries left) are each chosen by the equal-budget rule.
    """
    if not scores:
        raise SelectionError("no scores to select from")
    if granularity not in GRANULARITIES:
        raise SelectionError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_finite(scores)
    if union_with is not None:
        _check_same_layout(scores, union_with, "select_mask")
        if not 0.0 <= float(union_alpha) <= 1.0:
            raise SelectionError(f"alpha must be in [0, 1], got {union_alpha}")

    names = _order(scores)

    def flat(n: str, which: dict[str, Tensor]) -> Tensor:
        return which[n].detach().reshape(-1).to(torch.float64).cpu()

    def rows(n: str, which: dict[str, Tensor]) -> Tensor:
        return flat(n, which).reshape(_rows_cols(tuple(scores[n].shape)))

    sizes = [scores[n].numel() for n in names]
    k = budget(density, sum(sizes))
    picked: dict[str, Tensor] = {}
    specific = None if union_with is None else 0
    if granularity in ("global", "per_tensor"):
        groups = [(names, k)] if granularity == "global" else \
            [([n], kn) for n, kn in zip(names, _per_tensor_alloc(k, sizes)) if kn > 0]
        s_flat = [torch.cat([flat(n, scores) for n in g]) for g, _ in groups]
        if union_with is None:
            chosen = [topk_flat(s, kg) for s, (_, kg) in zip(s_flat, groups)]
        else:
            a_flat = [torch.cat([flat(n, union_with) for n in g]) for g, _ in groups]

            def next_specific(floors: Tensor) -> Tensor:
                return torch.tensor([float(torch.topk(s, min(int(f) + 1, s.numel())).values[-1])
                                     for s, f in zip(s_flat, floors)], dtype=torch.float64)

            shares = _specific_shares(torch.tensor([kg for _, kg in groups]), float(union_alpha), next_specific)
            chosen = [_union_in_vector(s, a, kg, int(sg))
                      for s, a, (_, kg), sg in zip(s_flat, a_flat, groups, shares)]
            specific = int(shares.sum())
        for (g, _), c in zip(groups, chosen):
            starts = torch.tensor([0] + [scores[n].numel() for n in g]).cumsum(0)
            for i, n in enumerate(g):
                picked[n] = c[(c >= starts[i]) & (c < starts[i + 1])] - starts[i]
    elif equal_budget:
        s_rows = {n: rows(n, scores) for n in names}
        if union_with is None:
            picked = equal_budget_rows(s_rows, k)
        else:
            specific = _split_budget(k, float(union_alpha))
            first = equal_budget_rows(s_rows, specific)
            second = equal_budget_rows({n: rows(n, union_with) for n in names}, k - specific, taken=first)
            picked = {n: torch.sort(torch.cat([first[n], second[n]])).values for n in names}
    else:
        s_rows = {n: rows(n, scores) for n in names}
        k_rows = {n: torch.full((r.shape[0],), min(r.shape[1], budget(density, r.shape[1])), dtype=torch.int64)
                  for n, r in s_rows.items()}
        if union_with is None:
            picked = {n: flat_true(top_in_rows(s_rows[n], k_rows[n])) for n in names}
        else:
            all_k = torch.cat([k_rows[n] for n in names])

            def next_specific(floors: Tensor) -> Tensor:
                out, pos = [], 0
                for n in names:
                    n_rows = s_rows[n].shape[0]
                    out.append(kth_in_rows(s_rows[n], floors[pos : pos + n_rows]))
                    pos += n_rows
                return torch.cat(out)

            shares = _specific_shares(all_k, float(union_alpha), next_specific)
            pos = 0
            for n in names:
                n_rows = s_rows[n].shape[0]
                picked[n] = _union_in_rows(s_rows[n], rows(n, union_with), k_rows[n], shares[pos : pos + n_rows])
                pos += n_rows
            specific = int(shares.sum())
    mask = Mask({n: picked[n].to(torch.int32) for n in names if n in picked and picked[n].numel()})
    mask.specific_count = specific
    return mask


def hybrid_mask(
    specific,
    agnostic,
    alpha: float,
    density: float = 1e-4,
    granularity: Literal["global", "per_tensor", "per_row"] = "global",
    mix: Literal["rank_sum", "union"] = "rank_sum",
    *,
    equal_budget: bool = False,
) -> Mask:
    """The hybrid selection under either rule; alpha=1 is the specific map only, alpha=0 the agnostic.

    rank_sum: top-k of alpha * N(specific) + (1 - alpha) * N(agnostic).
    union: round_half_up(alpha * k) entries from the specific ranking plus the best remaining ones
    from the agnostic ranking, i.e. the union of the task's key weights and the shared key weights
    (rank_sum instead favours entries that are middling in both maps); see ``select_mask`` for how
    the specific share is split over tensors and rows.
    """
    if mix not in MIXES:
        raise SelectionError(f"mix must be one of {MIXES}, got {mix!r}")
    if mix == "rank_sum" or alpha in (0.0, 1.0) or specific is None or agnostic is None:
        mask = select_mask(hybrid_scores(specific, agnostic, alpha), density, granularity, equal_budget=equal_budget)
        if float(alpha) in (0.0, 1.0):
            mask.specific_count = mask_size(mask) if float(alpha) == 1.0 else 0
        return mask
    if not 0.0 <= float(alpha) <= 1.0:
        raise SelectionError(f"alpha must be in [0, 1], got {alpha}")
    _check_same_backbone(specific, agnostic)
    ns, na = hybrid_scores(specific, None, 1.0), hybrid_scores(None, agnostic, 0.0)
    return select_mask(ns, density, granularity, union_with=na, union_alpha=float(alpha), equal_budget=equal_budget)


def random_mask(
    shapes: dict,
    density: float,
    seed: int,
    granularity: Literal["global", "per_tensor", "per_row"] = "global",
    *,
    equal_budget: bool = False,
) -> Mask:
    """A seeded uniform random mask with exactly the budgets ``select_mask`` gives at ``granularity``.

    ``shapes``: parameter name -> shape (or tensor). The scores are float64 uniforms drawn in
    sorted-name order from a generator seeded with ``seed``, so a seed gives one mask everywhere.
    """
    if not shapes:
        raise SelectionError("random mask: no parameters to select from")
    gen = torch.Generator().manual_seed(int(seed))
    scores = {n: torch.rand(_shape(shapes[n]), generator=gen, dtype=torch.float64) for n in sorted(shapes)}
    return select_mask(scores, density, granularity, equal_budget=equal_budget)


def mask_size(mask: Mask) -> int:
    return sum(int(v.numel()) for v in mask.values())


def effective_alpha(mask: Mask) -> float | None:
    """The share of the mask's entries chosen by the task-specific ranking (what the delta's
    metadata records next to the nominal alpha); None where the mask carries no such split."""
    count = getattr(mask, "specific_count", None)
    size = mask_size(mask)
    if count is None or size == 0:
        return None
    return count / size
