import math
import os

import pytest
import torch

from shpeft_core import (
    ImportanceConfig,
    TrainConfig,
    apply_sparse_training,
    compute_importance,
    evaluate,
    fit,
    hybrid_scores,
    load_train_state,
    save_train_state,
    select_mask,
)
from shpeft_core.train import TrainStateError, _metrics, lr_factor

from helpers_core import separable_batches, tiny_model


def _sparse_model(batches, density=0.01):
    model = tiny_model("vit", num_classes=2)
    imp = compute_importance(model, batches, ImportanceConfig(num_batches=2), num_classes=2)
    return apply_sparse_training(model, select_mask(hybrid_scores(imp, None, 1.0), density))


def test_fit_improves_validation_metric_on_separable_task():
    train = separable_batches(n=96, seed=0)
    val = separable_batches(n=48, seed=1)
    model = _sparse_model(train)
    before = evaluate(model, val, num_classes=2)
    hist = fit(model, train, val, TrainConfig(epochs=4, lr=3e-2, warmup_epochs=1, weight_decay=0.01), num_classes=2)
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[-1]["loss"] < before["loss"]
    assert hist[-1]["macro_f1"] > max(before["macro_f1"], 0.8)
    assert set(hist[-1]) >= {"loss", "accuracy", "macro_f1", "auc", "train_loss", "lr"}


def test_fit_deterministic_and_resume_bit_exact(tmp_path):
    train = separable_batches(n=48, seed=0)
    val = separable_batches(n=16, seed=1)
    cfg = TrainConfig(epochs=3, lr=1e-2, weight_decay=0.05, seed=3)

    ref = _sparse_model(train)
    ref_hist = fit(ref, train, val, cfg, num_classes=2)
    ref_values = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}

    saved = {}

    def checkpoint(epoch, metrics, state):
        if epoch == 0:
            saved["info"] = save_train_state(state, str(tmp_path / "ckpt"))

    first = _sparse_model(train)
    fit(first, train, val, cfg, num_classes=2, on_epoch_end=checkpoint)
    assert {n: p for n, p in first.named_parameters() if p.requires_grad}.keys() == ref_values.keys()
    assert all(torch.equal(p, ref_values[n]) for n, p in first.named_parameters() if p.requires_grad)

    state = load_train_state(str(tmp_path / "ckpt"))
    assert state.epoch == 1 and state.step == 3
    resumed = _sparse_model(train)
    hist = fit(resumed, train, val, cfg, num_classes=2, resume_state=state)
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert hist[-1]["loss"] == ref_hist[-1]["loss"]
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref_values[n]), n
    names = os.listdir(tmp_path / "ckpt")
    assert sorted(names) == ["state.json", "tensors.safetensors"]


def test_train_state_checksum_and_mismatch(tmp_path):
    train = separable_batches(n=16, seed=0)
    model = _sparse_model(train)
    states = []
    fit(model, train, train, TrainConfig(epochs=1), num_classes=2, on_epoch_end=lambda e, m, s: states.append(s))
    save_train_state(states[0], str(tmp_path / "s"))
    p = tmp_path / "s" / "tensors.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(TrainStateError, match="checksum"):
        load_train_state(str(tmp_path / "s"))
    save_train_state(states[0], "memory://ckpt/s")
    other = tiny_model("vit", num_classes=2)
    apply_sparse_training(other, {"blocks.0.mlp.fc1.weight": torch.tensor([1], dtype=torch.int32)})
    with pytest.raises(TrainStateError, match="trainable"):
        fit(other, train, train, TrainConfig(epochs=2), num_classes=2, resume_state=load_train_state("memory://ckpt/s"))


def test_fit_with_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        train = separable_batches(n=32, seed=0)
        model = _sparse_model(train)
        hist = fit(DDP(model), train, train, TrainConfig(epochs=1, lr=1e-2), num_classes=2)
        assert math.isfinite(hist[0]["loss"])
    finally:
        dist.destroy_process_group()


def test_metrics_against_hand_computed_values_and_missing_class():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # class 2 never in y_true
    m = _metrics(logits, labels, 3)
    assert m["accuracy"] == 0.75
    # per-class F1 over classes seen in y_true or y_pred: class0 1.0, class1 2/3, class2 0.0
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert 0.0 <= m["auc"] <= 1.0 and math.isfinite(m["auc"])
    single = _metrics(logits[:2], torch.tensor([0, 0]), 3)
    assert math.isnan(single["auc"]) and single["accuracy"] == 0.5


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


class _NoLenLoader:
    """An iterable loader without __len__ (like a DataLoader over an IterableDataset)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_fit_with_loader_without_length():
    train = separable_batches(n=32, seed=0)
    model = _sparse_model(train)
    cfg = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0)
    hist = fit(model, _NoLenLoader(train), _NoLenLoader(train), cfg, num_classes=2)
    assert len(hist) == 3 and hist[0]["lr"] > hist[1]["lr"] > hist[2]["lr"] > 0
    with pytest.raises(ValueError, match="no batches"):
        fit(model, _NoLenLoader([]), train, TrainConfig(epochs=1), num_classes=2)
