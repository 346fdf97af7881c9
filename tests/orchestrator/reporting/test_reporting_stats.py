"""Paired statistics of two methods on the same test images and seeds: interval, p-value, Holm, verdict."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from shpeft_core.metrics import class_metrics

from orchestrator.reporting.stats import (StatsError, adjust_family, compare_to_reference, holm, metric_statistic,
                                          paired_difference, verdict)

C = 3


def _predictions(labels, accuracy, seeds, rng):
    """Per seed, each image is right with probability ``accuracy``, else a random wrong class."""
    out = np.empty((seeds, labels.size), dtype=np.int64)
    for s in range(seeds):
        right = rng.random(labels.size) < accuracy
        wrong = (labels + rng.integers(1, C, labels.size)) % C
        out[s] = np.where(right, labels, wrong)
    return out


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).integers(0, C, 165)


def test_a_clearly_better_method_gets_an_interval_above_zero_a_small_p_and_better(labels):
    rng = np.random.default_rng(1)
    good, poor = _predictions(labels, 0.9, 3, rng), _predictions(labels, 0.55, 3, rng)
    f1 = metric_statistic("macro_f1", C)
    r = paired_difference(labels, good, poor, f1, seed=0)
    want_a = np.mean([f1_score(labels, g, labels=range(C), average="macro", zero_division=1) for g in good])
    assert r.metric_a == pytest.approx(want_a) and r.difference == pytest.approx(r.metric_a - r.metric_b)
    assert 0 < r.ci_low < r.difference < r.ci_high and r.p_value < 0.01
    assert (r.n_seeds, r.n_images, r.confidence) == (3, 165, 0.95)
    (adj,) = adjust_family([r])
    assert adj.p_adjusted == r.p_value and adj.verdict == "better"
    (rev,) = adjust_family([paired_difference(labels, poor, good, f1, seed=0)])
    assert rev.verdict == "worse" and rev.ci_high < 0 and rev.difference == pytest.approx(-r.difference)


def test_identical_predictions_give_zero_p_one_and_no_evidence(labels):
    preds = _predictions(labels, 0.7, 3, np.random.default_rng(2))
    for name in ("macro_f1", "accuracy"):
        r = paired_difference(labels, preds, preds.copy(), metric_statistic(name, C), seed=0)
        assert r.difference == 0 and r.ci_low == r.ci_high == 0 and r.p_value == 1.0
        (adj,) = adjust_family([r])
        assert adj.verdict == "no evidence of a difference" and adj.p_adjusted == 1.0


def test_a_small_difference_on_one_seed_is_not_called(labels):
    rng = np.random.default_rng(3)
    a = _predictions(labels, 0.7, 1, rng)
    b = a.copy()
    flip = rng.choice(labels.size, 3, replace=False)  # three images change
    b[0, flip] = (labels[flip] + 1) % C
    r = paired_difference(labels, a, b, metric_statistic("accuracy", C), seed=0)
    assert r.n_seeds == 1 and r.ci_low <= 0 <= r.ci_high and r.p_value > 0.05
    assert adjust_family([r])[0].verdict == "no evidence of a difference"


def test_a_difference_one_seed_reverses_is_clear_on_the_images_but_not_called(labels):
    """Two seeds favour A by a lot, one favours B: the image-level test (seeds fixed) finds a difference, the
    interval over seeds and images includes zero, so the verdict does not call it."""
    rng = np.random.default_rng(8)
    a = np.concatenate([_predictions(labels, 0.55, 1, rng), _predictions(labels, 0.95, 2, rng)])
    b = np.concatenate([_predictions(labels, 0.95, 1, rng), _predictions(labels, 0.55, 2, rng)])
    r = paired_difference(labels, a, b, metric_statistic("macro_f1", C), seed=0)
    assert r.difference > 0.05 and r.p_value < 0.01 and r.ci_low < 0 < r.ci_high
    assert adjust_family([r])[0].verdict == "no evidence of a difference"


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]  # 0.5 * 2 capped at 1; 0.9 * 1 raised to keep the order
    assert holm([0.3, 0.02]).tolist() == pytest.approx([0.3, 0.04])
    with pytest.raises(StatsError, match="p-values"):
        holm([0.1, float("nan")])
    assert verdict(0.1, 0.049) == "better" and verdict(-0.1, 0.01) == "worse"
    assert verdict(0.1, 0.05) == verdict(0.0, 0.0) == "no evidence of a difference"
    assert verdict(0.1, 0.01, 0.02, 0.2) == "better" and verdict(-0.1, 0.01, -0.2, -0.01) == "worse"
    assert verdict(0.1, 0.01, -0.01, 0.2) == verdict(-0.1, 0.01, -0.2, 0.01) == "no evidence of a difference"


def test_results_are_a_function_of_the_seed(labels):
    rng = np.random.default_rng(4)
    a, b = _predictions(labels, 0.8, 3, rng), _predictions(labels, 0.75, 3, rng)
    f1 = metric_statistic("macro_f1", C)
    r1, r2 = paired_difference(labels, a, b, f1, seed=5), paired_difference(labels, a, b, f1, seed=5)
    assert r1 == r2
    r3 = paired_difference(labels, a, b, f1, seed=6)
    assert r3.difference == r1.difference and (r3.ci_low, r3.ci_high, r3.p_value) != (r1.ci_low, r1.ci_high, r1.p_value)


def test_any_metric_function_gives_the_vectorised_metric_s_answer():
    rng = np.random.default_rng(5)
    y = rng.integers(0, C, 30)
    a, b = _predictions(y, 0.8, 2, rng), _predictions(y, 0.6, 2, rng)

    def sk_f1(labels, preds):
        return f1_score(labels, preds, labels=list(range(C)), average="macro", zero_division=1)

    kw = dict(seed=1, n_resamples=100, n_permutations=100, method="percentile")
    plain = paired_difference(y, a, b, sk_f1, **kw)
    fast = paired_difference(y, a, b, metric_statistic("macro_f1", C), **kw)
    assert plain.difference == pytest.approx(fast.difference, abs=1e-12)
    assert (plain.ci_low, plain.ci_high, plain.p_value) == pytest.approx((fast.ci_low, fast.ci_high, fast.p_value),
                                                                         abs=1e-12)


def test_auc_statistic_is_the_macro_one_vs_rest_auc():
    rng = np.random.default_rng(6)
    y = rng.integers(0, C, 60)
    probs = rng.dirichlet(np.ones(C), size=(2, 60))
    probs[..., 0] = np.round(probs[..., 0], 1)  # ties
    auc = metric_statistic("auc", C)
    got = auc(np.broadcast_to(y, (2, 60)), probs)
    for s in range(2):
        assert got[s] == pytest.approx(class_metrics(y, probs[s], C)["macro_auc"], abs=1e-12)
    y_missing = np.where(y == 2, 0, y)  # class 2 absent: averaged over the two classes that can be scored
    assert auc(y_missing, probs[0]) == pytest.approx(class_metrics(y_missing, probs[0], C)["macro_auc"])
    r = paired_difference(y, probs, probs[::-1], auc, seed=0, n_resamples=300, n_permutations=300)
    assert np.isfinite(r.ci_low) and r.ci_low <= r.difference <= r.ci_high
    with pytest.raises(StatsError, match="probabilities"):
        paired_difference(y, probs.argmax(-1), probs.argmax(-1), auc)


def test_compare_to_reference_adjusts_over_the_family(labels):
    rng = np.random.default_rng(7)
    ref = _predictions(labels, 0.9, 3, rng)
    outputs = {"shpeft": ref, "linear": _predictions(labels, 0.5, 3, rng), "same": ref.copy()}
    got = compare_to_reference(labels, outputs, "shpeft", metric_statistic("macro_f1", C), seed=0)
    assert set(got) == {"linear", "same"}
    assert got["linear"].verdict == "better" and got["linear"].p_adjusted == pytest.approx(min(1, 2 * got["linear"].p_value))
    assert got["same"].verdict == "no evidence of a difference"
    with pytest.raises(StatsError, match="reference method 'lora'"):
        compare_to_reference(labels, outputs, "lora", metric_statistic("macro_f1", C))


@pytest.mark.parametrize("a_shape,b_shape,match", [((3, 165), (2, 165), "same seeds"), ((3, 10), (3, 10), "images"),
                                                    ((165,), (165,), "seeds")])
def test_inputs_that_do_not_pair_up_are_refused(labels, a_shape, b_shape, match):
    with pytest.raises(StatsError, match=match):
        paired_difference(labels, np.zeros(a_shape, int), np.zeros(b_shape, int), metric_statistic("accuracy", C))


def test_multi_label_auc_is_the_mean_finding_auroc_on_known_labels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    n, c = 60, 3
    y = (rng.random((n, c)) < 0.4).astype(np.float64)
    y[rng.random((n, c)) < 0.2] = np.nan  # unknown findings take no part
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # a finding with no positive: left out
    probs = np.clip(np.nan_to_num(y, nan=0.5) * 0.4 + rng.random((n, c)) * 0.6, 0, 1)
    want = np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], probs[~np.isnan(y[:, j]), j]) for j in (0, 1)])
    auc = metric_statistic("auc", c)
    assert auc(y, probs) == pytest.approx(want)
    # batched over resamples and seeds, as the bootstrap calls it
    assert np.allclose(auc(np.stack([y, y]), np.stack([probs, probs])), want)
    a = np.stack([probs, probs])
    b = np.stack([rng.random((n, c)), rng.random((n, c))])
    r = paired_difference(y, a, b, auc, seed=0, n_resamples=300, n_permutations=300)
    assert r.metric_a == pytest.approx(want) and r.ci_low < r.difference < r.ci_high


def test_recovery_fraction_places_a_method_between_floor_and_ceiling(labels):
    from orchestrator.reporting.stats import recovery_fraction

    rng = np.random.default_rng(6)
    floor, ceiling = _predictions(labels, 0.45, 3, rng), _predictions(labels, 0.95, 3, rng)
    f1 = metric_statistic("macro_f1", C)
    assert recovery_fraction(labels, floor, floor, ceiling, f1, n_resamples=200)[0] == 0.0
    assert recovery_fraction(labels, ceiling, floor, ceiling, f1, n_resamples=200)[0] == 1.0
    mid = np.where(rng.random(floor.shape) < 0.5, floor, ceiling)
    frac, lo, hi = recovery_fraction(labels, mid, floor, ceiling, f1, n_resamples=500)
    means = [np.mean([f1(labels, o[s]) for s in range(3)]) for o in (mid, floor, ceiling)]
    assert frac == pytest.approx((means[0] - means[1]) / (means[2] - means[1]))
    assert 0.2 < lo < frac < hi < 0.8


def test_recovery_interval_leaves_out_resamples_where_the_gap_vanishes(labels):
    from orchestrator.reporting.stats import recovery_fraction

    rng = np.random.default_rng(7)
    floor, ceiling = _predictions(labels, 0.6, 1, rng), _predictions(labels, 0.75, 1, rng)
    mid = np.where(rng.random(floor.shape) < 0.5, floor, ceiling)
    f1 = metric_statistic("macro_f1", C)
    # 40 images and a small gap: some resamples have no gap (undefined fraction); the rest give the interval
    frac, lo, hi = recovery_fraction(labels[:40], mid[:, :40], floor[:, :40], ceiling[:, :40], f1, n_resamples=400)
    assert np.isfinite([frac, lo, hi]).all() and lo <= frac <= hi
    # no gap at all: no fraction and no interval
    assert all(np.isnan(v) for v in recovery_fraction(labels, mid, ceiling, ceiling, f1, n_resamples=100))
