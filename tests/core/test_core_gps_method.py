"""The gps method end to end in the core: exactly its parameters train (per-row entries, biases, layer-scale
gammas, head), its task delta carries the trained biases as dense tensors (format 2), and that delta
reproduces the trained model on a fresh backbone and comes off it bit-exactly."""

import json

import pytest
import torch

from shpeft_core import BackboneSpec, TrainConfig, create_backbone, fit
from shpeft_core.backbone import backbone_fingerprint, head_parameter_names
from shpeft_core.delta import (DENSE_FORMAT_VERSION, FORMAT_VERSION, DeltaError, TaskDelta, apply_delta, load_delta,
                               save_delta, validate_delta)
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.methods import get_method, load_artifact, save_artifact
from shpeft_core.methods.gps import gps_trainable_extras
from shpeft_core.selection import per_row_budget, selection_budget

from helpers_core import separable_batches

META = {"alpha": "1.0", "estimator": "grad1", "importance_key": "k", "task": "t"}


def _vit():
    torch.manual_seed(0)
    # layer scale on, so the gammas GPS trains exist
    return create_backbone(BackboneSpec("test_vit", None, {"img_size": 32, "init_values": 1e-2}), 2)


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in eligible_parameters(model).items()}


def _trained_gps(density=1e-3, equal_budget=False):
    gps = get_method("gps")
    model = _vit()
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    mask = gps.mask(model, specific=_scores(model), agnostic=None, density=density, alpha=1.0, granularity="per_row",
                    mix="union", seed=0, equal_budget=equal_budget)
    net, handle = gps.prepare(model, mask=mask)
    batches = separable_batches(48, 16)
    fit(net, batches, batches, TrainConfig(epochs=2, lr=5e-2, warmup_epochs=0), num_classes=2)
    return gps, net, handle, mask, base


def test_gps_trains_its_entries_biases_gammas_and_head_and_nothing_else():
    gps, net, handle, mask, base = _trained_gps()
    plain = _vit()
    extras = set(gps_trainable_extras(plain))
    assert any(n.endswith(".gamma") for n in extras) and any(n.endswith(".bias") for n in extras)
    assert set(handle["dense"]) == extras - set(head_parameter_names(plain))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    values = {n for n in trainable if n.endswith(".values")}
    assert trainable - values == extras
    # the mask is GPS's own per-row budget: K = max(1, round(density * row)) in every row
    shapes = {n: p.shape for n, p in eligible_parameters(plain).items()}
    assert sum(v.numel() for v in mask.values()) == per_row_budget(shapes, 1e-3) > selection_budget(shapes, 1e-3)
    # what did not train is as it was: norms, embeddings, the frozen weight entries
    state = net.state_dict()
    for n in ("norm.weight", "blocks.0.norm1.bias", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"):
        assert torch.equal(state[n], base[n]), n
    moved = [n for n in handle["dense"] if not torch.equal(state[n], base[n])]
    assert len(moved) == len(handle["dense"])  # every bias and gamma GPS trains has moved


def test_gps_equal_budget_selects_the_jobs_k():
    gps = get_method("gps")
    model = _vit()
    shapes = {n: p.shape for n, p in eligible_parameters(model).items()}
    mask = gps.mask(model, specific=_scores(model), agnostic=None, density=1e-3, alpha=1.0, granularity="per_row",
                    mix="union", seed=0, equal_budget=True)
    assert sum(v.numel() for v in mask.values()) == selection_budget(shapes, 1e-3, "global")


def test_gps_artifact_holds_the_dense_biases_and_reproduces_the_trained_model(tmp_path):
    gps, net, handle, mask, _ = _trained_gps()
    uri = str(tmp_path / "gps.safetensors")
    save_artifact(net, handle, "gps", uri, META)
    delta = load_delta(uri)
    assert delta.metadata["shpeft_format"] == DENSE_FORMAT_VERSION
    assert set(delta.dense) == set(handle["dense"])
    assert delta.metadata["backbone_fingerprint"] == backbone_fingerprint(_vit())  # the base, not the trained
    params = dict(net.named_parameters())
    for n, t in delta.dense.items():
        assert torch.equal(t, params[n].detach())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    net.eval()
    with torch.no_grad():
        want = net(x)
    fresh = _vit()
    before = {n: p.detach().clone() for n, p in fresh.state_dict().items()}
    applied = load_artifact(fresh, "gps", uri).eval()
    with torch.no_grad():
        torch.testing.assert_close(applied(x), want, rtol=1e-5, atol=1e-5)
    # apply / remove by hand: bit-exact undo of the dense tensors too
    other = _vit()
    h = apply_delta(other, delta)
    assert not torch.equal(other.state_dict()["blocks.0.attn.qkv.bias"], before["blocks.0.attn.qkv.bias"])
    h.remove()
    for n, t in other.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_a_delta_without_dense_tensors_keeps_format_1(tmp_path):
    _, net, _, _, _ = _trained_gps()
    uri = str(tmp_path / "plain.safetensors")
    save_artifact(net, None, "gps", uri, META)  # no dense names: the sparse values and head only
    delta = load_delta(uri)
    assert delta.metadata["shpeft_format"] == FORMAT_VERSION and not delta.dense


def _with_dense(delta: TaskDelta, dense: dict) -> TaskDelta:
    return TaskDelta(indices=delta.indices, values=delta.values, head=delta.head,
                     metadata={**delta.metadata, "shpeft_format": DENSE_FORMAT_VERSION}, dense=dense)


@pytest.mark.parametrize("name,problem", [
    ("blocks.0.norm1.bias", "not a parameter a delta may replace"),
    ("pos_embed", "not a parameter a delta may replace"),
    ("head.bias", "also a sparse parameter or head tensor"),
    ("blocks.0.attn.qkv.weight", "not a parameter a delta may replace|also a sparse parameter"),
])
def test_validate_refuses_dense_tensors_outside_biases_and_gammas(tmp_path, name, problem):
    _, net, handle, _, _ = _trained_gps()
    uri = str(tmp_path / "gps.safetensors")
    save_artifact(net, handle, "gps", uri, META)
    delta = load_delta(uri)
    shape = dict(_vit().named_parameters())[name].shape
    crafted = _with_dense(delta, {**delta.dense, name: torch.zeros(shape)})
    with pytest.raises(DeltaError, match=problem):
        validate_delta(_vit(), crafted, where="crafted")
    bad_shape = _with_dense(delta, {**delta.dense, "blocks.0.attn.qkv.bias": torch.zeros(3)})
    with pytest.raises(DeltaError, match="shape"):
        validate_delta(_vit(), bad_shape, where="crafted")


def test_dense_tensors_need_format_2_and_finite_values(tmp_path):
    _, net, handle, _, _ = _trained_gps()
    uri = str(tmp_path / "gps.safetensors")
    save_artifact(net, handle, "gps", uri, META)
    delta = load_delta(uri)
    old = TaskDelta(indices=delta.indices, values=delta.values, head=delta.head,
                    metadata={**delta.metadata, "shpeft_format": FORMAT_VERSION}, dense=delta.dense)
    with pytest.raises(DeltaError, match="dense tensors in a format '1' delta"):
        save_delta(old, str(tmp_path / "old.safetensors"))
    name = next(iter(delta.dense))
    nan = _with_dense(delta, {**delta.dense, name: torch.full_like(delta.dense[name], float("nan"))})
    with pytest.raises(DeltaError, match="finite"):
        save_delta(nan, str(tmp_path / "nan.safetensors"))
    assert json.loads(delta.metadata["parameter_shapes"])  # the sparse part is described as before
