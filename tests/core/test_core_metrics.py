"""Macro-F1 over the fixed label set, and the per-sample predictions evaluate() can return."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from shpeft_core.metrics import class_metrics, macro_f1
from shpeft_core.train import _metrics, evaluate


def test_macro_f1_counts_every_class_of_the_label_set_by_hand():
    labels, preds = [0, 0, 1, 1], [0, 1, 1, 1]
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 2, FP 1 -> 4/5; class 2 absent and never predicted -> 1
    assert macro_f1(labels, preds, 3) == pytest.approx((2 / 3 + 4 / 5 + 1.0) / 3)
    # absent but predicted: F1 0 for that class
    assert macro_f1(labels, [0, 2, 1, 1], 3) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    # the label set is fixed: a class the split lacks is not dropped (scikit-learn's default would drop it)
    assert f1_score(labels, preds, average="macro") == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_macro_f1_equals_sklearn_with_the_fixed_label_set_and_batches():
    rng = np.random.default_rng(0)
    for trial in range(40):
        c = int(rng.integers(2, 6))
        n = int(rng.integers(1, 30))
        y = rng.integers(0, c - (trial % 2), size=n)  # every other case lacks the last class
        p = rng.integers(0, c, size=n)
        want = f1_score(y, p, labels=list(range(c)), average="macro", zero_division=1.0)
        assert macro_f1(y, p, c) == pytest.approx(want, abs=1e-12)
    ys, ps = rng.integers(0, 4, size=(3, 5, 20)), rng.integers(0, 4, size=(3, 5, 20))
    got = macro_f1(ys, ps, 4)
    assert got.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            assert got[i, j] == pytest.approx(macro_f1(ys[i, j], ps[i, j], 4))
    probs = rng.random((20, 4))
    assert macro_f1(ys[0, 0], probs, 4) == macro_f1(ys[0, 0], probs.argmax(1), 4)
    with pytest.raises(ValueError, match="shape"):
        macro_f1([0, 1], [0], 2)
    with pytest.raises(ValueError, match="class scores"):
        macro_f1([0, 1], np.zeros((2, 3)), 2)


def test_training_metrics_use_the_fixed_label_set_and_macro_auc_is_the_one_vs_rest_mean():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # class 2 neither present nor predicted
    m = _metrics(logits, labels, 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    probs = torch.softmax(logits.double(), 1).numpy()
    per = class_metrics(labels.numpy(), probs, 3)
    assert per["auc"][2] is None and m["auc"] == pytest.approx(np.mean(per["auc"][:2]))


def test_evaluate_returns_per_sample_predictions_in_loader_order():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    out = evaluate(model, [(x[:17], y[:17]), (x[17:], y[17:])], num_classes=3, predictions=True)
    pred = out["predictions"]
    assert pred["labels"].tolist() == y.tolist() and pred["probs"].shape == (30, 3)
    assert pred["preds"].tolist() == model(x).argmax(1).tolist()
    np.testing.assert_allclose(pred["probs"].sum(1), 1.0, rtol=1e-12)
    assert macro_f1(pred["labels"], pred["preds"], 3) == out["macro_f1"]
    assert "predictions" not in evaluate(model, [(x, y)], num_classes=3)
