"""The mixed-task forward against float64 references: each sample's logits equal the model with that
sample's delta applied alone, for ViT, Swin, ConvNeXt and DeiT-distilled backbones, 1, 2 and 8 tasks per
batch, deltas that share weights, both Linear correction kernels."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shpeft_core.mixed as mx
from shpeft_core import apply_delta, apply_sparse_training, eligible_parameters, extract_delta, head_parameter_names
from shpeft_core.mixed import MixedError, MixedTaskModel

from helpers_core import IMG, TINY, tiny_model

META = {"alpha": "0.5", "estimator": "grad2", "importance_key": "imp", "task": "t"}
KINDS = ["vit", "swin", "convnext", "deit_distilled"]


@pytest.fixture(params=[None, *mx.MIXED_PATHS], ids=lambda p: p or "auto")
def mixed_path(request, monkeypatch):
    monkeypatch.setattr(mx, "MIXED_PATH", request.param)
    return request.param


def _sorted_unique(t: torch.Tensor) -> torch.Tensor:
    return torch.unique(t).to(torch.int32)


def make_deltas(kind: str, n_tasks: int, seed: int = 0, per_layer: float = 0.03):
    """n_tasks deltas on the same tiny backbone: every supported layer (not only the default rules),
    a third of each layer's entries shared by all tasks, heads of 2..6 classes, values of the
    weights' own scale (so the corrections change the logits)."""
    g = torch.Generator().manual_seed(seed)
    probe = tiny_model(kind)
    params = eligible_parameters(probe, rules=[r".*"])
    shared = {n: torch.randperm(p.numel(), generator=g)[: max(1, int(p.numel() * per_layer / 3))]
              for n, p in params.items()}
    deltas = []
    for t in range(n_tasks):
        num_classes = 2 + (t * 3) % 5
        model = tiny_model(kind, num_classes)
        mask = {}
        for n, p in params.items():
            own = torch.randperm(p.numel(), generator=g)[: max(1, int(p.numel() * per_layer))]
            mask[n] = _sorted_unique(torch.cat([shared[n], own]))
        apply_sparse_training(model, mask)
        heads = set(head_parameter_names(model))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".values"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                elif name in heads:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        deltas.append(extract_delta(model, metadata={**META, "task": f"t{t}"}))
    return deltas


def reference_logits(kind: str, delta, x: torch.Tensor) -> torch.Tensor:
    """float64: a fresh backbone with the delta applied in place (apply_delta), on float64 inputs."""
    ref = tiny_model(kind).double().eval()
    with torch.no_grad(), apply_delta(ref, delta, check_fingerprint=False):
        return ref(x.double())


def _assignment(n_tasks: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tasks, (batch,), generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_tasks", [1, 2, 8])
def test_each_sample_equals_its_delta_applied_alone(kind, n_tasks, mixed_path):
    deltas = make_deltas(kind, n_tasks, seed=n_tasks)
    batch = 10
    x = torch.randn(batch, 3, IMG[kind], IMG[kind], generator=torch.Generator().manual_seed(1))
    tid = _assignment(n_tasks, batch, seed=2)
    base = tiny_model(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    mixed = MixedTaskModel(base)
    prepared = [mixed.prepare(d) for d in deltas]
    got = mixed(x, prepared, tid)
    for t, d in enumerate(deltas):
        rows = (tid == t).nonzero().flatten()
        assert got[t].shape == (rows.numel(), d.num_classes)
        if rows.numel():
            ref = reference_logits(kind, d, x[rows])
            torch.testing.assert_close(got[t].double(), ref, atol=1e-5, rtol=0)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written
    # the sparse corrections matter: the same heads on the plain backbone give other logits
    t = int(tid[0])
    head_only = _delta_with(deltas[t], indices={}, values={})
    assert (reference_logits(kind, head_only, x[tid == t]) - got[t].double()).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_float64_model_is_exact_to_float64_rounding(kind, mixed_path):
    deltas = make_deltas(kind, 3, seed=5)
    x = torch.randn(6, 3, IMG[kind], IMG[kind], dtype=torch.float64)
    tid = torch.tensor([2, 0, 1, 1, 2, 0])
    mixed = MixedTaskModel(tiny_model(kind).double())
    got = mixed(x, [mixed.prepare(d, check_fingerprint=False) for d in deltas], tid)
    for t, d in enumerate(deltas):
        torch.testing.assert_close(got[t], reference_logits(kind, d, x[tid == t]), atol=1e-10, rtol=1e-10)


def test_hooks_are_inert_outside_a_mixed_batch_and_close_removes_them():
    deltas = make_deltas("vit", 2)
    model = tiny_model("vit", 2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    mixed = MixedTaskModel(model)
    prepared = [mixed.prepare(d) for d in deltas]
    mixed(x, prepared, [0, 1, 0])
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # no plan: the hooks return the layer's own output
        with apply_delta(model, deltas[1]):  # the in-place path still works on the hooked model
            torch.testing.assert_close(model(x).double(), reference_logits("vit", deltas[1], x), atol=1e-5, rtol=0)
    mixed.close()
    assert not any(m._forward_hooks for m in model.modules())


def test_concurrent_batches_on_one_model_match_sequential_runs():
    deltas = make_deltas("vit", 4, seed=3)
    mixed = MixedTaskModel(tiny_model("vit"))
    prepared = [mixed.prepare(d) for d in deltas]
    g = torch.Generator().manual_seed(7)
    jobs = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(12)]
    want = [mixed(x, prepared, t) for x, t in jobs]
    start = threading.Barrier(4)

    def run(job):
        start.wait() if job[2] < 4 else None  # the first four start together
        return mixed(job[0], prepared, job[1])

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, [(x, t, i) for i, (x, t) in enumerate(jobs)]))
    for w, g_ in zip(want, got):
        for a, b in zip(w, g_):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", mx.MIXED_PATHS)
@pytest.mark.parametrize("fin,fout,k,tokens", [(7, 5, 6, 9), (16, 9, 144, 4), (8, 24, 40, 33), (6, 10, 1, 2)])
def test_linear_correction_equals_dense_delta(path, fin, fout, k, tokens, monkeypatch):
    monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 7)  # several token chunks on the gather path
    g = torch.Generator().manual_seed(k)
    flat = torch.randperm(fin * fout, generator=g)[:k].sort().values
    rows, cols = flat // fin, flat % fin
    v = torch.randn(k, dtype=torch.float64, generator=g)
    ld = mx.LayerDelta(rows, cols, v, mx._csr(rows, cols, v, (fout, fin)) if path == "csr" else None)
    x = torch.randn(tokens, fin, dtype=torch.float64, generator=g)
    y0 = torch.randn(tokens, fout, dtype=torch.float64, generator=g)
    y = y0.clone()
    mx._linear_correction(x, y, ld)
    dense = torch.zeros(fout * fin, dtype=torch.float64).index_put_((flat,), v).view(fout, fin)
    torch.testing.assert_close(y, y0 + x @ dense.t(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,hw,k", [
    (3, 4, 3, 1, 0, 1, 7, 10),
    (3, 4, 3, 2, 1, 1, 8, 25),
    (2, 5, (2, 3), (1, 2), (1, 0), 1, 9, 30),
    (3, 6, 4, 4, 0, 1, 16, 12),  # patch embedding
    (2, 3, 3, 1, 2, 2, 9, 54),  # dilation, every entry
    (3, 6, 4, 4, 0, 1, 18, 40),  # input not a multiple of the patch
])
def test_conv_correction_equals_dense_delta(cin, cout, kernel, stride, padding, dilation, hw, k, monkeypatch):
    monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 50)  # several entry chunks
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation).double()
    g = torch.Generator().manual_seed(k)
    flat = torch.randperm(conv.weight.numel(), generator=g)[:k].sort().values
    row_len = conv.weight[0].numel()
    v = torch.randn(k, dtype=torch.float64, generator=g)
    ld = mx.LayerDelta(flat // row_len, flat % row_len, v)
    x = torch.randn(3, cin, hw, hw, dtype=torch.float64, generator=g)
    with torch.no_grad():
        y = conv(x)
        dense = conv.weight.detach().clone().view(-1).index_add(0, flat, v).view_as(conv.weight)
        want = F.conv2d(x, dense, conv.bias, conv.stride, conv.padding, conv.dilation)
    mx._conv_correction(conv, x, y, ld)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)
    mx._conv_correction(conv, x, y := conv(x).detach(), ld)  # second call: the cached gather index
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


def test_path_rule_follows_entries_per_layer():
    assert mx.linear_path(10, 384, 1152, torch.float32) == "gather"
    assert mx.linear_path(384 + 577, 384, 1152, torch.float32) == "csr"
    assert mx.linear_path(10_000, 384, 1152, torch.bfloat16) == "gather"  # no CSR kernels for bf16


# ---------------------------------------------------------------- refused deltas and batches


def _delta_with(delta, **changes):
    d = copy.copy(delta)
    for k, v in changes.items():
        setattr(d, k, v)
    return d


def test_bad_deltas_are_refused_naming_the_tensor():
    (delta,) = make_deltas("vit", 1)
    mixed = MixedTaskModel(tiny_model("vit"))
    name = next(iter(delta.indices))
    unsorted = dict(delta.indices)
    unsorted[name] = delta.indices[name].flip(0)
    with pytest.raises(MixedError, match=f"{name}.indices must be non-negative, sorted"):
        mixed.prepare(_delta_with(delta, indices=unsorted), where="t.safetensors")
    norm = _delta_with(delta, indices={"norm.weight": torch.tensor([1], dtype=torch.int32)},
                       values={"norm.weight": torch.ones(1)})
    with pytest.raises(MixedError, match="'norm.weight' is not a weight a delta may change"):
        mixed.prepare(norm)
    out_of_range = dict(delta.indices)
    out_of_range[name] = torch.tensor([10**7], dtype=torch.int32)
    values = dict(delta.values)
    values[name] = torch.ones(1)
    with pytest.raises(MixedError, match="t.safetensors.*out of range"):
        mixed.prepare(_delta_with(delta, indices=out_of_range, values=values), where="t.safetensors")
    head = dict(delta.head)
    head["head.weight"] = head["head.weight"][:, :-1]
    with pytest.raises(MixedError, match="head tensor 'head.weight'.*shape"):
        mixed.prepare(_delta_with(delta, head=head))
    head = {**delta.head, "fc_norm.weight": torch.ones(3)}
    with pytest.raises(MixedError, match="fc_norm.weight"):
        mixed.prepare(_delta_with(delta, head=head))
    other = _delta_with(delta, metadata={**delta.metadata, "backbone_fingerprint": "0" * 64})
    with pytest.raises(MixedError, match="fingerprint"):
        mixed.prepare(other)
    mixed.prepare(other, check_fingerprint=False)  # the caller checked the base already


def test_bad_batches_are_refused():
    deltas = make_deltas("vit", 2)
    model = tiny_model("vit")
    mixed = MixedTaskModel(model)
    prepared = [mixed.prepare(d) for d in deltas]
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(MixedError, match=r"in \[0, 2\)"):
        mixed(x, prepared, [0, 2, 1])
    with pytest.raises(MixedError, match="2 entries for a batch of 3"):
        mixed(x, prepared, [0, 1])
    # a touched layer called through its weight instead of as a module: refused, not silently skipped
    mlp = model.blocks[0].mlp
    mlp.forward = lambda h: mlp.fc2(mlp.act(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)))
    with pytest.raises(MixedError, match="blocks.0.mlp.fc1"):
        mixed(x, prepared, [0, 1, 0])
    # a layer whose leading dimension mixes samples (tokens first): refused
    mlp.forward = lambda h: mlp.fc2(mlp.act(mlp.fc1(h.transpose(0, 1)))).transpose(0, 1)
    with pytest.raises(MixedError, match="not a multiple of the batch"):
        mixed(torch.randn(2, 3, 32, 32), prepared, [0, 1])


def _dense_delta(spec, dense_names, seed: int = 0):
    """A format-2 delta: sparse entries in two layers plus whole trained tensors (``dense_names``)."""
    from shpeft_core.backbone import create_backbone

    g = torch.Generator().manual_seed(seed)
    model = create_backbone(spec, 3)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in dense_names}
    mask = {n: _sorted_unique(torch.randperm(p.numel(), generator=g)[:20])
            for n, p in eligible_parameters(model).items() if n.endswith(("qkv.weight", "fc2.weight"))}
    apply_sparse_training(model, mask)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".values") or name in dense_names or name in set(head_parameter_names(model)):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return extract_delta(model, metadata=META, dense=before)


def test_dense_biases_and_layer_scales_of_a_format_2_delta_equal_the_delta_applied_alone(mixed_path):
    from shpeft_core.backbone import BackboneSpec, create_backbone

    spec = BackboneSpec("test_vit", None, {"img_size": 32, "init_values": 0.1})  # LayerScale in every block
    dense = ["blocks.0.attn.qkv.bias", "blocks.1.mlp.fc1.bias", "blocks.0.ls1.gamma", "blocks.2.ls2.gamma"]
    deltas = [_dense_delta(spec, dense, seed=1), _dense_delta(spec, dense[:1], seed=2)]
    assert all(d.dense for d in deltas) and deltas[0].metadata["shpeft_format"] == "2"
    model = create_backbone(spec, 3).eval()
    mixed = MixedTaskModel(model)
    prepared = [mixed.prepare(d) for d in deltas]
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task_index = torch.tensor([0, 1, 0, 1, 1, 0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = mixed(x, prepared, task_index)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing written
    for t, d in enumerate(deltas):
        ref = create_backbone(spec, 3).double().eval()
        with torch.no_grad(), apply_delta(ref, d, check_fingerprint=False):
            want = ref(x[task_index == t].double())
        torch.testing.assert_close(got[t].double(), want, atol=1e-5, rtol=0)
        without = create_backbone(spec, 3).double().eval()
        with torch.no_grad(), apply_delta(without, _delta_with(d, dense={}, metadata={**d.metadata, "shpeft_format": "1"}),
                                          check_fingerprint=False):
            assert not torch.allclose(without(x[task_index == t].double()), want, atol=1e-4)  # the dense part counts


def test_a_dense_tensor_the_mixed_forward_cannot_add_is_refused_naming_it():
    from shpeft_core.backbone import create_backbone

    spec = TINY["swin"]
    table = next(n for n, _ in create_backbone(spec, 3).named_parameters() if "relative_position_bias_table" in n)
    delta = _dense_delta(spec, [table])
    with pytest.raises(MixedError, match=f"dense tensor {table} is not a Linear / Conv2d bias or a layer-scale gamma"):
        MixedTaskModel(create_backbone(spec, 3)).prepare(delta)
