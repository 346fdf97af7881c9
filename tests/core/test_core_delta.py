import json
import pickle

import pytest
import timm
import torch
from safetensors import safe_open

from shpeft_core import (
    FORMAT_VERSION,
    BackboneSpec,
    DeltaError,
    apply_delta,
    apply_sparse_training,
    backbone_fingerprint,
    create_backbone,
    create_model_for_delta,
    eligible_parameters,
    extract_delta,
    load_delta,
    merge_delta,
    save_delta,
)
from shpeft_core.delta import REQUIRED_METADATA, TaskDelta

from helpers_core import IMG, TINY, tiny_model

META = {"alpha": "0.5", "estimator": "grad2", "importance_key": "imp/abc", "task": "t1"}


def _trained(kind="vit", num_classes=3, seed=0):
    model = tiny_model(kind, num_classes)
    g = torch.Generator().manual_seed(seed)
    mask = {}
    for n, p in eligible_parameters(model).items():
        k = max(1, p.numel() // 200)
        mask[n] = torch.sort(torch.randperm(p.numel(), generator=g)[:k]).values.to(torch.int32)
    apply_sparse_training(model, mask)
    with torch.no_grad():  # stand-in for training: nonzero values and a changed head
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), mask


@pytest.mark.parametrize("kind", ["vit", "convnext", "swin", "deit_distilled"])
def test_merge_gives_plain_timm_model_with_same_logits(kind):
    model, mask = _trained(kind)
    delta = extract_delta(model, metadata=META)
    x = torch.randn(2, 3, IMG[kind], IMG[kind])
    with torch.no_grad():
        want = model(x)
    merged = merge_delta(delta).eval()
    stock = timm.create_model(TINY[kind].name, num_classes=3, **TINY[kind].kwargs).eval()
    stock.load_state_dict(merged.state_dict())  # strict: exactly timm's keys
    with torch.no_grad():
        torch.testing.assert_close(stock(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merge_delta(delta, tiny_model(kind)).eval()(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merge_delta(delta, model).eval()(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("uri_kind", ["local", "memory"])
def test_delta_round_trip_and_format(tmp_path, uri_kind):
    model, mask = _trained()
    delta = extract_delta(model, metadata={**META, "class_names": json.dumps(["a", "b", "c"])})
    uri = str(tmp_path / "t1.safetensors") if uri_kind == "local" else "memory://deltas/t1.safetensors"
    info = save_delta(delta, uri)
    assert len(info["sha256"]) == 64 and info["bytes"] > 0
    back = load_delta(uri)
    assert back.metadata == delta.metadata
    for n in mask:
        assert torch.equal(back.indices[n], mask[n]) and torch.equal(back.values[n], delta.values[n])
    assert set(back.head) == {"head.weight", "head.bias"}
    assert back.class_names == ["a", "b", "c"] and back.num_classes == 3
    assert set(REQUIRED_METADATA) <= set(back.metadata)
    assert back.metadata["shpeft_format"] == FORMAT_VERSION
    assert back.metadata["backbone_fingerprint"] == backbone_fingerprint(tiny_model())
    if uri_kind == "local":  # readable with safetensors alone
        with safe_open(uri, "pt") as f:
            assert f.metadata()["backbone"] == "test_vit"
            assert f.get_tensor("blocks.0.attn.qkv.weight.indices").dtype == torch.int32
            assert set(f.keys()) == {f"{n}.{s}" for n in mask for s in ("indices", "values")} | {"head.weight", "head.bias"}


def test_apply_and_remove_are_bit_exact():
    model, _ = _trained(num_classes=3)
    delta = extract_delta(model, metadata=META)
    base = tiny_model("vit", num_classes=5).eval()  # another head size: swapped in and back
    before = {n: t.clone() for n, t in base.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, base_logits = model(x), base(x)
        with apply_delta(base, delta):
            torch.testing.assert_close(base(x), want, rtol=1e-5, atol=1e-6)
            assert base.get_classifier().out_features == 3
        assert base.get_classifier().out_features == 5
        after = base.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
        assert torch.equal(base(x), base_logits)
        handle = apply_delta(base, delta)
        with pytest.raises(DeltaError, match="fingerprint"):
            apply_delta(base, delta)  # deltas do not stack silently
        handle.remove()
        handle.remove()  # idempotent
        assert all(torch.equal(base.state_dict()[n], before[n]) for n in before)


def test_same_head_size_restores_head_tensors():
    model, _ = _trained(num_classes=3)
    delta = extract_delta(model, metadata=META)
    base = tiny_model("vit", num_classes=3)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    apply_delta(base, delta).remove()
    assert all(torch.equal(base.state_dict()[n], before[n]) for n in before)


def test_wrong_backbone_or_shape_refused(tmp_path):
    model, _ = _trained()
    delta = extract_delta(model, metadata=META)
    with pytest.raises(DeltaError, match="test_vit.*test_convnext"):
        apply_delta(tiny_model("convnext"), delta)
    wider = create_backbone(BackboneSpec("test_vit", None, {"img_size": 32, "embed_dim": 32, "num_heads": 2}), 3)
    with pytest.raises(DeltaError, match=r"patch_embed.proj.weight|blocks\.0\..*shape"):
        apply_delta(wider, delta)
    other_weights = create_backbone(BackboneSpec("test_vit", None, {"img_size": 32}), 3)
    with torch.no_grad():
        other_weights.blocks[3].norm1.weight.add_(1.0)
    with pytest.raises(DeltaError, match="fingerprint"):
        apply_delta(other_weights, delta)
    bad = TaskDelta(dict(delta.indices), dict(delta.values), dict(delta.head), dict(delta.metadata))
    bad.indices["blocks.7.mlp.fc1.weight"] = torch.tensor([0], dtype=torch.int32)
    bad.values["blocks.7.mlp.fc1.weight"] = torch.tensor([1.0])
    with pytest.raises(DeltaError, match="blocks.7.mlp.fc1.weight"):
        apply_delta(tiny_model(), bad)


def test_load_refuses_pickle_and_foreign_files(tmp_path):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(DeltaError, match="evil.safetensors"):
        load_delta(str(p))
    q = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(q))
    with pytest.raises(DeltaError, match="not written by shpeft"):
        load_delta(str(q))


def test_extract_requires_caller_metadata_and_backbone_source(tmp_path):
    model, _ = _trained()
    with pytest.raises(DeltaError, match="task"):
        extract_delta(model, metadata={k: v for k, v in META.items() if k != "task"})
    # A backbone loaded from a weights file keeps its URI and can be rebuilt from the delta.
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    base = timm.create_model("test_vit", img_size=32, num_classes=3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    spec = BackboneSpec("test_vit", str(weights), {"img_size": 32})
    m = create_backbone(spec, 4)
    assert backbone_fingerprint(m) == backbone_fingerprint(base)
    apply_sparse_training(m, {"blocks.0.mlp.fc1.weight": torch.tensor([0, 5], dtype=torch.int32)})
    d = extract_delta(m, metadata=META)
    assert d.metadata["backbone_source"] == str(weights)
    rebuilt = create_model_for_delta(d)
    assert backbone_fingerprint(rebuilt) == backbone_fingerprint(base)
    assert rebuilt.get_classifier().out_features == 4


def test_apply_delta_refuses_model_under_sparse_training():
    model, _ = _trained()
    delta = extract_delta(model, metadata=META)
    with pytest.raises(DeltaError, match="sparse training"):
        apply_delta(model, delta)


def test_bf16_backbone_keeps_float32_values_and_restores_bit_exactly():
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    model = tiny_model("vit").to(bf16)
    frozen_before = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("head")}
    g = torch.Generator().manual_seed(1)
    mask = {n: torch.sort(torch.randperm(p.numel(), generator=g)[:7]).values.to(torch.int32)
            for n, p in eligible_parameters(model).items()}
    apply_sparse_training(model, mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(4, 3, 32, 32).to(bf16), torch.randint(0, 3, (4,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    model.eval()
    values = {n[: -len(".values")] + ".weight": p for n, p in model.named_parameters() if n.endswith(".values")}
    assert values.keys() == mask.keys() and all(v.dtype == torch.float32 for v in values.values())
    assert any(bool(v.detach().ne(0).any()) for v in values.values())
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen_before.items())  # frozen entries bit-identical

    delta = _saved_and_loaded(extract_delta(model, metadata=META))
    for n, v in values.items():
        assert delta.values[n].dtype == torch.float32 and torch.equal(delta.values[n], v.detach())
    base = tiny_model("vit").to(bf16).eval()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        with apply_delta(base, delta):
            params = dict(base.named_parameters())
            for n, v in values.items():  # the weight dtype receives the values cast once, as in the forward
                mod = model.get_submodule(n[: -len(".weight")])
                assert params[n].dtype == bf16 and torch.equal(params[n], mod.merged_weight())
            assert torch.equal(base(x), want)
    assert all(torch.equal(base.state_dict()[n], before[n]) for n in before)
    wide = tiny_model("vit").double()  # a float64 model's values are stored float32 too
    apply_sparse_training(wide, {"blocks.0.mlp.fc1.weight": torch.tensor([0, 5], dtype=torch.int32)})
    assert extract_delta(wide, metadata=META).values["blocks.0.mlp.fc1.weight"].dtype == torch.float32


def _saved_and_loaded(delta):
    uri = "memory://deltas/bf16.safetensors"
    save_delta(delta, uri)
    return load_delta(uri)


def test_corrupt_delta_is_refused_naming_the_file(tmp_path):
    """A delta whose value bytes were flipped, or that was cut short, is refused, never applied."""
    from helpers_core import tiny_model as _tiny

    from shpeft_core import apply_sparse_training as _apply, extract_delta as _extract, save_delta as _save

    model = _tiny("vit", num_classes=2)
    mask = {"blocks.0.mlp.fc1.weight": torch.tensor([0, 5, 9], dtype=torch.int32)}
    _apply(model, mask)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.values.copy_(torch.tensor([0.5, -0.25, 0.125]))
    path = tmp_path / "t.safetensors"
    _save(_extract(model, metadata={"alpha": "1", "estimator": "grad2", "importance_key": "", "task": "t"}), str(path))
    good = path.read_bytes()
    values_at = good.rfind(torch.tensor([0.5]).numpy().tobytes())
    assert values_at > 0
    flipped = bytearray(good)
    flipped[values_at + 3] ^= 0x40  # the exponent byte of 0.5: a huge value
    path.write_bytes(bytes(flipped))
    with pytest.raises(DeltaError, match=r"t\.safetensors: content does not match the checksum"):
        load_delta(str(path))
    path.write_bytes(good[:-7])
    with pytest.raises(DeltaError, match=r"t\.safetensors"):
        load_delta(str(path))
    path.write_bytes(good)
    assert torch.equal(load_delta(str(path)).values["blocks.0.mlp.fc1.weight"], torch.tensor([0.5, -0.25, 0.125]))
