import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shpeft_core import apply_sparse_training, head_parameter_names, count_trainable, eligible_parameters, trainable_parameters
import shpeft_core.values_grad as vg
from shpeft_core.sparse import (
    VALUES_GRAD_PATHS,
    MaskError,
    SparseDeltaConv2d,
    SparseDeltaLinear,
    remove_sparse_training,
)

from helpers_core import IMG, tiny_model


def _random_indices(numel, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(numel, generator=g)[:k]).values.to(torch.int32)


# None: autotuned; otherwise the forced path.
PATHS = [None, *VALUES_GRAD_PATHS]


@pytest.fixture(params=PATHS, ids=lambda p: p or "auto")
def grad_path(request, monkeypatch):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", request.param)
    _fresh_choices(monkeypatch)
    return request.param


LINEAR_CASES = [
    # (in, out, bias, input shape prefix, k)
    (7, 5, True, (4,), 6),
    (7, 5, False, (2, 3), 35),  # every entry selected
    (16, 9, True, (3, 4, 2), 1),
    (8, 24, True, (2, 5), 100),  # fused qkv shape [3 * dim, dim], 3-D input
    (8, 24, False, (3, 4), 7),
    (6, 10, True, (5,), 16),  # k = in + out: last k on the direct gather path
    (6, 10, True, (5,), 17),  # first k on the transposed gather path
]


@pytest.mark.parametrize("fin,fout,bias,prefix,k", LINEAR_CASES)
def test_linear_values_grad_equals_dense_grad_gathered(grad_path, fin, fout, bias, prefix, k):
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, bias=bias).double()
    idx = _random_indices(fin * fout, k, 1)
    mod = SparseDeltaLinear(base, idx)
    with torch.no_grad():
        mod.values.normal_()
    x = torch.randn(*prefix, fin, dtype=torch.float64, requires_grad=True)
    target = torch.randn(*prefix, fout, dtype=torch.float64)
    loss = ((mod(x) - target) ** 2).sum()
    gx, gv = torch.autograd.grad(loss, [x, mod.values])
    # Dense reference: the merged weight as a leaf, plain F.linear.
    w = mod.weight.detach().clone().reshape(-1)
    w[idx.long()] += mod.values.detach()
    w = w.reshape(fout, fin).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = ((F.linear(x_ref, w, mod.bias) - target) ** 2).sum()
    gx_ref, gw_ref = torch.autograd.grad(ref, [x_ref, w])
    torch.testing.assert_close(gv, gw_ref.reshape(-1)[idx.long()], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert mod.weight.grad is None
    assert bool(vg.values_grad_choices()) == (grad_path is None)  # autotuned, or forced without tuning


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, bias, hw, k)
    (3, 4, 3, 1, 0, 1, True, 7, 10),
    (3, 4, 3, 2, 1, 1, False, 8, 25),
    (2, 5, (2, 3), (1, 2), (1, 0), 1, True, 9, 30),
    (3, 6, 4, 4, 0, 1, True, 16, 12),  # patch-embedding style
    (2, 3, 3, 1, 2, 2, True, 9, 54),  # dilation, every entry selected
    (3, 8, 4, 4, 0, 1, False, 16, 300),  # patch embedding, large k
    (3, 6, 4, 4, 0, 1, True, 18, 40),  # patch embedding, input not a multiple of the patch
    (2, 4, (2, 3), (2, 3), 0, 1, True, 11, 20),  # rectangular non-overlapping patches
]


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,bias,hw,k", CONV_CASES)
def test_conv_values_grad_equals_dense_grad_gathered(grad_path, cin, cout, kernel, stride, padding, dilation, bias, hw,
                                                    k):
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias).double()
    idx = _random_indices(base.weight.numel(), k, 2)
    mod = SparseDeltaConv2d(base, idx)
    with torch.no_grad():
        mod.values.normal_()
    x = torch.randn(2, cin, hw, hw, dtype=torch.float64, requires_grad=True)
    out = mod(x)
    target = torch.randn_like(out)
    gx, gv = torch.autograd.grad(((out - target) ** 2).sum(), [x, mod.values])
    w = mod.weight.detach().clone().reshape(-1)
    w[idx.long()] += mod.values.detach()
    w = w.reshape(mod.weight.shape).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = F.conv2d(x_ref, w, mod.bias, stride, padding, dilation)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    gx_ref, gw_ref = torch.autograd.grad(((out_ref - target) ** 2).sum(), [x_ref, w])
    torch.testing.assert_close(gv, gw_ref.reshape(-1)[idx.long()], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert bool(vg.values_grad_choices()) == (grad_path is None)


@pytest.mark.parametrize("k", [5, 100])  # direct and transposed gather paths
def test_chunked_gather_matches_unchunked(monkeypatch, k):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", "gathered")
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    mod = SparseDeltaLinear(base, _random_indices(120, k, 3))
    x = torch.randn(6, 12, dtype=torch.float64)
    full = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
    monkeypatch.setattr(vg, "GATHER_CHUNK_ELEMENTS", 7)  # forces chunks of one index
    chunked = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
    torch.testing.assert_close(full, chunked, rtol=1e-12, atol=1e-12)
    w = mod.weight.detach().clone().requires_grad_(True)
    dense = torch.autograd.grad(F.linear(x, w, mod.bias).square().sum(), w)[0]
    torch.testing.assert_close(full, dense.reshape(-1)[mod.indices.long()], rtol=1e-12, atol=1e-12)


def test_forward_equals_functional_with_merged_weight():
    torch.manual_seed(0)
    lin = SparseDeltaLinear(nn.Linear(8, 6), _random_indices(48, 9, 4))
    conv = SparseDeltaConv2d(nn.Conv2d(3, 4, 3, padding=1), _random_indices(108, 9, 5))
    with torch.no_grad():
        lin.values.normal_()
        conv.values.normal_()
    x = torch.randn(5, 8)
    img = torch.randn(2, 3, 6, 6)
    wl = lin.weight.detach().clone().reshape(-1).index_add(0, lin.indices.long(), lin.values.detach()).reshape(6, 8)
    wc = conv.weight.detach().clone().reshape(-1).index_add(0, conv.indices.long(), conv.values.detach()).reshape(4, 3, 3, 3)
    assert torch.equal(lin(x), F.linear(x, wl, lin.bias))
    assert torch.equal(conv(img), F.conv2d(img, wc, conv.bias, 1, 1))
    # Untouched entries of the base weight are the merged weight's.
    assert torch.equal(torch.from_numpy(lin.to_plain().weight.detach().numpy()), wl)


def _all_eligible_mask(model, per_param=3):
    return {n: _random_indices(p.numel(), per_param, i) for i, (n, p) in enumerate(eligible_parameters(model).items())}


@pytest.mark.parametrize("kind", ["vit", "convnext", "swin"])
def test_apply_sparse_training_freezes_all_but_values_and_head(kind):
    model = tiny_model(kind)
    mask = _all_eligible_mask(model)
    names_before = set(model.state_dict())
    apply_sparse_training(model, mask)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if not n.endswith(".values")}
    expected_head = {"vit": {"head.weight", "head.bias"}}.get(kind, {"head.fc.weight", "head.fc.bias"})
    assert head == expected_head == set(head_parameter_names(model))
    assert {n[: -len(".values")] + ".weight" for n in trainable - head} == set(mask)
    head_numel = sum(p.numel() for n, p in model.named_parameters() if n in head)
    assert count_trainable(model) == 3 * len(mask) + head_numel
    # timm names survive: every original state_dict key is still there.
    assert names_before <= set(model.state_dict())
    x = torch.randn(2, 3, IMG[kind], IMG[kind])
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(p.grad is not None for p in trainable_parameters(model))


def test_frozen_entries_bit_identical_after_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = tiny_model("vit")
    mask = _all_eligible_mask(model, per_param=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("head")}
    apply_sparse_training(model, mask)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=0.1, weight_decay=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, t in before.items():
        assert torch.equal(params[n], t), n  # base weights and every other frozen tensor untouched
    merged = remove_sparse_training(model, merge=True)
    changed = 0
    for n, idx in mask.items():
        w = dict(merged.named_parameters())[n].detach().reshape(-1)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[idx.long()] = False
        assert torch.equal(w[keep], before[n].reshape(-1)[keep]), n
        changed += int((w[idx.long()] != before[n].reshape(-1)[idx.long()]).sum())
    assert changed > 0  # the selected entries did train


@pytest.mark.parametrize(
    "mask,match",
    [
        ({"blocks.0.attn.qkv.weight": torch.tensor([3, 1], dtype=torch.int32)}, "sorted"),
        ({"blocks.0.attn.qkv.weight": torch.tensor([1, 1], dtype=torch.int32)}, "sorted"),
        ({"blocks.0.attn.qkv.weight": torch.tensor([1, 2])}, "int32"),
        ({"blocks.0.attn.qkv.weight": torch.tensor([10**7], dtype=torch.int32)}, "out of range"),
        ({"blocks.9.attn.qkv.weight": torch.tensor([1], dtype=torch.int32)}, "no such parameter"),
        ({"blocks.0.norm1.weight": torch.tensor([1], dtype=torch.int32)}, "not supported"),
    ],
)
def test_bad_masks_are_refused_naming_the_parameter(mask, match):
    model = tiny_model("vit")
    with pytest.raises(MaskError, match=match) as info:
        apply_sparse_training(model, mask)
    assert next(iter(mask)) in str(info.value)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mixed_precision_backward_matches_float32(grad_path, kind):
    # bf16 autocast (run here on CPU) exercises the dtype casts of the CUDA bf16 path.
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(16, 12), torch.randn(10, 16, requires_grad=True)
    else:
        base, x = nn.Conv2d(3, 8, 4, stride=4), torch.randn(2, 3, 16, 16, requires_grad=True)
    mod = (SparseDeltaLinear if kind == "linear" else SparseDeltaConv2d)(base, _random_indices(base.weight.numel(), 20, 7))
    gx32, gv32 = torch.autograd.grad(mod(x).square().sum(), [x, mod.values])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x)
    assert out.dtype == torch.bfloat16
    gx, gv = torch.autograd.grad(out.float().square().sum(), [x, mod.values])
    assert gx.dtype == torch.float32 and gv.dtype == torch.float32
    torch.testing.assert_close(gv, gv32, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gx, gx32, rtol=5e-2, atol=5e-2)


def test_module_applied_twice_in_one_graph():
    # The frozen weight is modified and restored in place around each use; a second use in the
    # same graph must still see the right weight in both backward passes.
    torch.manual_seed(0)
    mod = SparseDeltaLinear(nn.Linear(6, 6).double(), _random_indices(36, 8, 9))
    with torch.no_grad():
        mod.values.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    base_before = mod.weight.detach().clone()
    gv = torch.autograd.grad(mod(torch.tanh(mod(x))).square().sum(), mod.values)[0]
    w = mod.merged_weight().detach().clone().requires_grad_(True)
    ref = F.linear(torch.tanh(F.linear(x, w, mod.bias)), w, mod.bias).square().sum()
    gw = torch.autograd.grad(ref, w)[0]
    torch.testing.assert_close(gv, gw.reshape(-1)[mod.indices.long()], rtol=1e-12, atol=1e-12)
    assert torch.equal(mod.weight, base_before)


def _linear_case(k=5, seed=12):
    torch.manual_seed(0)
    mod = SparseDeltaLinear(nn.Linear(12, 10).double(), _random_indices(120, k, seed))
    with torch.no_grad():
        mod.values.normal_()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    w = mod.merged_weight().detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(F.linear(x, w, mod.bias).square().sum(), w)[0].reshape(-1)[mod.indices.long()]
    return mod, x, ref


def _fresh_choices(monkeypatch, cache_dir=None):
    """A process that has chosen nothing yet, on a machine with no recorded choices."""
    import tempfile

    monkeypatch.setattr(vg, "_chosen", {})
    monkeypatch.setattr(vg, "_session", {})
    monkeypatch.setattr(vg, "_persisted", None)
    monkeypatch.setenv("SHPEFT_CACHE_DIR", str(cache_dir or tempfile.mkdtemp(prefix="shpeft-choices-")))


def test_autotuned_choices_are_kept_for_the_machine_and_restored_on_resume(monkeypatch, tmp_path):
    """The autotuned path decides the last bits of the values' gradient: a later process on the same
    machine reads the recorded winner instead of timing again, and a resumed run repeats its checkpoint's
    choices even where its own timing would pick another path."""
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", None)
    _fresh_choices(monkeypatch, tmp_path / "machine")
    monkeypatch.setattr(vg, "_autotune", lambda a, b, pat: ("sddmm", vg._grad_sddmm(a, b, pat)))
    mod, x, ref = _linear_case()
    torch.autograd.grad(mod(x).square().sum(), mod.values)
    saved = vg.export_choices()
    assert list(saved.values()) == ["sddmm"]
    # a new process on this machine: nothing in memory, the file remembers
    _fresh_choices(monkeypatch, tmp_path / "machine")
    monkeypatch.setattr(vg, "_autotune", lambda a, b, pat: pytest.fail("timed again"))
    gv = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
    torch.testing.assert_close(gv, ref, rtol=1e-12, atol=1e-12)
    # another machine whose timing prefers "dense": the checkpoint's choice wins
    _fresh_choices(monkeypatch, tmp_path / "other")
    monkeypatch.setattr(vg, "_autotune", lambda a, b, pat: ("dense", vg._grad_dense(a, b, pat)))
    vg.import_choices(saved)
    used = []
    monkeypatch.setattr(vg, "_PATH_FNS", {n: (lambda f, n: lambda *a: used.append(n) or f(*a))(f, n)
                                          for n, f in vg._PATH_FNS.items()})
    torch.autograd.grad(mod(x).square().sum(), mod.values)
    assert used == ["sddmm"]


@pytest.mark.parametrize("winner", VALUES_GRAD_PATHS)
def test_autotune_keeps_the_fastest_path_and_its_gradient_is_exact(monkeypatch, winner):
    # A fake clock in which `winner` is the cheapest: every path must be able to win, and the
    # gradient must be exact on the tuning call and on the calls that reuse the choice.
    clock, calls = [0.0], []
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", None)
    _fresh_choices(monkeypatch)
    monkeypatch.setattr(vg.time, "perf_counter", lambda: clock[0])

    def timed(name, fn):
        def run(a, b, pat):
            calls.append(name)
            clock[0] += 1.0 if name == winner else 5.0
            return fn(a, b, pat)
        return run

    monkeypatch.setattr(vg, "_PATH_FNS", {n: timed(n, f) for n, f in vg._PATH_FNS.items()})
    mod, x, ref = _linear_case()
    for _ in range(2):
        gv = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
        torch.testing.assert_close(gv, ref, rtol=1e-12, atol=1e-12)
    assert calls[:-1] == list(VALUES_GRAD_PATHS) * vg.AUTOTUNE_REPEATS  # tuning call: every candidate
    assert calls[-1] == winner  # the next call reuses the choice
    assert list(vg.values_grad_choices().values()) == [winner]


def test_compact_is_no_candidate_when_every_row_and_column_is_selected():
    every = vg.sparse_pattern(torch.tensor([0, 4, 8]), (3, 3))  # the diagonal: all rows, all columns
    some = vg.sparse_pattern(torch.tensor([0, 4]), (3, 3))
    assert "compact" not in vg._candidates(every) and "dense" in vg._candidates(every)
    assert vg._candidates(some) == list(VALUES_GRAD_PATHS)


def test_forced_unknown_path_is_refused(monkeypatch):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", "magic")
    mod, x, _ = _linear_case()
    with pytest.raises(ValueError, match="magic"):
        torch.autograd.grad(mod(x).square().sum(), mod.values)


def test_paths_agree_in_float32_on_a_vit_sized_layer(monkeypatch):
    # float32 sums in another order: equal to rounding, on a layer as wide as a ViT-S MLP.
    torch.manual_seed(0)
    mod = SparseDeltaLinear(nn.Linear(384, 1536), _random_indices(384 * 1536, 3000, 13))
    x = torch.randn(2, 50, 384)
    ref = None
    for path in VALUES_GRAD_PATHS:
        monkeypatch.setattr(vg, "VALUES_GRAD_PATH", path)
        gv = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
        ref = gv if ref is None else ref
        torch.testing.assert_close(gv, ref, rtol=1e-4, atol=1e-4)


def test_values_are_a_float32_master_copy_for_a_bf16_weight():
    # Steps far below the bf16 resolution of the weight accumulate in the values, reach the
    # merged weight once they add up, and never touch the frozen weight.
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    with torch.no_grad():  # |w| in [0.25, 0.5): bf16 spacing 2^-9, so a 1e-5 step rounds away
        base.weight.copy_((torch.rand(8, 16) * 0.25 + 0.25) * torch.sign(torch.randn(8, 16)))
    mod = SparseDeltaLinear(base.to(torch.bfloat16), _random_indices(128, 12, 11))
    assert mod.weight.dtype == torch.bfloat16 and mod.values.dtype == torch.float32
    w0 = mod.weight.detach().clone()
    x, t = torch.randn(4, 16).to(torch.bfloat16), torch.randn(4, 8).to(torch.bfloat16)
    # d/dvalues of (out * t).sum() is (t^T x) at the indices whatever the weight: a fixed step.
    g = (t.float().t() @ x.float()).reshape(-1)[mod.indices.long()]
    lr, steps = 1e-5 / float(g.abs().max()), 1000
    step = (lr * g).to(torch.bfloat16)
    assert torch.equal(w0.reshape(-1)[mod.indices.long()] - step, w0.reshape(-1)[mod.indices.long()])
    opt = torch.optim.SGD([mod.values], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (mod(x) * t).sum().backward()
        assert mod.values.grad.dtype == torch.float32
        opt.step()
    torch.testing.assert_close(mod.values.detach(), -steps * lr * g, rtol=1e-3, atol=1e-9)
    stalled = torch.zeros(12, dtype=torch.bfloat16)  # what bf16 values would have kept
    for _ in range(steps):
        stalled -= step
    assert not torch.allclose(stalled.float(), -steps * lr * g, rtol=0.1)
    assert torch.equal(mod.weight, w0)  # frozen entries (and the base at the indices) untouched
    merged = mod.merged_weight().reshape(-1)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, w0.reshape(-1).index_add(0, mod.indices.long(), mod.values.detach().to(torch.bfloat16)))
    assert not torch.equal(merged, w0.reshape(-1))  # the accumulated updates became visible
    assert torch.equal(mod(x), F.linear(x, merged.view_as(w0), mod.bias))


def test_model_casts_keep_values_float32_and_float64_stays():
    mod = SparseDeltaLinear(nn.Linear(6, 4), _random_indices(24, 5, 14))
    with torch.no_grad():
        mod.values.copy_(torch.tensor([1e-4, 2e-4, 3.00001, -1.0, 0.5]))
    master = mod.values.detach().clone()
    mod.bfloat16()
    assert mod.weight.dtype == torch.bfloat16 and mod.values.dtype == torch.float32
    assert torch.equal(mod.values.detach(), master)  # not rounded through bf16 on the way
    assert SparseDeltaLinear(nn.Linear(6, 4).double(), _random_indices(24, 5, 14)).values.dtype == torch.float64


def test_autotune_skips_a_path_that_cannot_run_here(monkeypatch):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", None)
    monkeypatch.setattr(vg, "_chosen", {})

    def no_kernel(a, b, pat):
        raise NotImplementedError("sampled_addmm: no kernel for this backend")

    monkeypatch.setattr(vg, "_PATH_FNS", {**vg._PATH_FNS, "sddmm": no_kernel})
    mod, x, ref = _linear_case()
    gv = torch.autograd.grad(mod(x).square().sum(), mod.values)[0]
    torch.testing.assert_close(gv, ref, rtol=1e-12, atol=1e-12)
    chosen = list(vg.values_grad_choices().values())
    assert len(chosen) == 1 and chosen[0] in set(VALUES_GRAD_PATHS) - {"sddmm"}
