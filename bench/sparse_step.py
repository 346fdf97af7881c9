"""Training-step cost of SH-PEFT sparse deltas vs full fine-tuning, head-only, GPS-style masked
gradients and LoRA r=8, side by side in one process on the same timm model and batch.

activation_floor (extra row) freezes the whole backbone except the patch-embedding bias, so
every block still runs its input-gradient backward: the floor any backbone-tuning method pays.

Per method: median step time (forward + backward + AdamW step), its ratio to full fine-tuning,
to activation_floor and to lora_r8 (same run), peak memory, trainable parameters and
optimiser-state bytes; for shpeft_<density> (any density, e.g. shpeft_3e-3) also how many layers
took each values-gradient path (autotuned on the first backward). ``--precision bf16`` runs every
method under bf16 autocast (CPU or CUDA); ``both`` runs the float32 and bf16 sets interleaved in one
process, ratios taken within each set. The last line printed is one JSON object {"methods": {NAME:
{...}}} (plus "methods_bf16" with ``both``).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over a training step with only that
method's model on the device. On CPU (where allocator peaks are not observable), the bytes of
parameters + gradients + optimiser state + tensors saved for backward (unique storages not
aliasing parameters or buffers, recorded with torch.autograd.graph.saved_tensors_hooks) --
the memory a step must hold at its peak, excluding allocator slack and short-lived temporaries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from shpeft_core import (
    BackboneSpec,
    ImportanceConfig,
    apply_sparse_training,
    compute_importance,
    create_backbone,
    eligible_parameters,
    head_parameter_names,
    hybrid_scores,
    select_mask,
)
from shpeft_core.eligibility import eligible_modules
from shpeft_core.sparse import values_grad_choices

METHODS = ("full", "head", "gps_mask", "lora_r8", "shpeft_1e-5", "shpeft_1e-4", "shpeft_1e-3", "shpeft_1e-2",
           "activation_floor")
# Ratio columns: step time relative to these methods when they are in the run.
BASELINES = {"full": "ratio_to_full", "activation_floor": "ratio_to_floor", "lora_r8": "ratio_to_lora"}
PRECISIONS = ("fp32", "bf16", "both")
LORA_TARGETS = r".*blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"


class Method:
    def __init__(self, name, model, optimizer, grad_masks=None, trainable=0):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.grad_masks = grad_masks or []
        self.trainable = trainable
        self.times: list[float] = []
        self.paths: dict[str, int] = {}  # values-gradient path -> layers (shpeft only)
        self.precision = "fp32"  # or "bf16": bf16 autocast on the step's device (CPU or CUDA)

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        for p, m in self.grad_masks:  # GPS: dense gradient, frozen entries zeroed before the step
            p.grad.mul_(m)
        self.optimizer.step()
        return loss


def _adamw(params, wd=0.0):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=wd)


def build(name, spec, num_classes, scores, device) -> Method:
    model = create_backbone(spec, num_classes).to(device)
    model.train()
    head = set(head_parameter_names(model))
    if name == "full":
        params = list(model.parameters())
        return Method(name, model, _adamw(params, 0.05), trainable=sum(p.numel() for p in params))
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "head":
        params = [p for n, p in model.named_parameters() if n in head]
        for p in params:
            p.requires_grad_(True)
        return Method(name, model, _adamw(params), trainable=sum(p.numel() for p in params))
    if name == "activation_floor":
        # Backbone frozen, but the gradient must still flow through every block: the
        # "forward + activation backward" cost that any method training backbone entries pays.
        first = next(iter(eligible_modules(model).values()))
        entry = first.bias if first.bias is not None else first.weight
        params = [entry] + [p for n, p in model.named_parameters() if n in head]
        for p in params:
            p.requires_grad_(True)
        return Method(name, model, _adamw(params), trainable=sum(p.numel() for p in params))
    if name == "gps_mask":
        mask = select_mask(scores, 1e-3, "per_row")  # GPS: top-K inputs per output neuron
        eligible = eligible_parameters(model)
        masks = []
        for n, idx in mask.items():
            m = torch.zeros(eligible[n].numel(), device=device)
            m[idx.long().to(device)] = 1.0
            masks.append((eligible[n], m.view_as(eligible[n])))
            eligible[n].requires_grad_(True)
        heads = [p for n, p in model.named_parameters() if n in head]
        for p in heads:
            p.requires_grad_(True)
        # weight decay 0: with decay the frozen entries would drift (GPS's own caveat).
        opt = _adamw([p for p, _ in masks] + heads, 0.0)
        k = sum(int(v.numel()) for v in mask.values()) + sum(p.numel() for p in heads)
        return Method(name, model, opt, masks, trainable=k)
    if name == "lora_r8":
        from peft import LoraConfig, get_peft_model

        head_path = ".".join(next(iter(head)).split(".")[:-1])
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=[head_path])
        pm = get_peft_model(model, cfg).to(device)
        params = [p for p in pm.parameters() if p.requires_grad]
        return Method(name, pm, _adamw(params, 0.05), trainable=sum(p.numel() for p in params))
    if name.startswith("shpeft_"):
        try:
            density = float(name.split("_", 1)[1])
        except ValueError:
            raise ValueError(f"{name}: expected shpeft_<density>, e.g. shpeft_1e-3") from None
        apply_sparse_training(model, {n: v.to(device) for n, v in select_mask(scores, density, "global").items()})
        params = [p for p in model.parameters() if p.requires_grad]
        return Method(name, model, _adamw(params, 0.05), trainable=sum(p.numel() for p in params))
    raise ValueError(name)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def optimizer_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def cpu_step_bytes(method: Method, x, y) -> int:
    """params + grads + optimiser state + tensors saved for backward (unique storages)."""
    model = method.model
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            saved[st.data_ptr()] = st.nbytes()
        return t

    method.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=method.precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return params + grads + optimizer_state_bytes(method.optimizer) + sum(saved.values())


def cuda_step_bytes(method: Method, x, y, device) -> int:
    """Peak of the second step (optimiser state exists by then) with only this method on the device."""
    method.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    method.step(x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


def first_step(method: Method, step):
    """``step()`` (the method's first backward), recording the values-gradient paths it chose."""
    before = values_grad_choices()
    out = step()
    for key, path in values_grad_choices().items():
        if key not in before:
            method.paths[path] = method.paths.get(path, 0) + 1
    return out


def add_ratios(result: dict) -> None:
    for base, col in BASELINES.items():
        ref = result.get(base, {}).get("step_ms")
        for r in result.values():
            r[col] = round(r["step_ms"] / ref, 3) if ref else None


def print_table(result: dict, precision: str) -> None:
    print(f"[{precision}]")
    cols = [c for b, c in BASELINES.items() if b in result]
    hdr = f"{'method':<18} {'step_ms':>9}" + "".join(f" {c[len('ratio_'):]:>9}" for c in cols)
    print(hdr + f" {'peak_MB':>9} {'trainable':>10} {'optim_bytes':>12}  values-grad paths")
    for n, r in result.items():
        ratios = "".join(f" {r[c]:>9.3f}" for c in cols)
        paths = ", ".join(f"{p} {c}" for p, c in sorted(r.get("values_grad_paths", {}).items()))
        print(f"{n:<18} {r['step_ms']:>9.1f}{ratios} {r['peak_mem_mb']:>9.1f} {r['trainable']:>10d} "
              f"{r['optimizer_state_bytes']:>12d}  {paths}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="float32, bf16 autocast (CPU or CUDA), or both in one run (interleaved)")
    ap.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--smoke-test", action="store_true", help="tiny model and steps (< 1 min on 2 CPUs)")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.model, args.img_size, args.batch_size, args.steps, args.warmup = "vit_tiny_patch16_224", 64, 4, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] if args.precision == "both" else ["bf16" if args.bf16 else args.precision]
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    spec = BackboneSpec(args.model, None, kwargs)
    probe = create_backbone(spec, args.num_classes)
    size = probe.pretrained_cfg["input_size"][-1] if not args.img_size else args.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    # One shared grad2 score map so every masked method selects from the same ranking.
    imp = compute_importance(probe, [(x.cpu(), y.cpu())], ImportanceConfig(num_batches=1, head_warmup="ridge"),
                             num_classes=args.num_classes, device=str(device))
    scores = hybrid_scores(imp, None, 1.0)
    eligible_total = sum(t.numel() for t in scores.values())
    del probe
    names = [m for m in args.methods.split(",") if m]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def make(precision, n):
        m = build(n, spec, args.num_classes, scores, device)
        m.precision = precision
        return m

    peak, paths = {}, {}
    if device.type == "cuda":
        for prec in precisions:
            for n in names:  # one method at a time on the device
                m = make(prec, n)
                peak[prec, n] = first_step(m, lambda: cuda_step_bytes(m, x, y, device))
                paths[prec, n] = m.paths
                del m
                torch.cuda.empty_cache()
    methods = [make(prec, n) for prec in precisions for n in names]
    for m in methods:
        if device.type != "cuda":
            peak[m.precision, m.name] = first_step(m, lambda: cpu_step_bytes(m, x, y))
            paths[m.precision, m.name] = m.paths

    for _ in range(args.warmup):
        for m in methods:
            m.step(x, y)
    # Interleaved rounds: load drift on a shared machine hits every method alike.
    for _ in range(args.steps):
        for m in methods:
            sync()
            t0 = time.perf_counter()
            m.step(x, y)
            sync()
            m.times.append(time.perf_counter() - t0)

    results = {prec: {} for prec in precisions}
    for m in methods:
        results[m.precision][m.name] = {
            "step_ms": round(statistics.median(m.times) * 1e3, 2),
            "trainable": int(m.trainable),
            "optimizer_state_bytes": int(optimizer_state_bytes(m.optimizer)),
            "peak_mem_mb": round(peak[m.precision, m.name] / 2**20, 1),
        }
        if paths.get((m.precision, m.name)):
            results[m.precision][m.name]["values_grad_paths"] = paths[m.precision, m.name]
    for result in results.values():  # ratios within one precision
        add_ratios(result)
    info = {
        "model": args.model, "img_size": size, "batch_size": args.batch_size, "device": str(device),
        "threads": torch.get_num_threads(), "precision": precisions, "torch": torch.__version__,
        "timm": timm.__version__, "peft": _version("peft"), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "eligible_weights": eligible_total, "steps": args.steps,
        "peak_mem": "cuda max_memory_allocated" if device.type == "cuda" else "params+grads+optimizer state+saved activations",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print("setup " + json.dumps(info))
    for prec, result in results.items():
        print_table(result, prec)
    # "methods": the first precision run (float32 unless only bf16 was asked for); "methods_bf16" beside it.
    out = {"methods": results[precisions[0]]}
    if len(precisions) > 1:
        out["methods_bf16"] = results["bf16"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
