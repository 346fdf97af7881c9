"""Mixed-task forward: one pass over a batch whose samples each name their own task delta.

For a sample of task t, every Linear / Conv2d that t's delta touches returns the frozen layer's
output plus t's sparse correction, ``y[s, ..., r] += v * x[s, ..., c]`` over t's k entries (weight
row r, column c, value v; a Conv2d's column indexes its im2col patch), and the classifier is t's own
head. The samples of one task are made contiguous once per batch, so each correction reads and
writes views of the layer's input and output: O(tokens * k) work per task and layer, against the
O(tokens * in * out) of the frozen product that all tasks share.

Invariants:
- Nothing of the backbone is written. ``MixedTaskModel(model)`` installs forward hooks once, on
  every Linear / groups=1 Conv2d and on the classifier(s); the batch's plan lives in a context
  variable of the calling thread, so hooks outside a mixed forward do nothing, and any number of
  batches may run on one model at once (each in its own thread). ``close()`` removes the hooks.
- Per sample the logits equal those of the model with that sample's delta applied alone
  (``apply_delta``), up to float rounding: the correction is added to the frozen product instead
  of folded into the weight. Deltas that touch the same weights are independent.
- Layers must see the batch as their leading dimension, sample-major (timm's ViT tokens, Swin
  windows, ConvNeXt NHWC and NCHW maps all do); a layer whose leading dimension is not a multiple
  of the batch, or a touched layer that did not run as a module, fails the batch with MixedError.
- Two exact kernels for a Linear's correction: ``gather`` (gather of the input's columns,
  scatter_add into the output's rows) and ``csr`` (the delta as a sparse CSR matrix, one sparse-dense
  product added in place). ``csr`` has a floor of one pass over the output, ``gather`` a higher
  cost per entry, so a layer takes ``csr`` once k exceeds ``out / 2 + in`` (measured crossover on
  CPU, bench/serve.py); the rule depends on shapes only, so repeated runs give the same bits.
  ``MIXED_PATH`` forces one. Conv2d corrections gather the patch entries they need directly.
- A format-2 delta's dense tensors (methods that train whole biases beside their mask, such as
  GPS) are corrections too: a Linear / Conv2d bias adds ``b_t - b`` to the task's output rows, a
  layer-scale gamma adds ``x * (g_t - g)``. Any other dense tensor (e.g. Swin's relative-position
  bias tables) is refused when the delta is prepared, never silently left out.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import backbone_fingerprint, head_module_paths, unwrap
from .delta import DeltaError, TaskDelta, check_backbone_name, validate_delta
from .eligibility import is_supported_module
from .values_grad import csr_row_pointers, sorted_csr

__all__ = ["MIXED_PATHS", "MixedError", "LayerDelta", "PreparedDelta", "MixedTaskModel", "linear_path"]

MIXED_PATHS = ("gather", "csr")
# None: chosen per layer by linear_path; a name from MIXED_PATHS forces it (tests, the bench).
MIXED_PATH: str | None = os.environ.get("SHPEFT_MIXED_PATH") or None
# Bound on the elements of one gathered [rows x entries] block (float32: 16 MB).
CHUNK_ELEMENTS = 1 << 22

_PLAN: contextvars.ContextVar["_Plan | None"] = contextvars.ContextVar("shpeft_mixed_plan", default=None)


class MixedError(DeltaError):
    """A delta or batch the mixed forward cannot run; the message names the delta, tensor or layer."""


def linear_path(k: int, in_features: int, out_features: int, dtype: torch.dtype) -> str:
    """The correction kernel for a Linear with k entries (see the module docstring)."""
    if MIXED_PATH is not None:
        if MIXED_PATH not in MIXED_PATHS:
            raise ValueError(f"MIXED_PATH={MIXED_PATH!r}: expected one of {MIXED_PATHS}")
        return MIXED_PATH if dtype in (torch.float32, torch.float64) else "gather"
    # Sparse CSR kernels exist for float32 / float64 only.
    if dtype in (torch.float32, torch.float64) and k > out_features / 2 + in_features:
        return "csr"
    return "gather"


@dataclass(frozen=True)
class LayerDelta:
    """One task's entries in one layer: weight rows and columns (as [out, in * kh * kw]) and values."""

    rows: Tensor  # [k] int64
    cols: Tensor  # [k] int64
    values: Tensor  # [k], the layer weight's dtype (the cast apply_delta makes)
    csr: Tensor | None = None  # Linear on the csr path: the delta as sparse CSR [out, in]
    bias: Tensor | None = None  # a dense bias's difference to the frozen one, [out]
    gather_index: dict = field(default_factory=dict, compare=False)  # Conv2d: (H, W) -> [k, L] input offsets


@dataclass(frozen=True)
class PreparedDelta:
    """A task delta checked against one model, in the form its mixed forward reads."""

    name: str
    num_classes: int
    layers: dict[str, LayerDelta]  # module path -> entries
    heads: dict[str, tuple[Tensor, Tensor | None]]  # classifier path -> (weight, bias)
    gammas: dict[str, Tensor] = field(default_factory=dict)  # layer-scale path -> gamma's difference


@dataclass
class _Plan:
    batch: int
    width: int  # the widest head in the batch
    layers: dict[str, list[tuple[int, int, LayerDelta]]]  # path -> (first sample, end, entries)
    heads: dict[str, list[tuple[int, int, Tensor, Tensor | None]]]
    gammas: dict[str, list[tuple[int, int, Tensor]]] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # rows and cols come from sorted unique flat indices: the CSR is valid by construction
    return sorted_csr(csr_row_pointers(rows, shape[0]), cols, values, shape)


def _linear_correction(x: Tensor, y: Tensor, ld: LayerDelta) -> None:
    """y[t, rows[j]] += values[j] * x[t, cols[j]], in place, for x [T, in] and a view y [T, out]."""
    if ld.csr is not None:
        y.t().addmm_(ld.csr, x.t())  # y^T += D @ x^T, written through the transposed view
        return
    k = ld.cols.numel()
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    # gather / scatter_add_ over broadcast [rows x k] indices: one pass each, about a third faster on
    # CPU than index_select / index_add_ along dim 1 (which adds column by column).
    cols, rows = ld.cols.expand(min(step, x.shape[0]), k), ld.rows.expand(min(step, x.shape[0]), k)
    for s in range(0, x.shape[0], step):
        xs = x[s : s + step]
        n = xs.shape[0]
        picked = torch.gather(xs, 1, cols[:n]).mul_(ld.values)
        y[s : s + step].scatter_add_(1, rows[:n], picked.to(y.dtype))


def _conv_index(mod: nn.Conv2d, ld: LayerDelta, h: int, w: int, device) -> tuple[Tensor, int, int]:
    """Offsets [k, L] into one sample's zero-padded input [C, Hp, Wp] of each entry's patch value."""
    cached = ld.gather_index.get((h, w))
    if cached is not None:
        return cached
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    ci, rest = ld.cols // (kh * kw), ld.cols % (kh * kw)
    base = ci * (hp * wp) + (rest // kw) * dh * wp + (rest % kw) * dw
    oy = torch.arange(ho, device=device) * (sh * wp)
    ox = torch.arange(wo, device=device) * sw
    index = base.to(device)[:, None] + (oy[:, None] + ox[None, :]).reshape(1, -1)
    ld.gather_index[(h, w)] = out = (index, ho, wo)
    return out


def _conv_correction(mod: nn.Conv2d, x: Tensor, y: Tensor, ld: LayerDelta) -> None:
    """y[s, rows[j], oy, ox] += values[j] * patch[s, cols[j], oy, ox], in place; y contiguous NCHW."""
    n, _, h, w = x.shape
    index, ho, wo = _conv_index(mod, ld, h, w, x.device)
    ph, pw = mod.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    flat = xp.reshape(n, -1)
    yv = y.view(n, y.shape[1], ho * wo)
    k, length = index.shape
    step = max(1, CHUNK_ELEMENTS // max(1, n * length))
    for s in range(0, k, step):
        e = min(k, s + step)
        picked = flat.index_select(1, index[s:e].reshape(-1)).view(n, e - s, length)
        picked = picked.mul_(ld.values[s:e, None])
        yv.index_add_(1, ld.rows[s:e], picked.to(y.dtype))


class MixedTaskModel:
    """A frozen backbone that runs batches whose samples name their own task (see the module docstring).

    ``prepare(delta)`` checks a delta against this model once; ``forward(images, deltas, task_index)``
    returns, for each prepared delta, the logits of the samples assigned to it.
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap(model).eval()
        self.head_paths = head_module_paths(self.model)
        if not self.head_paths:
            raise MixedError("model has no classifier head")
        for p in self.head_paths:
            if not isinstance(self.model.get_submodule(p), nn.Linear):
                raise MixedError(f"classifier {p!r} is a {type(self.model.get_submodule(p)).__name__}, "
                                 "the mixed forward needs Linear heads")
        heads = set(self.head_paths)
        self.layers = {n: m for n, m in self.model.named_modules()
                       if n and n not in heads and is_supported_module(m) and isinstance(m, (nn.Linear, nn.Conv2d))}
        self._fingerprint: str | None = None
        self._hooks = [m.register_forward_hook(partial(_layer_hook, n)) for n, m in self.layers.items()]
        self._hooks += [self.model.get_submodule(p).register_forward_hook(partial(_head_hook, p))
                        for p in self.head_paths]
        # Layer scales (timm's LayerScale / LayerScale2d: x * gamma, not in place) for dense gammas.
        self.scales = {n: m for n, m in self.model.named_modules()
                       if n and isinstance(getattr(m, "gamma", None), nn.Parameter) and not getattr(m, "inplace", False)
                       and len(list(m.parameters(recurse=False))) == 1}
        self._hooks += [m.register_forward_hook(partial(_gamma_hook, n)) for n, m in self.scales.items()]

    def close(self) -> None:
        """Remove the hooks; the model is as it was before."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.model)
        return self._fingerprint

    def prepare(self, delta: TaskDelta, *, where: str = "delta", check_fingerprint: bool = True,
                name: str = "") -> PreparedDelta:
        """The delta checked against this model (format, names, shapes, indices, head, base weights)."""
        try:  # the checks apply_delta runs: what a delta may touch, in range, finite, the head's shape
            check_backbone_name(self.model, delta, where)
            validate_delta(self.model, delta, where=where)
        except DeltaError as exc:
            raise MixedError(str(exc)) from None
        if check_fingerprint and delta.metadata["backbone_fingerprint"] != self.fingerprint:
            raise MixedError(f"{where}: backbone weights differ from the delta's base (fingerprint "
                             f"{self.fingerprint[:12]} vs {delta.metadata['backbone_fingerprint'][:12]})")
        layers = {}
        for pname, idx in delta.indices.items():
            path = pname[: -len(".weight")] if pname.endswith(".weight") else ""
            if path not in self.layers:
                raise MixedError(f"{where}: {pname} is not the weight of a Linear or groups=1 Conv2d layer")
            if idx.numel():
                layers[path] = _layer_delta(self.layers[path], idx, delta.values[pname], f"{where}: {pname}")
        gammas = {}
        for pname, t in sorted(delta.dense.items()):
            path, _, leaf = pname.rpartition(".")
            if leaf == "bias" and path in self.layers and self.layers[path].bias is not None:
                mod = self.layers[path]
                diff = t.to(device=mod.bias.device, dtype=mod.bias.dtype) - mod.bias.detach()
                ld = layers.get(path) or _layer_delta(mod, torch.zeros(0, dtype=torch.int32),
                                                      torch.zeros(0), f"{where}: {pname}")
                layers[path] = LayerDelta(ld.rows, ld.cols, ld.values, ld.csr, diff)
            elif leaf == "gamma" and path in self.scales:
                g = self.scales[path].gamma
                gammas[path] = t.to(device=g.device, dtype=g.dtype) - g.detach()
            else:
                raise MixedError(f"{where}: dense tensor {pname} is not a Linear / Conv2d bias or a layer-scale "
                                 "gamma, which the mixed forward cannot add; merge the delta instead (shpeft export)")
        heads = {p: _head(self.model.get_submodule(p), p, delta, where) for p in self.head_paths}
        known = {f"{p}.{n}" for p in self.head_paths for n in ("weight", "bias")}
        extra = sorted(set(delta.head) - known)
        if extra:
            raise MixedError(f"{where}: head tensors {extra[:3]} are not the classifier's "
                             f"({', '.join(self.head_paths)})")
        return PreparedDelta(name or delta.metadata.get("task", ""), delta.num_classes, layers, heads, gammas)

    def forward(self, images: Tensor, deltas: Sequence[PreparedDelta], task_index: Sequence[int] | Tensor
                ) -> list[Tensor]:
        """Logits per delta: entry t holds the samples with ``task_index == t``, in batch order, [n_t, classes_t]."""
        if not deltas:
            raise MixedError("no deltas given")
        tid = torch.as_tensor(task_index, dtype=torch.int64).reshape(-1).cpu()
        if tid.numel() != images.shape[0]:
            raise MixedError(f"task_index has {tid.numel()} entries for a batch of {images.shape[0]}")
        if tid.numel() and (int(tid.min()) < 0 or int(tid.max()) >= len(deltas)):
            raise MixedError(f"task_index must lie in [0, {len(deltas)})")
        if tid.numel() == 0:
            return [images.new_zeros(0, d.num_classes) for d in deltas]
        order = torch.argsort(tid, stable=True)
        counts = torch.bincount(tid, minlength=len(deltas)).tolist()
        device = next(self.model.parameters()).device
        x = images.to(device)
        if not bool((order == torch.arange(order.numel())).all()):
            x = x.index_select(0, order.to(device))
        plan = _Plan(batch=x.shape[0], width=max(d.num_classes for d in deltas), layers={}, heads={})
        start = 0
        bounds = []
        for d, n in zip(deltas, counts):
            bounds.append((start, start + n))
            if n:
                for path, ld in d.layers.items():
                    plan.layers.setdefault(path, []).append((start, start + n, ld))
                for path, (w, b) in d.heads.items():
                    plan.heads.setdefault(path, []).append((start, start + n, w, b))
                for path, g in d.gammas.items():
                    plan.gammas.setdefault(path, []).append((start, start + n, g))
            start += n
        token = _PLAN.set(plan)
        try:
            with torch.no_grad():
                logits = self.model(x)
        finally:
            _PLAN.reset(token)
        missed = sorted((set(plan.layers) | set(plan.gammas)) - plan.fired)
        if missed:
            raise MixedError(f"layers {missed[:3]} did not run as modules in the forward: their corrections "
                             "cannot be applied")
        return [logits[s:e, : d.num_classes] for d, (s, e) in zip(deltas, bounds)]

    __call__ = forward


def _layer_delta(mod: nn.Module, idx: Tensor, values: Tensor, where: str) -> LayerDelta:
    """One layer's entries as rows, columns and values (the weight's dtype and device), CSR form if chosen."""
    flat = idx.to(device=mod.weight.device, dtype=torch.int64)
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise MixedError(f"{where}.indices must be sorted and unique")
    row_len = mod.weight[0].numel()
    rows, cols = flat // row_len, flat % row_len
    values = values.to(device=mod.weight.device, dtype=mod.weight.dtype)  # the cast apply_delta makes
    csr = None
    if isinstance(mod, nn.Linear) and linear_path(flat.numel(), mod.in_features, mod.out_features,
                                                  values.dtype) == "csr":
        csr = _csr(rows, cols, values, (mod.out_features, mod.in_features))
    return LayerDelta(rows, cols, values, csr)


def _head(mod: nn.Linear, path: str, delta: TaskDelta, where: str) -> tuple[Tensor, Tensor | None]:
    """The delta's weight and bias for classifier ``path``, checked against the module and cast to it."""
    n = delta.num_classes
    w, b = delta.head.get(f"{path}.weight"), delta.head.get(f"{path}.bias")
    if w is None or tuple(w.shape) != (n, mod.in_features):
        got = None if w is None else tuple(w.shape)
        raise MixedError(f"{where}: head tensor {path}.weight must have shape ({n}, {mod.in_features}), got {got}")
    if mod.bias is None and b is not None:
        raise MixedError(f"{where}: head tensor {path}.bias must be absent (the head has no bias)")
    if mod.bias is not None and (b is None or tuple(b.shape) != (n,)):
        raise MixedError(f"{where}: head tensor {path}.bias must have shape ({n},)")
    cast = dict(device=mod.weight.device, dtype=mod.weight.dtype)
    return w.to(**cast), None if b is None else b.to(**cast)


def _rows_per_sample(plan: _Plan, lead: int, path: str) -> int:
    if lead % plan.batch:
        raise MixedError(f"layer {path!r} sees a leading dimension of {lead}, not a multiple of the batch "
                         f"({plan.batch}): its input does not keep samples apart")
    return lead // plan.batch


def _layer_hook(path: str, module: nn.Module, inputs: tuple, output: Tensor):
    plan = _PLAN.get()
    if plan is None:
        return None
    groups = plan.layers.get(path)
    if not groups:
        return None
    plan.fired.add(path)
    x = inputs[0]
    if not output.is_contiguous():
        output = output.contiguous()
    per = _rows_per_sample(plan, x.shape[0], path)
    if isinstance(module, nn.Conv2d):
        for s, e, ld in groups:
            y = output[s * per : e * per]
            if ld.cols.numel():
                _conv_correction(module, x[s * per : e * per], y, ld)
            if ld.bias is not None:
                y.add_(ld.bias.view(1, -1, 1, 1))
        return output
    for s, e, ld in groups:
        y = output[s * per : e * per].view(-1, output.shape[-1])
        if ld.cols.numel():
            _linear_correction(x[s * per : e * per].reshape(-1, x.shape[-1]), y, ld)
        if ld.bias is not None:
            y.add_(ld.bias)
    return output


def _gamma_hook(path: str, module: nn.Module, inputs: tuple, output: Tensor):
    plan = _PLAN.get()
    if plan is None or not plan.gammas.get(path):
        return None
    plan.fired.add(path)
    x = inputs[0]
    output = output.clone()
    per = _rows_per_sample(plan, x.shape[0], path)
    for s, e, g in plan.gammas[path]:
        xs = x[s * per : e * per]
        gb = g.view(1, -1, 1, 1) if xs.dim() == 4 and g.numel() == xs.shape[1] and g.numel() != xs.shape[-1] else g
        output[s * per : e * per] += xs * gb
    return output


def _head_hook(path: str, module: nn.Module, inputs: tuple, output: Tensor):
    plan = _PLAN.get()
    if plan is None:
        return None
    x = inputs[0]
    per = _rows_per_sample(plan, x.shape[0], path)
    if per != 1:
        raise MixedError(f"classifier {path!r} sees {x.shape[0]} rows for a batch of {plan.batch}")
    out = output.new_zeros(x.shape[:-1] + (plan.width,))
    for s, e, w, b in plan.heads.get(path, []):
        out[s:e, : w.shape[0]] = F.linear(x[s:e], w, b)
    return out
