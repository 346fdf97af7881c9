"""Sparse-delta training: a frozen weight plus trainable values at k fixed entries.

The forward merges the weight once (``W + scatter(values)``) and calls F.linear / F.conv2d, so
it runs at dense speed. The backward returns the input gradient through the merged weight and
the values' gradient at the k entries only, ``gv[j] = sum_n grad_out[n, row_j] * x[n, col_j]``.
Four exact ways to form it are kept (``VALUES_GRAD_PATHS``); which is cheapest depends on k, the
layer shape, the token count and the device, so each (shape, tokens, k, rows, cols, dtype,
device) is timed once on its first backward and the winner kept.

The paths differ in float summation order, so the choice must not change between runs that are
meant to agree to the bit: winners are kept in a small per-machine file (``SHPEFT_CACHE_DIR``,
default ``~/.cache/shpeft``) that later processes read before timing anything, and ``fit`` saves
the choices in each checkpoint and restores them on resume (``export_choices`` / ``import_choices``).

``values`` are a float32 master copy whatever the weight's dtype (float64 stays float64): a bf16
backbone would round small updates away. They are cast to the weight's dtype only when merged.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import head_parameter_names, unwrap
from .eligibility import is_supported_module

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

# Bound on elements of each gathered [rows x chunk] block in the values' backward.
GATHER_CHUNK_ELEMENTS = 1 << 20
# Block size for the transposed path: two [chunk x rows] blocks stay in cache.
TRANSPOSED_CHUNK_ELEMENTS = 1 << 16

# Ways to form the values' gradient, all exact (they differ only in float summation order):
#   gathered: dot products of gathered columns, O(k * N) memory-bound work;
#   sddmm:    torch.sparse.sampled_addmm at the CSR pattern of the k entries;
#   compact:  GEMM over the selected rows x selected columns only, then a gather;
#   dense:    the layer's full weight-gradient GEMM, then a gather.
VALUES_GRAD_PATHS = ("gathered", "sddmm", "compact", "dense")
# None: autotune. A name from VALUES_GRAD_PATHS forces that path everywhere (tests, or bit-exact
# reruns: the autotuned choice may differ between runs, and with it the last bits of the sums).
VALUES_GRAD_PATH: str | None = os.environ.get("SHPEFT_VALUES_GRAD") or None
# Timed runs per candidate on a key's first backward; the fastest run decides (a shared CPU
# stalls single runs, so one sample each is not enough).
AUTOTUNE_REPEATS = 3
_chosen: dict[tuple, str] = {}


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


def _gathered_dot(a: Tensor, a_idx: Tensor, b: Tensor, b_idx: Tensor) -> Tensor:
    """out[j] = sum_n a[n, a_idx[j]] * b[n, b_idx[j]] in float32 (float64 kept), chunked over j.

    Few indices: gather columns of a and b directly. Many indices (more than the two widths):
    transpose once so each gathered column is a contiguous row, and work in cache-sized blocks;
    that is several times faster than strided column gathers on CPU.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.to(dtype)
    b = b.to(dtype)
    n, k = a.shape[0], a_idx.numel()
    out = torch.empty(k, dtype=dtype, device=a.device)
    if k > a.shape[1] + b.shape[1]:
        at, bt = a.t().contiguous(), b.t().contiguous()
        step = max(1, min(GATHER_CHUNK_ELEMENTS, TRANSPOSED_CHUNK_ELEMENTS) // max(1, n))
        for s in range(0, k, step):
            e = min(k, s + step)
            out[s:e] = torch.linalg.vecdot(at.index_select(0, a_idx[s:e]), bt.index_select(0, b_idx[s:e]), dim=1)
        return out
    step = max(1, GATHER_CHUNK_ELEMENTS // max(1, n))
    for s in range(0, k, step):
        e = min(k, s + step)
        out[s:e] = torch.linalg.vecdot(a.index_select(1, a_idx[s:e]), b.index_select(1, b_idx[s:e]), dim=0)
    return out


class SparsePattern(NamedTuple):
    """Where the k values sit in a weight viewed as [out, row_len], in the forms the paths use."""

    shape: tuple[int, int]
    flat_idx: Tensor  # [k] int64, sorted row-major
    rows: Tensor  # [k] int64
    cols: Tensor  # [k] int64
    crow: Tensor  # [out + 1] int64, CSR row pointers
    urows: Tensor  # [R] selected rows
    ucols: Tensor  # [C] selected columns
    local_idx: Tensor  # [k] flat index into the [R, C] compact block


def sparse_pattern(flat_idx: Tensor, shape: tuple[int, int]) -> SparsePattern:
    flat = flat_idx.to(torch.int64)
    rows, cols = flat // shape[1], flat % shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    urows, rrank = torch.unique(rows, return_inverse=True)
    ucols, crank = torch.unique(cols, return_inverse=True)
    return SparsePattern(shape, flat, rows, cols, crow, urows, ucols, rrank * ucols.numel() + crank)


def _grad_gathered(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    return _gathered_dot(a, pat.rows, b, pat.cols)


def _grad_sddmm(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    # beta=0 still reads the pattern's values (0 * NaN = NaN), so they must be zeros.
    zeros = torch.zeros(pat.cols.numel(), dtype=a.dtype, device=a.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # check_invariants=False on purpose: sparse_pattern builds the CSR sorted and in range
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        csr = torch.sparse_csr_tensor(pat.crow, pat.cols, zeros, pat.shape, check_invariants=False)
    # CSR order is sorted row-major order, the order of the values.
    return torch.sparse.sampled_addmm(csr, a.t(), b, beta=0.0).values()


def _grad_compact(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    block = a.index_select(1, pat.urows).t() @ b.index_select(1, pat.ucols)
    return block.view(-1)[pat.local_idx]


def _grad_dense(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    return (a.t() @ b).view(-1)[pat.flat_idx]


_PATH_FNS = {"gathered": _grad_gathered, "sddmm": _grad_sddmm, "compact": _grad_compact, "dense": _grad_dense}


def _candidates(pat: SparsePattern) -> list[str]:
    # compact over every row and column is the dense path with two extra copies.
    full = pat.urows.numel() == pat.shape[0] and pat.ucols.numel() == pat.shape[1]
    return [p for p in VALUES_GRAD_PATHS if not (full and p == "compact")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autotune(a: Tensor, b: Tensor, pat: SparsePattern) -> tuple[str, Tensor]:
    """Time every candidate AUTOTUNE_REPEATS times (round-robin); the fastest and its result."""
    best: dict[str, float] = {}
    outs: dict[str, Tensor] = {}
    failed: set[str] = set()
    for _ in range(AUTOTUNE_REPEATS):
        for name in _candidates(pat):
            if name in failed:
                continue
            _sync(a.device)
            t0 = time.perf_counter()
            try:
                outs[name] = _PATH_FNS[name](a, b, pat)
            except (RuntimeError, NotImplementedError):  # e.g. no sampled_addmm kernel on this backend
                failed.add(name)
                continue
            _sync(a.device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    if not best:
        raise RuntimeError(f"no values-gradient path runs on {a.device} for {a.dtype}")
    winner = min(best, key=best.get)
    return winner, outs[winner]


def _key_str(key: tuple) -> str:
    shape, n, k, rows, cols, dtype, device = key
    return f"{shape[0]}x{shape[1]}|n{n}|k{k}|r{rows}|c{cols}|{dtype}|{torch.device(device).type}"


def _choices_file() -> str:
    root = os.environ.get("SHPEFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "shpeft")
    return os.path.join(root, f"values-grad-paths-torch{torch.__version__.split('+')[0]}.json")


_persisted: dict[str, str] | None = None


def _persisted_choices() -> dict[str, str]:
    global _persisted
    if _persisted is None:
        try:
            with open(_choices_file()) as f:
                doc = json.load(f)
            _persisted = {k: v for k, v in doc.items() if v in VALUES_GRAD_PATHS}
        except (OSError, ValueError):
            _persisted = {}
    return _persisted


def _persist(key: str, name: str) -> None:
    """Add one winner to the machine's file (read, merge, atomic replace; an unwritable home is fine)."""
    path = _choices_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            doc = {}
        doc.setdefault(key, name)  # a concurrent process's earlier winner stays
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".paths-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
        _persisted_choices()[key] = doc[key]
    except OSError:
        pass


def export_choices() -> dict[str, str]:
    """The values-gradient path chosen per layer shape so far (and known from this machine's file)."""
    return {**_persisted_choices(), **_session}


def import_choices(choices: dict[str, str]) -> None:
    """Use these paths for these shapes from now on (a resumed run repeats the run it continues)."""
    _session.update({k: v for k, v in choices.items() if v in VALUES_GRAD_PATHS})


_session: dict[str, str] = {}


def _values_grad(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    """gv[j] = sum_n a[n, rows[j]] * b[n, cols[j]] for a [N, out], b [N, row_len]; float32 (float64 kept)."""
    dtype = _master_dtype(a.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if VALUES_GRAD_PATH is not None:
        if VALUES_GRAD_PATH not in _PATH_FNS:
            raise ValueError(f"VALUES_GRAD_PATH={VALUES_GRAD_PATH!r}: expected one of {VALUES_GRAD_PATHS}")
        return _PATH_FNS[VALUES_GRAD_PATH](a, b, pat)
    key = (pat.shape, a.shape[0], pat.cols.numel(), pat.urows.numel(), pat.ucols.numel(), dtype, a.device)
    skey = _key_str(key)
    name = _chosen.get(key) or _session.get(skey) or _persisted_choices().get(skey)
    if name is not None:
        _chosen[key] = _session[skey] = name
        return _PATH_FNS[name](a, b, pat)
    winner, out = _autotune(a, b, pat)
    _persist(skey, winner)
    # Another process may have recorded this shape first: follow it, so every run on the machine agrees.
    name = _persisted_choices().get(skey, winner)
    _chosen[key] = _session[skey] = name
    return out if name == winner else _PATH_FNS[name](a, b, pat)


def values_grad_choices() -> dict[tuple, str]:
    """The autotuned path per (shape, tokens, k, rows, cols, dtype, device) so far in this process."""
    return dict(_chosen)


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern, values):
        with _merged_in_place(weight, pattern.flat_idx, values) as w:
            out = F.linear(x, w, bias)
        # The frozen weight is kept by reference, not saved: it is modified (and restored) in place.
        ctx.weight, ctx.pattern = weight, pattern
        ctx.save_for_backward(x, values)
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
                gx = (grad_out @ w.to(grad_out.dtype)).to(x.dtype)
        if need_b:
            gb = go2.sum(0).to(weight.dtype)
        if need_v:
            gv = _values_grad(go2, x.reshape(-1, x.shape[-1]), pat).to(values.dtype)
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
        with _merged_in_place(weight, pattern.flat_idx, values) as w:
            out = F.conv2d(x, w, bias, stride, padding, dilation)
        ctx.weight, ctx.pattern = weight, pattern
        ctx.save_for_backward(x, values)
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
                                                dilation).to(x.dtype)
        if need_b:
            gb = grad_out.sum((0, 2, 3)).to(weight.dtype)
        if need_v:
            # im2col view: weight as [out, in*kh*kw], input patches as [B*L, in*kh*kw].
            p2 = _patches(x, weight.shape[-2:], stride, padding, dilation)
            b, length = grad_out.shape[0], grad_out.shape[2] * grad_out.shape[3]
            # [B*L, out] view of an [out, B*L] tensor: the rows SDDMM and the gathers read.
            g2 = grad_out.reshape(b, grad_out.shape[1], length).permute(1, 0, 2).reshape(-1, b * length).t()
            gv = _values_grad(g2, p2, pat).to(values.dtype)
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
