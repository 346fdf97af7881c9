"""The values' gradient of a sparse delta: ``gv[j] = sum_n a[n, rows[j]] * b[n, cols[j]]``.

``a`` is the layer's output gradient [N, out] and ``b`` its input (or im2col patches) [N, row_len].
Four exact ways to form it are kept (``VALUES_GRAD_PATHS``); which is cheapest depends on k, the
layer shape, the token count, the dtype and the device, so each (shape, tokens, k, rows, cols, dtype,
device) is timed once on its first backward and the winner kept.

The paths differ in float summation order, so the choice must not change between runs that are
meant to agree to the bit: winners are kept in a small per-machine file (``SHPEFT_CACHE_DIR``,
default ``~/.cache/shpeft``) that later processes read before timing anything, and ``fit`` saves
the choices in each checkpoint and restores them on resume (``export_choices`` / ``import_choices``).

Precision: the result is float32 (float64 inputs stay float64). bf16 / fp16 inputs (autocast) stay
in their dtype, and every path accumulates their products in float32: on CUDA the GEMM paths use
``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS, bf16/fp16 inputs, float32 output; in torch 2.14
``aten::mm.dtype`` has CUDA and XPU kernels only), elsewhere the operands they read are upcast first;
the gathered path gathers in the low dtype and upcasts the gathered blocks only; the sampled product
(no bf16 kernel on CPU, a bf16 result on CUDA) upcasts its operands.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "VALUES_GRAD_PATHS",
    "SparsePattern",
    "sparse_pattern",
    "csr_row_pointers",
    "sorted_csr",
    "values_grad",
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


# Reduced-precision operands (autocast): kept as they are, products accumulated in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Device types whose torch.mm takes bf16/fp16 operands with out_dtype=torch.float32 (aten::mm.dtype).
OUT_DTYPE_DEVICES = ("cuda", "xpu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_acc(x: Tensor, y: Tensor) -> Tensor:
    """x @ y accumulated in and returned as float32 (float64 kept), without upcasting bf16 operands
    where the device has a bf16-input, float32-output GEMM."""
    if x.dtype in LOW_PRECISION:
        if x.device.type in OUT_DTYPE_DEVICES:
            return torch.mm(x, y, out_dtype=torch.float32)
        return torch.mm(x.float(), y.float())  # no aten::mm.dtype kernel for this device (CPU)
    return torch.mm(x, y)


def _gathered_dot(a: Tensor, a_idx: Tensor, b: Tensor, b_idx: Tensor) -> Tensor:
    """out[j] = sum_n a[n, a_idx[j]] * b[n, b_idx[j]] in float32 (float64 kept), chunked over j.

    Few indices: gather columns of a and b directly. Many indices (more than the two widths):
    transpose once so each gathered column is a contiguous row, and work in cache-sized blocks;
    that is several times faster than strided column gathers on CPU. bf16 / fp16 operands are
    gathered as they are and only the gathered blocks are upcast.
    """
    dtype = _acc_dtype(a.dtype)
    n, k = a.shape[0], a_idx.numel()
    out = torch.empty(k, dtype=dtype, device=a.device)
    if k > a.shape[1] + b.shape[1]:
        at, bt = a.t().contiguous(), b.t().contiguous()
        step = max(1, min(GATHER_CHUNK_ELEMENTS, TRANSPOSED_CHUNK_ELEMENTS) // max(1, n))
        for s in range(0, k, step):
            e = min(k, s + step)
            out[s:e] = torch.linalg.vecdot(at.index_select(0, a_idx[s:e]).to(dtype),
                                           bt.index_select(0, b_idx[s:e]).to(dtype), dim=1)
        return out
    step = max(1, GATHER_CHUNK_ELEMENTS // max(1, n))
    for s in range(0, k, step):
        e = min(k, s + step)
        out[s:e] = torch.linalg.vecdot(a.index_select(1, a_idx[s:e]).to(dtype),
                                       b.index_select(1, b_idx[s:e]).to(dtype), dim=0)
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


def csr_row_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] of entries sorted by row."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


def sorted_csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix of entries from sorted, unique, in-range flat indices (valid by construction,
    so torch's invariant checks are off, and so are its beta warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def sparse_pattern(flat_idx: Tensor, shape: tuple[int, int]) -> SparsePattern:
    flat = flat_idx.to(torch.int64)
    rows, cols = flat // shape[1], flat % shape[1]
    crow = csr_row_pointers(rows, shape[0])
    urows, rrank = torch.unique(rows, return_inverse=True)
    ucols, crank = torch.unique(cols, return_inverse=True)
    return SparsePattern(shape, flat, rows, cols, crow, urows, ucols, rrank * ucols.numel() + crank)


def _grad_gathered(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    return _gathered_dot(a, pat.rows, b, pat.cols)


def _grad_sddmm(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    # No bf16 sampled_addmm on CPU, and a bf16 result on CUDA: float32 operands.
    a, b = a.to(_acc_dtype(a.dtype)), b.to(_acc_dtype(b.dtype))
    # beta=0 still reads the pattern's values (0 * NaN = NaN), so they must be zeros.
    zeros = torch.zeros(pat.cols.numel(), dtype=a.dtype, device=a.device)
    csr = sorted_csr(pat.crow, pat.cols, zeros, pat.shape)
    # CSR order is sorted row-major order, the order of the values.
    return torch.sparse.sampled_addmm(csr, a.t(), b, beta=0.0).values()


def _grad_compact(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    block = _mm_acc(a.index_select(1, pat.urows).t(), b.index_select(1, pat.ucols))
    return block.view(-1)[pat.local_idx]


def _grad_dense(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    return _mm_acc(a.t(), b).view(-1)[pat.flat_idx]


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


def values_grad(a: Tensor, b: Tensor, pat: SparsePattern) -> Tensor:
    """gv[j] = sum_n a[n, rows[j]] * b[n, cols[j]] for a [N, out], b [N, row_len]; float32 (float64 kept).

    bf16 / fp16 ``a`` (autocast's output gradient): ``b`` is taken in the same dtype (the forward
    multiplied the weight by that rounding of it) and the paths accumulate in float32.
    """
    dtype = a.dtype if a.dtype in LOW_PRECISION else _acc_dtype(a.dtype)
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

