"""Top-k primitives with the selection rules' tie rule: among equal scores the smaller flat index wins.

Every function returns sorted (row-major) indices or a boolean mask and works on float64 CPU tensors.
Per-row selections use a partial top-k (torch.topk) plus the tie rule instead of a full sort of every
row: only the first K of each row are ordered, and K is small at the densities used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["topk_flat", "kth_in_rows", "top_in_rows", "flat_true", "equal_budget_rows", "TopkError"]


class TopkError(ValueError):
    """A selection that asks for more entries than are available."""


def topk_flat(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of 1-D x; ties go to the smaller index. Sorted ascending."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if k >= x.numel():
        return torch.arange(x.numel())
    thresh = torch.topk(x, k, sorted=True).values[-1]
    above = (x > thresh).nonzero().reshape(-1)
    equal = (x == thresh).nonzero().reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def kth_in_rows(rows: Tensor, k: Tensor) -> Tensor:
    """The (k[r] + 1)-th largest value of every row of 2-D ``rows`` (k clamped to the row)."""
    k = k.clamp(min=0, max=rows.shape[1] - 1)
    vals = torch.topk(rows, int(k.max()) + 1 if k.numel() else 1, dim=1, sorted=True).values
    return vals.gather(1, k.unsqueeze(1)).reshape(-1)


def top_in_rows(rows: Tensor, counts: Tensor) -> Tensor:
    """Bool mask of the ``counts[r]`` largest entries of every row; ties go to the smaller column.

    A partial top-k per row (torch.topk) plus the tie rule, instead of sorting every row in full.
    """
    out = torch.zeros(rows.shape, dtype=torch.bool)
    if not counts.numel() or int(counts.max()) <= 0:
        return out
    thr = kth_in_rows(rows, counts - 1).unsqueeze(1)
    above = rows > thr
    need = counts.unsqueeze(1) - above.sum(1, keepdim=True)
    equal = rows == thr
    if not bool((equal.sum(1, keepdim=True) > need).any()):  # no tie to break: skip the cumsum
        return (above | equal) & (counts > 0).unsqueeze(1)
    out = above | (equal & (equal.cumsum(1) <= need))
    return out & (counts > 0).unsqueeze(1)


def flat_true(selected: Tensor) -> Tensor:
    return selected.reshape(-1).nonzero().reshape(-1)  # row-major, so already sorted


def equal_budget_rows(rows: dict[str, Tensor], k: int, taken: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """k entries over the rows of every tensor, ranked by (within-row rank, score): each row's best entry
    comes before any row's second best, and among entries of the same within-row rank the higher score
    wins (ties to the smaller index, tensors in sorted-name order). ``taken`` entries are left out.
    Returns {name: sorted flat indices}.
    """
    names = list(rows)
    rows = dict(rows)
    for n in names:
        if taken is not None and taken.get(n) is not None and taken[n].numel():
            r = rows[n].clone().reshape(-1)
            r[taken[n].to(torch.int64)] = -math.inf
            rows[n] = r.reshape(rows[n].shape)
    available = torch.cat([torch.isfinite(rows[n]).sum(1) for n in names])
    counts = torch.zeros_like(available)
    remaining, j = k, 0
    while remaining > 0:
        in_round = available > j
        n_round = int(in_round.sum())
        if n_round == 0:
            raise TopkError(f"equal-budget selection: {k} entries asked, fewer available")
        if n_round <= remaining:
            counts += in_round.to(counts.dtype)
            remaining -= n_round
            j += 1
            continue
        # the last, partial round: the j-th best entry of every row still in it, best first
        cand = torch.cat([kth_in_rows(rows[n], torch.full((rows[n].shape[0],), j)) if rows[n].shape[1] > j else
                          torch.full((rows[n].shape[0],), -math.inf, dtype=torch.float64) for n in names])
        cand[~in_round] = -math.inf
        counts[topk_flat(cand, remaining)] += 1
        remaining = 0
    out, pos = {}, 0
    for n in names:
        n_rows = rows[n].shape[0]
        out[n] = flat_true(top_in_rows(rows[n], counts[pos : pos + n_rows]))
        pos += n_rows
    return out
