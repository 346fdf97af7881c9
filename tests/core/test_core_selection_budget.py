"""Budgets of the selection rules: the union's specific share, equal-budget per-row, random masks."""

import itertools

import pytest
import torch

from shpeft_core.methods import method_mask
from shpeft_core.selection import (Mask, budget, effective_alpha, hybrid_mask, mask_size, per_row_budget,
                                   random_mask, select_mask, selection_budget)

from helpers_core import tiny_model

# One ViT-B/16 block and its patch embedding: the shapes the budgets are about.
VIT_B = {
    "blocks.0.attn.qkv.weight": (2304, 768),
    "blocks.0.attn.proj.weight": (768, 768),
    "blocks.0.mlp.fc1.weight": (3072, 768),
    "blocks.0.mlp.fc2.weight": (768, 3072),
    "patch_embed.proj.weight": (768, 3, 16, 16),
}
MODES = {  # name -> (granularity, equal_budget)
    "global": ("global", False), "per_tensor": ("per_tensor", False),
    "per_row": ("per_row", False), "per_row_equal": ("per_row", True),
}


def _opposite_rank_maps(shapes, seed=0):
    """Rank-percentile maps whose rankings are exact opposites: the agnostic best is the specific worst.

    A selected entry then tells where it came from: specific picks sit in the top of the specific ranking
    (percentile > 0.5), agnostic picks at its bottom.
    """
    total = sum(torch.Size(s).numel() for s in shapes.values())
    ranks = (torch.randperm(total, generator=torch.Generator().manual_seed(seed)) + 1).to(torch.float64)
    ns, na, pos = {}, {}, 0
    for n in sorted(shapes):
        size = torch.Size(shapes[n]).numel()
        r = ranks[pos : pos + size]
        ns[n], na[n] = (r / total).reshape(shapes[n]), ((total + 1 - r) / total).reshape(shapes[n])
        pos += size
    return ns, na


def _as_lists(mask):
    return {n: v.tolist() for n, v in mask.items()}


@pytest.mark.parametrize("density", [1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("mode", list(MODES))
def test_union_specific_share_is_round_alpha_k_at_every_density(density, mode):
    granularity, equal = MODES[mode]
    ns, na = _opposite_rank_maps(VIT_B)
    for alpha in (0.5, 0.3):
        mask = select_mask(ns, density, granularity, union_with=na, union_alpha=alpha, equal_budget=equal)
        k = mask_size(mask)
        assert k == selection_budget(VIT_B, density, granularity, equal_budget=equal)
        from_specific = sum(int((ns[n].reshape(-1)[v.long()] > 0.5).sum()) for n, v in mask.items())
        want = int(alpha * k + 0.5)
        assert from_specific == want == mask.specific_count, (mode, density, alpha)
        assert abs(effective_alpha(mask) - alpha) <= 0.5 / k + 1e-12
        for v in mask.values():
            assert v.dtype == torch.int32 and torch.equal(v, torch.unique(v))  # sorted, no repeats


def test_union_share_no_longer_drifts_where_tensors_get_one_entry():
    """Per tensor at low density most tensors of a ViT-B get one to four entries; rounding alpha*k inside
    each tensor would hand most of them to the specific ranking."""
    shapes = {f"blocks.{i}.{t}": s for i in range(4) for t, s in
              (("attn.qkv.weight", (2304, 768)), ("attn.proj.weight", (768, 768)))}
    ns, na = _opposite_rank_maps(shapes, seed=1)
    mask = select_mask(ns, 2e-6, "per_tensor", union_with=na, union_alpha=0.5)
    k = mask_size(mask)
    assert k == budget(2e-6, sum(torch.Size(s).numel() for s in shapes.values())) == 19
    assert sorted(v.numel() for v in mask.values()) == [1, 1, 1, 1, 3, 4, 4, 4]
    per_tensor_rounding = sum(int(0.5 * v.numel() + 0.5) for v in mask.values())  # the old rule: 12 of 19
    assert per_tensor_rounding == 12 and mask.specific_count == 10 == int(0.5 * 19 + 0.5)


def _reference_union(ns, na, groups, alpha):
    """Plain-Python union rule. ``groups``: list of (k_g, [(name, flat index), ...]) in group order."""
    total_k = sum(kg for kg, _ in groups)
    target = min(total_k, int(alpha * total_k + 0.5))
    val_s = lambda e: ns[e[0]].reshape(-1)[e[1]].item()  # noqa: E731
    val_a = lambda e: na[e[0]].reshape(-1)[e[1]].item()  # noqa: E731
    ranked = [sorted(entries, key=lambda e: -val_s(e)) for _, entries in groups]  # stable: ties keep index order
    floors = [int(alpha * kg + 1e-9) for kg, _ in groups]
    rems = [alpha * kg - f if alpha * kg - f > 1e-9 else 0.0 for (kg, _), f in zip(groups, floors)]
    cands = sorted((g for g in range(len(groups)) if rems[g] > 0),
                   key=lambda g: (-rems[g], -val_s(ranked[g][floors[g]]), g))
    for g in cands[: target - sum(floors)]:
        floors[g] += 1
    chosen = set()
    for (kg, entries), r, sg in zip(groups, ranked, floors):
        spec = r[:sg]
        rest = sorted((e for e in entries if e not in spec), key=lambda e: -val_a(e))
        chosen |= set(spec) | set(rest[: kg - sg])
    out = {}
    for n, i in sorted(chosen):
        out.setdefault(n, []).append(i)
    return out, target


def _entries(shape, name):
    return [(name, i) for i in range(torch.Size(shape).numel())]


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.77])
def test_union_matches_a_plain_reference_per_tensor_and_per_row(alpha):
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (6, 9), "b.weight": (4, 9), "c.weight": (5, 2, 2, 2), "d.weight": (3, 7)}
    ns = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    na = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    names = sorted(shapes)
    for density in (0.04, 0.1, 0.3):
        plain = select_mask(ns, density, "per_tensor")
        groups = [(plain[n].numel() if n in plain else 0, _entries(shapes[n], n)) for n in names]
        want, target = _reference_union(ns, na, [gr for gr in groups if gr[0] > 0], alpha)
        got = select_mask(ns, density, "per_tensor", union_with=na, union_alpha=alpha)
        assert _as_lists(got) == want and got.specific_count == target
        row_groups = []
        for n in names:
            rows, cols = shapes[n][0], torch.Size(shapes[n]).numel() // shapes[n][0]
            kr = budget(density, cols)
            row_groups += [(kr, [(n, r * cols + c) for c in range(cols)]) for r in range(rows)]
        want, target = _reference_union(ns, na, row_groups, alpha)
        got = select_mask(ns, density, "per_row", union_with=na, union_alpha=alpha)
        assert _as_lists(got) == want and got.specific_count == target


def test_union_per_row_with_one_entry_per_row_gives_the_specific_slot_to_the_strongest_rows():
    s = {"w": torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.4, 0.1], [0.2, 0.95, 0.1], [0.5, 0.6, 0.7]], dtype=torch.float64)}
    a = {"w": torch.tensor([[0.1, 0.8, 0.2], [0.9, 0.1, 0.3], [0.3, 0.2, 0.6], [0.1, 0.2, 0.3]], dtype=torch.float64)}
    mask = select_mask(s, 0.1, "per_row", union_with=a, union_alpha=0.5)  # K = 1 per row, S = 2 of 4
    # rows 2 (0.95) and 0 (0.9) have the strongest specific entries; rows 1 and 3 take their agnostic best
    assert mask["w"].tolist() == [0, 3, 7, 11] and mask.specific_count == 2


def _reference_equal_budget(scores, k):
    """Plain Python: rank entries by (rank within their row, -score, position), take the first k."""
    keyed, pos = [], 0
    for n in sorted(scores):
        t = scores[n]
        rows = t.reshape(t.shape[0], -1)
        for r in range(rows.shape[0]):
            order = sorted(range(rows.shape[1]), key=lambda c: (-rows[r, c].item(), c))
            for within, c in enumerate(order):
                flat = r * rows.shape[1] + c
                keyed.append(((within, -rows[r, c].item(), pos + flat), n, flat))
        pos += t.numel()
    out = {}
    for _, n, flat in sorted(keyed)[:k]:
        out.setdefault(n, []).append(flat)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("density", [0.02, 0.1, 0.35])
def test_equal_budget_per_row_selects_the_global_k_spread_over_rows(density):
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (6, 10), "b.weight": (4, 5), "c.weight": (3, 2, 2, 2)}
    s = {n: torch.randn(sh, generator=g).pow(4) for n, sh in shapes.items()}
    total = sum(t.numel() for t in s.values())
    mask = select_mask(s, density, "per_row", equal_budget=True)
    assert mask_size(mask) == budget(density, total) == selection_budget(shapes, density, "per_row", equal_budget=True)
    assert _as_lists(mask) == _reference_equal_budget(s, budget(density, total))
    if budget(density, total) >= 13:  # at least one entry for each of the 13 rows
        for n, v in mask.items():
            rows = s[n].shape[0]
            assert set((v.long() // (s[n].numel() // rows)).tolist()) == set(range(rows))


def test_per_row_budget_states_gps_own_count():
    assert per_row_budget(VIT_B, 1e-3) == 2304 + 768 + 3072 + 768 * 3 + 768  # K = 1 per row, 3 in fc2 (3072 long)
    assert per_row_budget(VIT_B, 1e-2) == 2304 * 8 + 768 * 8 + 3072 * 8 + 768 * 31 + 768 * 8
    total = sum(torch.Size(s).numel() for s in VIT_B.values())
    assert selection_budget(VIT_B, 1e-3, "per_row") == per_row_budget(VIT_B, 1e-3) > 10 * budget(1e-4, total)
    assert selection_budget(VIT_B, 1e-3, "per_tensor") == selection_budget(VIT_B, 1e-3) == budget(1e-3, total)
    ns = {n: torch.rand(s, dtype=torch.float64) for n, s in VIT_B.items() if n.startswith("blocks.0.attn")}
    assert mask_size(select_mask(ns, 1e-3, "per_row")) == per_row_budget(ns, 1e-3)


def _counts_per_row(mask, shapes):
    out = {}
    for n, sh in shapes.items():
        cols = torch.Size(sh).numel() // sh[0]
        idx = mask[n].long() if n in mask else torch.zeros(0, dtype=torch.long)
        out[n] = torch.bincount(idx // cols, minlength=sh[0]).tolist()
    return out


@pytest.mark.parametrize("granularity,equal", [("global", False), ("per_tensor", False), ("per_row", False),
                                               ("per_row", True)])
def test_random_mask_follows_the_granularity_budgets(granularity, equal):
    shapes = {"a.weight": (40, 30), "b.weight": (12, 30), "c.weight": (8, 3, 2, 2)}
    for density, seed in itertools.product((0.003, 0.05), (0, 1)):
        scores = {n: torch.randn(s, generator=torch.Generator().manual_seed(9)) for n, s in shapes.items()}
        want = select_mask(scores, density, granularity, equal_budget=equal)
        got = random_mask(shapes, density, seed, granularity, equal_budget=equal)
        assert isinstance(got, Mask) and got.specific_count is None
        assert mask_size(got) == mask_size(want) == selection_budget(shapes, density, granularity, equal_budget=equal)
        if granularity == "per_tensor":
            assert {n: v.numel() for n, v in got.items()} == {n: v.numel() for n, v in want.items()}
        if granularity == "per_row" and not equal:
            assert _counts_per_row(got, shapes) == _counts_per_row(want, shapes)
    a, b = random_mask(shapes, 0.05, 0, granularity, equal_budget=equal), random_mask(shapes, 0.05, 1, granularity,
                                                                                      equal_budget=equal)
    assert _as_lists(a) == _as_lists(random_mask(shapes, 0.05, 0, granularity, equal_budget=equal))
    assert _as_lists(a) != _as_lists(b)


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_row"])
def test_the_random_method_trains_the_random_mask_at_the_jobs_granularity(granularity):
    model = tiny_model("vit")
    from shpeft_core.eligibility import eligible_parameters

    shapes = {n: p.shape for n, p in eligible_parameters(model).items()}
    got = method_mask("random", model=model, density=0.01, alpha=0.5, granularity=granularity, seed=5)
    assert _as_lists(random_mask(shapes, 0.01, 5, granularity)) == _as_lists(got)


def test_effective_alpha_of_each_rule():
    g = torch.Generator().manual_seed(0)
    spec = {"w": torch.rand(30, 40, generator=g)}
    agn = {"w": torch.rand(30, 40, generator=g)}
    union = hybrid_mask(spec, agn, 0.5, 0.01, "per_tensor", mix="union")  # k = 12
    assert union.specific_count == 6 and union.effective_alpha == effective_alpha(union) == 0.5
    assert hybrid_mask(spec, agn, 0.5, 0.01, mix="rank_sum").effective_alpha is None
    for mix in ("union", "rank_sum"):
        assert hybrid_mask(spec, agn, 1.0, 0.01, mix=mix).effective_alpha == 1.0
        assert hybrid_mask(spec, agn, 0.0, 0.01, mix=mix).effective_alpha == 0.0
    assert effective_alpha({"w": torch.tensor([1, 2], dtype=torch.int32)}) is None  # a plain dict
