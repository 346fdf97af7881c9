"""Task kinds in the core: the multi-label loss against a float64 reference, per-finding metrics and
quadratic kappa against hand-computed values, and training / importance / warm head on multi-label targets."""

import math

import numpy as np
import pytest
import torch

from helpers_core import tiny_model
from shpeft_core.importance import ImportanceConfig, ImportanceError, compute_importance, warm_head
from shpeft_core.label_metrics import best_thresholds, finding_metrics, quadratic_kappa
from shpeft_core.objectives import TaskKindError, check_targets, probabilities, target_keys, task_loss
from shpeft_core.train import TrainConfig, evaluate, fit

NAN = float("nan")


def _bce_reference(logits, targets, smoothing=0.0):
    """Mean over known entries of -[y log s(z) + (1-y) log(1-s(z))], in float64, written out."""
    total, n = 0.0, 0
    for z_row, y_row in zip(logits.tolist(), targets.tolist()):
        for z, y in zip(z_row, y_row):
            if math.isnan(y):
                continue
            y = y * (1 - smoothing) + 0.5 * smoothing
            s = 1 / (1 + math.exp(-z))
            total += -(y * math.log(s) + (1 - y) * math.log(1 - s))
            n += 1
    return total / n


def test_multi_label_loss_matches_float64_reference_and_ignores_unknown_entries():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 0, NAN, 1], [0, 0, 0, 1], [NAN, NAN, 1, 0], [1, 1, 1, 1], [0, NAN, 0, 0]],
                           dtype=torch.float64)
    loss = task_loss(logits, targets, "multi_label")
    assert loss.item() == pytest.approx(_bce_reference(logits.detach(), targets), abs=1e-12)
    loss.backward()
    unknown = torch.isnan(targets)
    assert (logits.grad[unknown] == 0).all() and (logits.grad[~unknown] != 0).all()
    smoothed = task_loss(logits.detach(), targets, "multi_label", label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(_bce_reference(logits.detach(), targets, 0.2), abs=1e-12)


def test_a_batch_with_nothing_known_has_zero_loss_and_gradient():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = task_loss(logits, torch.full((3, 2), NAN), "multi_label")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss) and (logits.grad == 0).all()


def test_single_label_and_ordinal_keep_cross_entropy_and_softmax():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    for kind in ("single_label", "ordinal"):
        assert task_loss(logits, y, kind).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
        assert torch.allclose(probabilities(logits, kind), logits.softmax(-1))
    assert torch.allclose(probabilities(logits, "multi_label"), torch.sigmoid(logits))
    with pytest.raises(TaskKindError, match="not one of"):
        task_loss(logits, y, "multiclass")


def test_targets_are_checked_per_kind():
    check_targets(torch.tensor([[1.0, NAN], [0.0, 1.0]]), "multi_label", 2)
    with pytest.raises(TaskKindError, match=r"float \[batch, 3\]"):
        check_targets(torch.tensor([[1.0, 0.0]]), "multi_label", 3)
    with pytest.raises(TaskKindError, match="1 \\(present\\), 0"):
        check_targets(torch.tensor([[1.0, 0.5]]), "multi_label", 2)
    with pytest.raises(TaskKindError, match=r"labels must be in \[0, 3\)"):
        check_targets(torch.tensor([0, 3]), "ordinal", 3)
    with pytest.raises(TaskKindError, match="integer class indices"):
        check_targets(torch.tensor([[1.0, 0.0]]), "single_label", 2)


def test_target_keys_equal_exactly_for_equal_targets():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, NAN], [0.0, NAN], [1.0, NAN]])
    k = target_keys(t, "multi_label").tolist()
    assert k[0] == k[1] and k[2] == k[4] and len({k[0], k[2], k[3]}) == 3
    assert target_keys(torch.tensor([2, 0]), "ordinal").tolist() == [2, 0]


def test_quadratic_kappa_against_hand_computed_values():
    # O: (0,0), (1,2), (2,2); weights (i-j)^2/4; E = outer(hist_y [1,1,1], hist_p [1,0,2]) / 3.
    # sum w*O = 1/4; sum w*E = 5/12 + 10/12 = 5/4  ->  kappa = 1 - (1/4)/(5/4) = 0.8
    assert quadratic_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(0.8, abs=1e-12)
    # reversed grades over four classes: sum w*O = 20/9, sum w*E = 40/36 -> kappa = -1
    assert quadratic_kappa([0, 1, 2, 3], [3, 2, 1, 0], 4) == pytest.approx(-1.0, abs=1e-12)
    assert quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3], 4) == pytest.approx(1.0)
    # an off-by-one grade costs less than an off-by-three one
    assert quadratic_kappa([0, 3, 1, 2], [1, 3, 1, 2], 4) > quadratic_kappa([0, 3, 1, 2], [3, 3, 1, 2], 4)
    assert quadratic_kappa([1, 1], [1, 1], 3) is None  # no disagreement possible: undefined


def test_finding_metrics_against_hand_computed_values():
    targets = np.array([[1, 0], [1, NAN], [0, 1], [0, 0], [NAN, 1]], dtype=float)
    probs = np.array([[0.9, 0.2], [0.4, 0.9], [0.6, 0.7], [0.1, 0.8], [0.99, 0.6]])
    got = finding_metrics(targets, probs, thresholds=[0.5, 0.5])
    # finding 0, known rows 0-3: positives score 0.9, 0.4; negatives 0.6, 0.1 -> pairs won 3 of 4
    assert got["auc"][0] == pytest.approx(0.75)
    assert (got["positives"], got["negatives"], got["unknown"]) == ([2, 2], [2, 2], [1, 1])
    # at 0.5: finding 0 predicts rows 0 and 2 -> TP 1, FP 1, FN 1 -> F1 0.5; sensitivity 0.5, specificity 0.5
    assert got["f1"][0] == pytest.approx(0.5) and got["sensitivity"][0] == 0.5 and got["specificity"][0] == 0.5
    # finding 1, known rows 0, 2, 3, 4: positives 0.7, 0.6; negatives 0.2, 0.8 -> pairs won 2 of 4
    assert got["auc"][1] == pytest.approx(0.5)
    assert got["macro_auc"] == pytest.approx(0.625)
    assert got["roc"][0]["fpr"][0] == 0.0 and got["roc"][0]["tpr"][-1] == 1.0
    # chosen thresholds maximise F1 on the data they are chosen on
    best = best_thresholds(targets, probs)
    chosen = finding_metrics(targets, probs, best)
    assert all(c >= f for c, f in zip(chosen["f1"], got["f1"]))
    assert best[0] == pytest.approx(0.4)  # p >= 0.4 keeps both positives and one negative: F1 0.8
    # a finding without positives: AUROC undefined, not a crash
    none = finding_metrics(np.array([[0.0], [0.0]]), np.array([[0.2], [0.7]]))
    assert none["auc"] == [None] and none["macro_auc"] is None and none["roc"] == [None]


def _findings_batches(n=96, batch=16, seed=0):
    """Each finding is a colour channel's offset: learnable, and independent across findings."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 3, generator=g) < 0.5).float()
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + 1.5 * y[:, :, None, None]
    y[torch.rand(n, 3, generator=g) < 0.1] = NAN  # some unknown labels
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_fit_and_evaluate_a_multi_label_task():
    torch.manual_seed(0)
    model = tiny_model("vit", num_classes=3)
    train, val = _findings_batches(seed=0), _findings_batches(48, seed=1)
    hist = fit(model, train, val, TrainConfig(epochs=4, lr=2e-3, warmup_epochs=0), num_classes=3, kind="multi_label")
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["auc"] > 0.9
    got = evaluate(model, val, num_classes=3, kind="multi_label", per_class=True)
    pf = got["per_finding"]
    assert got["n"] == 48 and len(pf["auc"]) == 3 and got["auc"] == pytest.approx(pf["macro_auc"])
    # thresholds chosen here, then applied unchanged to another split
    other = evaluate(model, train, num_classes=3, kind="multi_label", per_class=True, thresholds=pf["threshold"])
    assert other["per_finding"]["threshold"] == pf["threshold"]


def test_ordinal_evaluation_reports_kappa():
    model = tiny_model("vit", num_classes=3)
    batches = [(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    got = evaluate(model, batches, num_classes=3, kind="ordinal")
    logits = torch.cat([model.eval()(x) for x, _ in batches])
    want = quadratic_kappa([0, 1, 2, 0, 1, 2, 0, 1], logits.argmax(1).tolist(), 3)
    assert got["kappa"] == pytest.approx(want if want is not None else float("nan"), nan_ok=True)
    assert "kappa" not in evaluate(model, batches, num_classes=3)


@pytest.mark.parametrize("warmup,loss", [("linear_probe", "ce"), ("ridge", "ce"), ("none", "supcon")])
def test_importance_pass_on_multi_label_targets(warmup, loss):
    model = tiny_model("vit", num_classes=3)
    imap = compute_importance(model, _findings_batches(), ImportanceConfig(num_batches=2, head_warmup=warmup, loss=loss),
                              num_classes=3, kind="multi_label")
    assert imap.scores and all(torch.isfinite(t).all() for t in imap.scores.values())
    assert any(float(t.sum()) > 0 for t in imap.scores.values())
    with pytest.raises(ImportanceError, match="multi_label targets"):
        compute_importance(model, [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))],
                           ImportanceConfig(num_batches=1), num_classes=3, kind="multi_label")


def test_warm_head_fits_findings_with_unknown_entries():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=g)
    y = (feats[:, :2] > 0).float()
    y[::7, 0] = NAN
    model = tiny_model("vit", num_classes=2)
    model.head = head = torch.nn.Linear(8, 2)  # a classifier over these 8 features
    known = ~torch.isnan(y)
    for warmup, cut in (("linear_probe", 0.0), ("ridge", 0.5)):  # logits vs regressed 0/1 targets
        torch.nn.init.zeros_(head.weight)
        warm_head(model, feats, y, ImportanceConfig(head_warmup=warmup, head_warmup_steps=200), 2, "multi_label")
        with torch.no_grad():
            pred = (head(feats) > cut).float()
        assert (pred[known] == y[known]).float().mean() > 0.9, warmup
