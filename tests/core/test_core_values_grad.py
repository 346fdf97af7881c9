"""The values' gradient from reduced-precision operands: every path accumulates bf16 / fp16 products in
float32, checked against float64 sums of the same rounded numbers (a bf16 result would be ~1e-3 off)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shpeft_core.values_grad as vg
from shpeft_core.sparse import SparseDeltaConv2d, SparseDeltaLinear


def _case(n=512, rows=96, cols=288, k=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rows, generator=g)
    b = torch.randn(n, cols, generator=g)
    flat = torch.randperm(rows * cols, generator=g)[:k].sort().values
    return a, b, vg.sparse_pattern(flat, (rows, cols))


def _reference(a, b, pat):
    return (a.double().t() @ b.double()).view(-1)[pat.flat_idx]


def _rel(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("path", vg.VALUES_GRAD_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_path_accumulates_low_precision_products_in_float32(monkeypatch, path, dtype):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", path)
    a, b, pat = _case()
    a, b = a.to(dtype), b.to(dtype)
    got = vg.values_grad(a, b, pat)
    assert got.dtype == torch.float32
    assert _rel(got, _reference(a, b, pat)) < 1e-6
    # what a bf16-output product would give: far outside that bound
    rounded = (a.t() @ b).view(-1)[pat.flat_idx]
    assert dtype == torch.float16 or _rel(rounded, _reference(a, b, pat)) > 1e-4


@pytest.mark.parametrize("path", vg.VALUES_GRAD_PATHS)
def test_a_float32_input_is_rounded_as_the_autocast_matmul_rounded_it(monkeypatch, path):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", path)
    a, b, pat = _case(k=2000, seed=1)  # k above both widths: the transposed gather
    a = a.bfloat16()
    got = vg.values_grad(a, b, pat)
    assert _rel(got, _reference(a, b.bfloat16(), pat)) < 1e-6


def test_float32_and_float64_inputs_are_unchanged(monkeypatch):
    a, b, pat = _case()
    for path in vg.VALUES_GRAD_PATHS:
        monkeypatch.setattr(vg, "VALUES_GRAD_PATH", path)
        assert vg.values_grad(a, b, pat).dtype == torch.float32
        got = vg.values_grad(a.double(), b.double(), pat)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, _reference(a, b, pat), rtol=1e-12, atol=1e-12)


def test_devices_with_a_float32_output_gemm_get_low_precision_operands(monkeypatch):
    """On CUDA (no GPU here) torch.mm(bf16, bf16, out_dtype=float32) runs without upcasting; the call
    itself is checked on meta tensors, whose kernel follows the CUDA one's dtype rules."""
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(vg, "OUT_DTYPE_DEVICES", ("meta",))
    monkeypatch.setattr(vg.torch, "mm", lambda *a, **k: calls.append((a[0].dtype, k)) or real_mm(*a, **k))
    x = torch.empty(64, 8, dtype=torch.bfloat16, device="meta")
    y = torch.empty(64, 12, dtype=torch.bfloat16, device="meta")
    out = vg._mm_acc(x.t(), y)
    assert out.dtype == torch.float32 and out.shape == (8, 12)
    assert calls == [(torch.bfloat16, {"out_dtype": torch.float32})]
    calls.clear()
    vg._mm_acc(torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16))  # CPU
    assert calls == [(torch.float32, {})]  # upcast operands: no bf16-in, float32-out GEMM on this device


def _capture_grad(out, store):
    out.register_hook(lambda g: store.append(g))
    return out


@pytest.mark.parametrize("path", [None, *vg.VALUES_GRAD_PATHS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layers_under_bf16_autocast_match_float64_of_the_operands_they_used(monkeypatch, path, kind, tmp_path):
    monkeypatch.setattr(vg, "VALUES_GRAD_PATH", path)
    monkeypatch.setattr(vg, "_chosen", {})
    monkeypatch.setattr(vg, "_session", {})
    monkeypatch.setattr(vg, "_persisted", None)
    monkeypatch.setenv("SHPEFT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(48, 96), torch.randn(6, 20, 48)
    else:
        base, x = nn.Conv2d(3, 32, 4, stride=4), torch.randn(4, 3, 32, 32)
    idx = torch.randperm(base.weight.numel())[:200].sort().values.to(torch.int32)
    mod = SparseDeltaLinear(base, idx) if kind == "linear" else SparseDeltaConv2d(base, idx)
    with torch.no_grad():
        mod.values.normal_(0, 0.05)
    saved, grads = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _capture_grad(mod(x), grads)
    assert out.dtype == torch.bfloat16
    assert saved == [torch.bfloat16, torch.float32]  # the input kept once, in bf16 (values: float32 master)
    gv = torch.autograd.grad(out.float().square().sum(), mod.values)[0]
    assert gv.dtype == torch.float32
    go = grads[0].double()
    xb = x.bfloat16().double()  # the operand the bf16 matmul multiplied
    if kind == "linear":
        dense = go.reshape(-1, 96).t() @ xb.reshape(-1, 48)
    else:
        dense = torch.nn.grad.conv2d_weight(xb, base.weight.shape, go, stride=4)
    ref = dense.reshape(-1)[idx.long()]
    assert _rel(gv, ref) < 1e-5
