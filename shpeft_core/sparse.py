"""Sparse-delta training: a frozen weight plus trainable values at k fixed entries.

The forward merges the weight once (``W + scatter(values)``) and calls F.linear / F.conv2d, so
it runs at dense speed. The backward returns the input gradient through the merged weight and
the values' gradient at the k entries only, ``gv[j] = sum_n grad_out[n, row_j] * x[n, col_j]``,
formed by the autotuned exact paths of ``values_grad`` (its docstring: paths, per-machine choices,
precision).

``values`` are a float32 master copy whatever the weight's dtype (float64 stays float64): a bf16
backbone would round small updates away. They are cast to the weight's dtype only when merged.
Under autocast the layer casts its input to the autocast dtype once, as the matmul would: the
forward uses that copy and the backward reads it (half the bytes saved, no cast in the backward),
and the values' gradient is formed from the bf16 tensors with float32 accumulation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import head_parameter_names, unwrap
from .eligibility import is_supported_module
from .values_grad import (
    VALUES_GRAD_PATHS,
    SparsePattern,
    export_choices,
    import_choices,
    sparse_pattern,
    values_grad,
    values_grad_choices,
)

__all__ = [
    "SparseDeltaMixin",
    "SparseDeltaLinear",
    "SparseDeltaConv2d",
    "sparse_linear",
    "sparse_conv2d",
    "apply_sparse_training",
    "remove_sparse_training",
    "sparse_modules",
    "trainable_parameters",
    "count_trainable",
    "validate_indices",
    "MaskError",
    "SparsePattern",
    "sparse_pattern",
    "VALUES_GRAD_PATHS",
    "values_grad_choices",
    "export_choices",
    "import_choices",
]


class MaskError(ValueError):
    """A mask does not fit the model (unknown parameter, bad indices)."""


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(weight: Tensor, flat_idx: Tensor, values: Tensor) -> Tensor:
    flat = weight.detach().reshape(-1).index_add(0, flat_idx, values.detach().to(weight.dtype))
    return flat.view_as(weight)


@contextmanager
def _merged_in_place(weight: Tensor, flat_idx: Tensor, values: Tensor):
    """The frozen weight with the values added at the k entries, for the duration of the block.

    Adds in place and restores the saved originals afterwards (O(k) instead of copying the whole
    weight twice per step); the entries are the same float sums as in ``_merge``, so results are
    bit-identical. Only for weights no other autograd node has saved (frozen, owned here).
    """
    w = weight.detach()
    if not w.is_contiguous():
        yield _merge(weight, flat_idx, values)
        return
    flat = w.view(-1)
    orig = flat.index_select(0, flat_idx)
    flat.index_add_(0, flat_idx, values.detach().to(flat.dtype))
    try:
        yield w
    finally:
        flat.index_copy_(0, flat_idx, orig)


def _autocast_input(x: Tensor) -> Tensor:
    """``x`` in the dtype autocast runs this layer in (the cast the matmul would make), else as it is."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern, values):
        xc = _autocast_input(x)
        with _merged_in_place(weight, pattern.flat_idx, values) as w:
            out = F.linear(xc, w, bias)
        # The frozen weight is kept by reference, not saved: it is modified (and restored) in place.
        ctx.weight, ctx.pattern, ctx.x_dtype = weight, pattern, x.dtype
        ctx.save_for_backward(xc, values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        weight, pat = ctx.weight, ctx.pattern
        need_x, _, need_b, _, need_v = ctx.needs_input_grad
        gx = gb = gv = None
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            with torch.no_grad(), _merged_in_place(weight, pat.flat_idx, values) as w:
                gx = (grad_out @ w.to(grad_out.dtype)).to(ctx.x_dtype)
        if need_b:
            gb = go2.sum(0).to(weight.dtype)
        if need_v:
            gv = values_grad(go2, x.reshape(-1, x.shape[-1]), pat).to(values.dtype)
        return gx, None, gb, None, gv


def _patches(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """Input patches as [B*L, in*kh*kw] (rows in (batch, out-y, out-x) order, columns as the weight's)."""
    kh, kw = kernel
    if tuple(stride) == (kh, kw) and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1):
        # Non-overlapping patches (ViT / Swin patch embedding, ConvNeXt stem): one strided copy,
        # several times cheaper than F.unfold followed by a transpose.
        b, c, h, w = x.shape
        ho, wo = h // kh, w // kw
        x = x[:, :, : ho * kh, : wo * kw].reshape(b, c, ho, kh, wo, kw)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, c * kh * kw)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    b, ckk, length = cols.shape
    # [B*L, features] view of a [features, B*L] tensor: the transposed gather path is then free.
    return cols.permute(1, 0, 2).reshape(ckk, b * length).t()


class _SparseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern, values, stride, padding, dilation):
        xc = _autocast_input(x)
        with _merged_in_place(weight, pattern.flat_idx, values) as w:
            out = F.conv2d(xc, w, bias, stride, padding, dilation)
        ctx.weight, ctx.pattern, ctx.x_dtype = weight, pattern, x.dtype
        ctx.save_for_backward(xc, values)
        ctx.conf = (stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        weight, pat = ctx.weight, ctx.pattern
        stride, padding, dilation = ctx.conf
        need_x, _, need_b, _, need_v = ctx.needs_input_grad[:5]
        gx = gb = gv = None
        if need_x:
            with torch.no_grad(), _merged_in_place(weight, pat.flat_idx, values) as w:
                gx = torch.nn.grad.conv2d_input(x.shape, w.to(grad_out.dtype), grad_out, stride, padding,
                                                dilation).to(ctx.x_dtype)
        if need_b:
            gb = grad_out.sum((0, 2, 3)).to(weight.dtype)
        if need_v:
            # im2col view: weight as [out, in*kh*kw], input patches as [B*L, in*kh*kw].
            p2 = _patches(x, weight.shape[-2:], stride, padding, dilation)
            b, length = grad_out.shape[0], grad_out.shape[2] * grad_out.shape[3]
            # [B*L, out] view of an [out, B*L] tensor: the rows SDDMM and the gathers read.
            g2 = grad_out.reshape(b, grad_out.shape[1], length).permute(1, 0, 2).reshape(-1, b * length).t()
            gv = values_grad(g2, p2, pat).to(values.dtype)
        return gx, None, gb, None, gv, None, None, None


def sparse_linear(x, weight, bias, pattern: SparsePattern, values) -> Tensor:
    return _SparseLinearFn.apply(x, weight, bias, pattern, values)


def sparse_conv2d(x, weight, bias, pattern: SparsePattern, values, stride, padding, dilation) -> Tensor:
    return _SparseConv2dFn.apply(x, weight, bias, pattern, values, stride, padding, dilation)


def validate_indices(name: str, indices: Tensor, numel: int) -> None:
    if not isinstance(indices, Tensor) or indices.dtype != torch.int32 or indices.dim() != 1:
        raise MaskError(f"{name}: indices must be a 1-D int32 tensor")
    if indices.numel() == 0:
        raise MaskError(f"{name}: empty index set")
    i64 = indices.to(torch.int64)
    if int(i64.min()) < 0 or int(i64.max()) >= numel:
        raise MaskError(f"{name}: indices out of range [0, {numel})")
    if indices.numel() > 1 and not bool((i64[1:] > i64[:-1]).all()):
        raise MaskError(f"{name}: indices must be sorted and unique")


class SparseDeltaMixin(nn.Module):
    """Frozen ``weight`` (timm name kept), int32 ``indices`` buffer, trainable ``values``."""

    # State-dict entries this module adds to the layer it replaces; backbone and eligibility code
    # recognise sparse-delta modules by this attribute, without importing this module.
    SPARSE_STATE_KEYS = ("values", "indices")

    def _init_sparse(self, base: nn.Module, indices: Tensor) -> None:
        weight = base.weight
        weight.requires_grad_(False)
        self.weight = weight
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.bias = base.bias
        idx = indices.to(device=weight.device, dtype=torch.int32).contiguous()
        self.register_buffer("indices", idx)
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=_master_dtype(weight.dtype), device=weight.device))
        self._set_pattern()

    def _set_pattern(self) -> None:
        # Derived index forms: non-persistent buffers, so they follow .to(device) with the module.
        pat = sparse_pattern(self.indices, (self.weight.shape[0], self.weight[0].numel()))
        for name in SparsePattern._fields[1:]:
            if name in self._buffers:
                self._buffers[name] = getattr(pat, name)
            else:
                self.register_buffer(name, getattr(pat, name), persistent=False)

    def _pattern(self) -> SparsePattern:
        shape = (self.weight.shape[0], self.weight[0].numel())
        return SparsePattern(shape, *(self._buffers[n] for n in SparsePattern._fields[1:]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_pattern()

    def _apply(self, fn, recurse=True):
        # Whole-model casts (model.bfloat16()) must not demote the float32 master values.
        master = self.values.data
        out = super()._apply(fn, recurse)
        want = _master_dtype(self.values.dtype)
        if self.values.dtype != want:
            self.values.data = master.to(device=self.values.device, dtype=want)
            if self.values.grad is not None:
                self.values.grad = self.values.grad.to(want)
        return out

    def merged_weight(self) -> Tensor:
        return _merge(self.weight, self.flat_idx, self.values)

    def _fill_plain(self, out: nn.Module, merge: bool) -> nn.Module:
        """Copy the (merged) weight and the bias into a plain layer of the same shape."""
        with torch.no_grad():
            out.weight.copy_(self.merged_weight() if merge else self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class SparseDeltaLinear(SparseDeltaMixin):
    def __init__(self, base: nn.Linear, indices: Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_sparse(base, indices)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight, self.bias, self._pattern(), self.values)

    def to_plain(self, merge: bool = True) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        return self._fill_plain(out, merge)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.values.numel()}"


class SparseDeltaConv2d(SparseDeltaMixin):
    def __init__(self, base: nn.Conv2d, indices: Tensor):
        super().__init__()
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self._init_sparse(base, indices)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_conv2d(x, self.weight, self.bias, self._pattern(), self.values, self.stride, self.padding,
                             self.dilation)

    def to_plain(self, merge: bool = True) -> nn.Conv2d:
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        return self._fill_plain(out, merge)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, k={self.values.numel()}")


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def sparse_modules(model: nn.Module) -> dict[str, SparseDeltaMixin]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, SparseDeltaMixin)}


def apply_sparse_training(model: nn.Module, mask: dict[str, Tensor]) -> nn.Module:
    """Swap every masked Linear/Conv2d for a sparse-delta module, in place; freeze all but values + head.

    ``mask`` maps weight names ("blocks.0.attn.qkv.weight") to sorted flat row-major int32 indices.
    """
    m = unwrap(model)
    params = dict(m.named_parameters())
    plan = []
    for name, idx in mask.items():
        if not name.endswith(".weight"):
            raise MaskError(f"{name}: masks address '.weight' parameters")
        if name not in params:
            raise MaskError(f"{name}: no such parameter in the model")
        path = name[: -len(".weight")]
        mod = m.get_submodule(path)
        if isinstance(mod, SparseDeltaMixin):
            raise MaskError(f"{name}: already under sparse training")
        if not is_supported_module(mod):
            raise MaskError(f"{name}: {type(mod).__name__} is not supported (Linear or groups=1 Conv2d)")
        validate_indices(name, idx, mod.weight.numel())
        plan.append((path, mod, idx))
    for p in m.parameters():
        p.requires_grad_(False)
    for path, mod, idx in plan:
        cls = SparseDeltaLinear if isinstance(mod, nn.Linear) else SparseDeltaConv2d
        _set_submodule(m, path, cls(mod, idx))
    params = dict(m.named_parameters())
    for name in head_parameter_names(m):
        params[name].requires_grad_(True)
    return model


def remove_sparse_training(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain Linear/Conv2d modules back, in place; ``merge`` folds the values into the weight."""
    m = unwrap(model)
    for path, mod in sparse_modules(m).items():
        _set_submodule(m, path, mod.to_plain(merge=merge))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in unwrap(model).parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
