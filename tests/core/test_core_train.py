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


def test_validating_the_last_epoch_only_trains_the_same_weights():
    train = separable_batches(n=48, seed=0)
    val = separable_batches(n=16, seed=1)
    cfg = TrainConfig(epochs=3, lr=1e-2, weight_decay=0.05, seed=3)
    every, last = _sparse_model(train), _sparse_model(train)
    hist_every = fit(every, train, val, cfg, num_classes=2)
    hist_last = fit(last, train, val, cfg, num_classes=2, validate_each_epoch=False)
    assert all(torch.equal(a, b) for a, b in zip(every.parameters(), last.parameters()))
    assert [("macro_f1" in h) for h in hist_last] == [False, False, True]
    assert hist_last[-1]["macro_f1"] == hist_every[-1]["macro_f1"]
    assert [h["train_loss"] for h in hist_last] == [h["train_loss"] for h in hist_every]


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
    # state.json carries its own checksum: a changed step count is refused, not resumed from
    save_train_state(states[0], str(tmp_path / "t"))
    j = tmp_path / "t" / "state.json"
    j.write_text(j.read_text().replace(f'"step": {states[0].step}', f'"step": {states[0].step + 1}'))
    with pytest.raises(TrainStateError, match="state.json: damaged"):
        load_train_state(str(tmp_path / "t"))
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


def _augmented_task(root):
    from tasks.synthetic import write_task_family

    return write_task_family(str(root), n_tasks=1, images_per_task=40, formats=("imagefolder",), seed=5)[0]


def _fit_on_task(spec, cfg, *, resume_state=None, on_epoch_end=None, num_workers=0):
    """A sparse model trained through the real loader: shuffling plus timm's random-resized crop."""
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for

    model = tiny_model("vit", num_classes=spec.num_classes)
    probe = build_loader(spec, "train", transform=transform_for(model, train=False), batch_size=8)
    imp = compute_importance(model, probe, ImportanceConfig(num_batches=2), num_classes=spec.num_classes)
    apply_sparse_training(model, select_mask(hybrid_scores(imp, None, 1.0), 0.02))
    train = build_loader(spec, "train", transform=transform_for(model, train=True), batch_size=8, shuffle=True,
                         seed=cfg.seed, num_workers=num_workers)
    val = build_loader(spec, "val", transform=transform_for(model, train=False), batch_size=8)
    fit(model, train, val, cfg, num_classes=spec.num_classes, resume_state=resume_state, on_epoch_end=on_epoch_end)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_through_augmenting_loader_is_bit_exact(tmp_path, num_workers):
    """Killed after epoch 1 and resumed == never stopped; and two unbroken runs are identical even when
    something else drew from Python's `random` (as importing sklearn does) in between."""
    import random

    spec = _augmented_task(tmp_path / "data")
    cfg = TrainConfig(epochs=3, lr=1e-2, weight_decay=0.01, seed=7)
    unbroken = _fit_on_task(spec, cfg, num_workers=num_workers)
    random.random(), random.random()
    torch.rand(3)
    again = _fit_on_task(spec, cfg, num_workers=num_workers)
    assert all(torch.equal(unbroken[n], again[n]) for n in unbroken)

    saved = {}

    def stop_after_epoch_1(epoch, metrics, state):
        if epoch == 1:
            save_train_state(state, str(tmp_path / "ckpt"))
            saved["done"] = True
            raise KeyboardInterrupt  # the run dies here

    with pytest.raises(KeyboardInterrupt):
        _fit_on_task(spec, cfg, on_epoch_end=stop_after_epoch_1, num_workers=num_workers)
    random.seed(12345)  # a new process has other RNG states
    torch.manual_seed(999)
    resumed = _fit_on_task(spec, cfg, resume_state=load_train_state(str(tmp_path / "ckpt")), num_workers=num_workers)
    for n in unbroken:
        assert torch.equal(resumed[n], unbroken[n]), n


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches = _ddp_model_and_data()
        shard = [(x[rank::world], y[rank::world]) for x, y in batches]
        ddp = DDP(model)
        fit(ddp, shard, shard, TrainConfig(epochs=2, lr=5e-2, weight_decay=0.01, seed=1), num_classes=2)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _ddp_model_and_data():
    torch.manual_seed(0)
    model = tiny_model("vit", num_classes=2).double()
    batches = [(x.double(), y) for x, y in separable_batches(n=32, batch=8, seed=2)]
    imp = compute_importance(model, batches, ImportanceConfig(num_batches=2), num_classes=2)
    apply_sparse_training(model, select_mask(hybrid_scores(imp, None, 1.0), 0.02))
    return model, batches


def test_two_rank_ddp_fit_equals_mean_gradient_reference(tmp_path):
    """Two gloo ranks, each on half of every batch, end with identical values equal to one process
    training on the whole batch (the mean of the two ranks' gradients), in float64."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    model, batches = _ddp_model_and_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the reference sees each batch as rank 0's half then rank 1's half: the same mean loss
    whole = [(torch.cat([x[0::2], x[1::2]]), torch.cat([y[0::2], y[1::2]])) for x, y in batches]
    fit(model, whole, whole, TrainConfig(epochs=2, lr=5e-2, weight_decay=0.01, seed=1), num_classes=2)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(r0[n], r1[n]), f"ranks disagree on {n}"
            torch.testing.assert_close(r0[n], p.detach(), rtol=1e-9, atol=1e-11)
            assert not torch.equal(r0[n], before[n]), f"{n} did not train"
