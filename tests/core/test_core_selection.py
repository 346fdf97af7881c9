import pytest
import torch

from shpeft_core import ImportanceMap, hybrid_scores, mask_size, select_mask
from shpeft_core.selection import SelectionError, budget, hybrid_mask, rank_normalize


def _scores(seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (6, 10), "b.weight": (4, 5), "c.weight": (3, 2, 2, 2)}
    # Heavy-tailed scores, like squared gradients.
    return {n: torch.randn(s, generator=g).pow(4) for n, s in shapes.items()}


def _ranking(scores, k):
    """Reference: the k best (score, -global index) pairs in sorted-name order."""
    flat = []
    for n in sorted(scores):
        for i, v in enumerate(scores[n].reshape(-1).tolist()):
            flat.append((-v, len(flat), n, i))
    best = sorted(flat)[:k]
    out = {}
    for _, _, n, i in best:
        out.setdefault(n, []).append(i)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("density", [1e-4, 0.01, 0.05, 0.1, 0.333, 0.5, 1.0])
def test_global_density_exact_and_top_entries(density):
    s = _scores()
    total = sum(t.numel() for t in s.values())
    mask = select_mask(s, density, "global")
    assert mask_size(mask) == max(1, int(density * total + 0.5))
    assert {n: v.tolist() for n, v in mask.items()} == _ranking(s, mask_size(mask))
    for v in mask.values():
        assert v.dtype == torch.int32 and torch.equal(v, torch.sort(v).values)


def test_budget_rounds_half_up_and_keeps_one():
    assert budget(0.5, 3) == 2  # 1.5 -> 2
    assert budget(0.25, 10) == 3  # 2.5 -> 3
    assert budget(1e-9, 10) == 1
    with pytest.raises(SelectionError):
        budget(0.0, 10)
    with pytest.raises(SelectionError):
        budget(1.5, 10)


def test_ties_broken_by_flat_index_and_deterministic():
    s = {"b.weight": torch.ones(3, 4), "a.weight": torch.ones(2, 2)}
    m1 = select_mask(s, 0.5, "global")  # 8 of 16, all tied: a first (sorted names), then b from index 0
    assert m1["a.weight"].tolist() == [0, 1, 2, 3]
    assert m1["b.weight"].tolist() == [0, 1, 2, 3]
    m2 = select_mask(dict(reversed(list(s.items()))), 0.5, "global")
    assert {n: v.tolist() for n, v in m1.items()} == {n: v.tolist() for n, v in m2.items()}
    row = select_mask({"w": torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])}, 0.4, "per_row")
    assert row["w"].tolist() == [1, 2]


def test_selection_repeatable():
    s = _scores(3)
    for g in ("global", "per_tensor", "per_row"):
        a, b = select_mask(s, 0.1, g), select_mask({k: v.clone() for k, v in s.items()}, 0.1, g)
        assert {n: v.tolist() for n, v in a.items()} == {n: v.tolist() for n, v in b.items()}


def test_per_tensor_budget_proportional_and_exact():
    s = _scores(1, {"a.weight": (50, 20), "b.weight": (30, 10), "c.weight": (20,)})
    mask = select_mask(s, 0.1, "per_tensor")  # k = 130: 100 / 30 / 0 by size ... remainder rule
    sizes = {"a.weight": 1000, "b.weight": 300, "c.weight": 20}
    k = budget(0.1, 1320)
    assert mask_size(mask) == k
    for n, v in mask.items():
        assert abs(v.numel() - k * sizes[n] / 1320) < 1
        top = torch.topk(s[n].reshape(-1), v.numel()).indices
        assert set(v.tolist()) == set(top.tolist())


def test_per_row_takes_top_k_in_every_output_row():
    s = _scores(2, {"a.weight": (5, 20), "b.weight": (3, 2, 2, 2)})
    mask = select_mask(s, 0.1, "per_row")
    a = mask["a.weight"].reshape(5, 2)  # K = round(0.1 * 20) = 2 per row
    for r in range(5):
        cols = (a[r] - r * 20).tolist()
        assert all(0 <= c < 20 for c in cols)
        assert set(cols) == set(torch.topk(s["a.weight"][r], 2).indices.tolist())
    assert mask["b.weight"].numel() == 3  # at least one per row of the 4-D conv weight


def test_hybrid_alpha_edges_reproduce_pure_rankings():
    spec, agn = _scores(4), _scores(5)
    for density in (0.05, 0.2):
        pure_spec = select_mask(spec, density)
        pure_agn = select_mask(agn, density)
        h1 = select_mask(hybrid_scores(ImportanceMap(spec), ImportanceMap(agn), 1.0), density)
        h0 = select_mask(hybrid_scores(ImportanceMap(spec), ImportanceMap(agn), 0.0), density)
        assert {n: v.tolist() for n, v in h1.items()} == {n: v.tolist() for n, v in pure_spec.items()}
        assert {n: v.tolist() for n, v in h0.items()} == {n: v.tolist() for n, v in pure_agn.items()}
    mid = hybrid_scores(spec, agn, 0.5)
    assert set(mid) == set(spec)
    # The mix lies between the two normalised maps, entry by entry.
    ns, na = hybrid_scores(spec, None, 1.0), hybrid_scores(None, agn, 0.0)
    for n in spec:
        lo, hi = torch.minimum(ns[n], na[n]), torch.maximum(ns[n], na[n])
        assert bool(((mid[n] >= lo - 1e-12) & (mid[n] <= hi + 1e-12)).all())


def test_hybrid_rank_is_scale_invariant():
    spec, agn = _scores(6), _scores(7)
    scaled = {n: v * 1e6 for n, v in agn.items()}
    a = select_mask(hybrid_scores(spec, agn, 0.3), 0.1)
    b = select_mask(hybrid_scores(spec, scaled, 0.3), 0.1)
    assert {n: v.tolist() for n, v in a.items()} == {n: v.tolist() for n, v in b.items()}


def test_rank_normalize_ties_and_range():
    r = rank_normalize(torch.tensor([3.0, 1.0, 3.0, 2.0]))
    assert r.tolist() == [3.5 / 4, 1 / 4, 3.5 / 4, 2 / 4]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: hybrid_scores(_scores(0), _scores(0, {"x.weight": (2, 2)}), 0.5), "parameter sets differ"),
        (lambda: hybrid_scores(_scores(0), None, 0.5), "agnostic"),
        (lambda: hybrid_scores(_scores(0), _scores(1), 1.5), "alpha"),
        (lambda: select_mask({"a.weight": torch.tensor([1.0, float("nan")])}, 0.5), "a.weight"),
        (lambda: select_mask(_scores(0), 0.1, "per_layer"), "granularity"),
        (
            lambda: hybrid_scores(ImportanceMap(_scores(0), {"backbone": "x"}), ImportanceMap(_scores(1), {"backbone": "y"}), 0.5),
            "backbone",
        ),
    ],
)
def test_bad_selection_input(call, match):
    with pytest.raises(SelectionError, match=match):
        call()


def _pct_ranks(scores):
    """Reference rank percentile over all entries jointly (no ties in these maps), in sorted-name order."""
    flat = [(v, n, i) for n in sorted(scores) for i, v in enumerate(scores[n].reshape(-1).tolist())]
    order = sorted(range(len(flat)), key=lambda j: flat[j][0])
    pct = [0.0] * len(flat)
    for r, j in enumerate(order, 1):
        pct[j] = r / len(flat)
    return {(n, i): pct[j] for j, (_, n, i) in enumerate(flat)}


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.73])
def test_rank_sum_mix_equals_hand_computed_mix(alpha):
    specific, agnostic = _scores(1), _scores(2)
    rs, ra = _pct_ranks(specific), _pct_ranks(agnostic)
    got = hybrid_scores(specific, agnostic, alpha)
    for (n, i), r in rs.items():
        want = alpha * r + (1 - alpha) * ra[(n, i)]
        assert got[n].reshape(-1)[i].item() == pytest.approx(want, abs=1e-12)
    # and the mask is the top-k of that hand-computed mix
    k = 9
    mix = {n: torch.tensor([alpha * rs[(n, i)] + (1 - alpha) * ra[(n, i)] for i in range(t.numel())],
                           dtype=torch.float64).reshape(t.shape) for n, t in specific.items()}
    total = sum(t.numel() for t in specific.values())
    mask = hybrid_mask(specific, agnostic, alpha, density=k / total, mix="rank_sum")
    assert {n: v.tolist() for n, v in mask.items()} == _ranking(mix, k)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_union_takes_alpha_share_from_each_ranking_without_double_counting(alpha):
    specific, agnostic = _scores(3), _scores(4)
    total = sum(t.numel() for t in specific.values())
    k = 12
    mask = hybrid_mask(specific, agnostic, alpha, density=k / total, mix="union")
    chosen = {(n, i) for n, v in mask.items() for i in v.tolist()}
    assert len(chosen) == k
    ks = int(alpha * k + 0.5)
    top_s = {(n, i) for n, v in _ranking(specific, ks).items() for i in v}
    assert top_s <= chosen  # the task-specific share is all there
    # the rest is the agnostic ranking's best among entries not already chosen
    rest = chosen - top_s
    ranked_a = [(n, i) for n, v in _ranking(agnostic, total).items() for i in v]
    a_order = sorted(ranked_a, key=lambda e: -agnostic[e[0]].reshape(-1)[e[1]].item())
    assert rest == set([e for e in a_order if e not in top_s][: k - ks])


def test_union_fills_overlap_from_the_agnostic_ranking():
    """When both maps rank the same entries first, the union still selects exactly k entries."""
    s = {"w": torch.arange(20, dtype=torch.float64)}
    a = {"w": torch.arange(20, dtype=torch.float64)}
    mask = hybrid_mask(s, a, 0.5, density=0.3, mix="union")  # k = 6
    assert mask["w"].tolist() == [14, 15, 16, 17, 18, 19]


def test_union_and_rank_sum_keep_alpha_edges():
    specific, agnostic = _scores(5), _scores(6)
    for mix in ("union", "rank_sum"):
        assert {n: v.tolist() for n, v in hybrid_mask(specific, agnostic, 1.0, 0.1, mix=mix).items()} == \
            {n: v.tolist() for n, v in select_mask(specific, 0.1).items()}
        assert {n: v.tolist() for n, v in hybrid_mask(specific, agnostic, 0.0, 0.1, mix=mix).items()} == \
            {n: v.tolist() for n, v in select_mask(agnostic, 0.1).items()}


def test_union_per_row_splits_every_row():
    g = torch.Generator().manual_seed(0)
    s = {"w": torch.rand(5, 40, generator=g, dtype=torch.float64)}
    a = {"w": torch.rand(5, 40, generator=g, dtype=torch.float64)}
    mask = hybrid_mask(s, a, 0.5, density=0.1, granularity="per_row", mix="union")  # 4 per row: 2 + 2
    idx = mask["w"].reshape(5, 4) % 40
    for r in range(5):
        top_s = set(torch.sort(s["w"][r], descending=True).indices[:2].tolist())
        assert top_s <= set(idx[r].tolist())
