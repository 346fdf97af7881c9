"""Framework-free training loop for sparse-delta models (runs as is inside Ray Train workers)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import _st, io
from .backbone import head_parameter_names, unwrap
from .sparse import export_choices, import_choices

__all__ = [
    "TrainConfig",
    "TrainState",
    "evaluate",
    "fit",
    "lr_factor",
    "epoch_seed",
    "seed_everything",
    "save_train_state",
    "load_train_state",
    "read_train_history",
    "TrainStateError",
]

TRAIN_STATE_FORMAT = "shpeft-train-state/1"


class TrainStateError(ValueError):
    """A training-state directory that cannot be resumed from."""


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_epochs: float = 1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True  # autocast to bfloat16, CUDA only
    label_smoothing: float = 0.0


@dataclass
class TrainState:
    """Everything needed to resume bit-exactly after ``epoch`` completed epochs.

    No RNG state is kept: ``fit`` reseeds every RNG from (seed, epoch, rank) at each epoch start.
    """

    epoch: int
    step: int
    trainable: dict[str, Tensor]
    optimizer: dict
    history: list[dict] = field(default_factory=list)
    # The values-gradient path per layer shape (shpeft_core.sparse): a resumed run uses the same ones.
    kernel_choices: dict[str, str] = field(default_factory=dict)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of every RNG a training epoch draws from, a function of (seed, epoch, rank) only."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**31


def _world_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_everything(seed: int) -> None:
    """Seed every RNG a training step can draw from: torch (CPU and CUDA), Python ``random``, NumPy.

    timm's random-resized crop draws from Python's ``random``; dropout and drop-path from torch.
    """
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _gather(t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor over all ranks when running distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def _metrics(logits: Tensor, labels: Tensor, num_classes: int, per_class: bool = False, kind: str = "single_label",
             thresholds: list[float] | None = None, predictions: bool = False) -> dict:
    from .metrics import class_metrics, macro_f1
    from .objectives import task_loss

    loss = task_loss(logits, labels, kind).item()
    if kind == "multi_label":
        out = _finding_metrics(logits, labels, loss, per_class, thresholds)
        if predictions:  # findings 1 / 0 / NaN unknown, and each finding's sigmoid
            out["predictions"] = {"labels": labels.double().numpy(), "probs": torch.sigmoid(logits.double()).numpy()}
        return out

    y, p = labels.numpy(), logits.argmax(1).numpy()
    probs = torch.softmax(logits.double(), 1).numpy()
    # One-vs-rest AUC per class present with both positives and negatives; classes absent from y_true
    # are skipped instead of failing the whole evaluation. Their unweighted mean is the summary AUC.
    classes = class_metrics(y, probs, num_classes)
    out = {
        "loss": float(loss),
        "accuracy": float((p == y).mean()),
        "macro_f1": macro_f1(y, p, num_classes),  # over all num_classes classes (shpeft_core.metrics)
        "auc": float("nan") if classes["macro_auc"] is None else classes["macro_auc"],
    }
    if kind == "ordinal":
        from .label_metrics import quadratic_kappa

        kappa = quadratic_kappa(y, p, num_classes)
        out["kappa"] = float("nan") if kappa is None else kappa
    if per_class:
        out.update(n=int(y.size), per_class=classes)
    if predictions:
        out["predictions"] = {"labels": y.astype(np.int64), "preds": p.astype(np.int64), "probs": probs}
    return out


def _finding_metrics(logits: Tensor, labels: Tensor, loss: float, per_finding: bool,
                     thresholds: list[float] | None) -> dict:
    """Multi-label summary: mean AUROC ("auc"), macro-F1 and mean accuracy at per-finding thresholds
    (given, else the best ones on this data, i.e. chosen on validation when this is the validation split)."""
    from .label_metrics import finding_metrics

    nan = float("nan")
    got = finding_metrics(labels.double().numpy(), torch.sigmoid(logits.double()).numpy(), thresholds,
                          roc=per_finding)
    out = {"loss": float(loss),
           "accuracy": nan if got["mean_accuracy"] is None else got["mean_accuracy"],
           "macro_f1": nan if got["macro_f1"] is None else got["macro_f1"],
           "auc": nan if got["macro_auc"] is None else got["macro_auc"]}
    if per_finding:
        out.update(n=int(labels.shape[0]), per_finding=got)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, num_classes: int, device: str = "cpu", bf16: bool = True,
             per_class: bool = False, kind: str = "single_label", thresholds: list[float] | None = None,
             predictions: bool = False) -> dict:
    """loss, accuracy, macro_f1 and macro AUC over ``loader`` (all ranks when distributed).

    single_label / ordinal: macro_f1 averages F1 over all ``num_classes`` classes, a class absent from the
    split included (it counts 1 when never predicted, 0 when predicted); AUC is the unweighted mean of the
    one-vs-rest ROC AUCs of the classes with both positives and negatives here (``shpeft_core.metrics``);
    ordinal tasks also get ``kappa`` (quadratic weighted). With ``per_class`` the result also holds ``n``
    (samples) and ``per_class``: the confusion matrix and per-class sensitivity, specificity and AUC
    (``shpeft_core.metrics.class_metrics``). With ``predictions`` it holds ``predictions``: per sample, in
    loader order, ``labels`` and ``preds`` (int64 arrays, preds the logits' arg-max) and ``probs`` (float64
    softmax, [N, C]).
    multi_label: mean AUROC over findings, macro-F1 and mean accuracy at per-finding ``thresholds``
    (default: the best ones on this data); with ``per_class``, ``per_finding`` holds every finding's
    metrics, thresholds and ROC curve (``shpeft_core.label_metrics.finding_metrics``); ``predictions``
    holds ``labels`` (float [N, C]: 1 / 0 / NaN unknown) and ``probs`` (each finding's sigmoid).
    """
    net = unwrap(model)
    dev = torch.device(device)
    was_training = net.training
    net.eval()
    logits, labels = [], []
    for x, y in loader:
        with _autocast(dev, bf16):
            out = net(x.to(dev))
        logits.append(out.float().cpu())
        labels.append(y.cpu() if kind == "multi_label" else y.cpu().long())
    net.train(was_training)
    if not logits:
        raise ValueError("evaluation loader yielded no batches")
    all_logits = _gather(torch.cat(logits))
    all_labels = _gather(torch.cat(labels))
    return _metrics(all_logits, all_labels, num_classes, per_class, kind, thresholds, predictions)


def _param_groups(net: nn.Module, config: TrainConfig) -> tuple[list[dict], list[str]]:
    head = set(head_parameter_names(net))
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (call apply_sparse_training first)")
    head_lr = config.head_lr if config.head_lr is not None else config.lr
    groups = {"body": [], "head_decay": [], "head_no_decay": []}
    names = {"body": [], "head_decay": [], "head_no_decay": []}
    for n, p in named:
        key = "body" if n not in head else ("head_decay" if p.dim() > 1 else "head_no_decay")
        groups[key].append(p)
        names[key].append(n)
    spec = {
        "body": (config.lr, config.weight_decay),
        "head_decay": (head_lr, config.weight_decay),
        "head_no_decay": (head_lr, 0.0),
    }
    out, order = [], []
    for key in ("body", "head_decay", "head_no_decay"):
        if groups[key]:
            lr, wd = spec[key]
            out.append({"params": groups[key], "lr": lr, "weight_decay": wd, "base_lr": lr})
            order += names[key]
    return out, order


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    config: TrainConfig,
    *,
    num_classes: int,
    kind: str = "single_label",
    start_epoch: int = 0,
    resume_state: TrainState | None = None,
    on_epoch_end: Callable[[int, dict, TrainState], None] | None = None,
    validate_each_epoch: bool = True,
) -> list[dict]:
    """Train the trainable parameters (values + head) with AdamW; returns per-epoch metrics.

    The loss is the task ``kind``'s (``shpeft_core.objectives.task_loss``: cross-entropy, or binary
    cross-entropy per finding for multi_label). ``model`` may be wrapped in DDP: the wrapper is used for
    the forward (gradient sync), the inner module for names. Each epoch's dict holds epoch, train_loss,
    lr and evaluate()'s keys; with ``validate_each_epoch=False`` only the last epoch is evaluated (the
    others hold no validation keys), for callers that read the final model only. Validation never
    changes what is trained (every epoch reseeds), so both give the same weights.
    """
    from .objectives import check_kind, task_loss

    check_kind(kind)
    net = unwrap(model)
    device = torch.device(config.device)
    groups, names = _param_groups(net, config)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    params = [p for g in groups for p in g["params"]]
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:  # iterable loaders without a length: schedule per epoch instead of per step
        steps_per_epoch = None
    if steps_per_epoch == 0:
        raise ValueError("training loader yielded no batches")
    per = steps_per_epoch or 1
    total = config.epochs * per
    warmup = int(round(config.warmup_epochs * per))
    history: list[dict] = []
    step = start_epoch * (steps_per_epoch or 0)
    if resume_state is not None:
        by_name = dict(zip(names, params))
        if set(resume_state.trainable) != set(by_name):
            diff = sorted(set(resume_state.trainable) ^ set(by_name))
            raise TrainStateError(f"resume state does not match the model's trainable parameters: {diff[:5]}")
        with torch.no_grad():
            for n, p in by_name.items():
                src = resume_state.trainable[n]
                if tuple(src.shape) != tuple(p.shape):
                    raise TrainStateError(f"resume state {n}: shape {tuple(src.shape)} vs model {tuple(p.shape)}")
                p.copy_(src)
        opt.load_state_dict(resume_state.optimizer)
        start_epoch, step = resume_state.epoch, resume_state.step
        history = list(resume_state.history)
        import_choices(resume_state.kernel_choices)
    rank = _world_rank()
    for epoch in range(start_epoch, config.epochs):
        # Every RNG restarts from (seed, epoch, rank) and the loader jumps to this epoch's order, so an
        # epoch does not depend on what ran before it in the process (evaluation, an import that draws
        # from `random`, an interrupted run): resuming after epoch k is bit-identical to not stopping.
        seed_everything(epoch_seed(config.seed, epoch, rank))
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        loss_sum, n_seen = 0.0, 0
        for x, y in train_loader:
            factor = lr_factor(step if steps_per_epoch else epoch, total, warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, config.bf16):
                logits = model(x)
            loss = task_loss(logits.float(), y, kind, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip and config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.item() * y.shape[0]
            n_seen += y.shape[0]
        if n_seen == 0:
            raise ValueError(f"training loader yielded no batches in epoch {epoch}")
        metrics = {}
        if validate_each_epoch or epoch == config.epochs - 1:
            metrics = evaluate(model, val_loader, num_classes=num_classes, device=config.device, bf16=config.bf16,
                               kind=kind)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(1, n_seen),
                   "lr": opt.param_groups[0]["lr"], **metrics}
        history.append(metrics)
        if on_epoch_end is not None:
            state = TrainState(
                epoch=epoch + 1,
                step=step,
                trainable={n: p.detach().clone() for n, p in zip(names, params)},
                optimizer=opt.state_dict(),
                history=list(history),
                kernel_choices=export_choices(),
            )
            on_epoch_end(epoch, metrics, state)
    return history


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        raise TypeError("tensor in JSON part of train state")
    return x


def save_train_state(state: TrainState, dir_or_uri: str) -> dict:
    """Write ``tensors.safetensors`` then ``state.json`` (the commit marker) under ``dir_or_uri``."""
    tensors: dict[str, Tensor] = {f"trainable/{n}": t for n, t in state.trainable.items()}
    scalars: dict[str, dict] = {}
    for pid, pstate in state.optimizer["state"].items():
        for key, val in pstate.items():
            if isinstance(val, Tensor):
                tensors[f"optimizer/{pid}/{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    sha, size = _st.write(io.join_uri(dir_or_uri, "tensors.safetensors"), tensors, {"format": TRAIN_STATE_FORMAT})
    doc = {
        "format": TRAIN_STATE_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "trainable": list(state.trainable),
        "optimizer_param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": scalars,
        "history": state.history,
        "kernel_choices": state.kernel_choices,
        "tensors_sha256": sha,
    }
    io.write_sealed_json(io.join_uri(dir_or_uri, "state.json"), _jsonable(doc))
    return {"sha256": sha, "bytes": size}


def read_train_history(dir_or_uri: str) -> list[dict] | None:
    """The per-epoch history of the train state under ``dir_or_uri`` (its sealed state.json only, no
    tensors); None when there is none or it does not verify."""
    json_uri = io.join_uri(dir_or_uri, "state.json")
    try:
        return io.read_sealed_json(json_uri).get("history") or None if io.exists(json_uri) else None
    except io.DamagedFileError:
        return None


def load_train_state(dir_or_uri: str) -> TrainState:
    json_uri = io.join_uri(dir_or_uri, "state.json")
    st_uri = io.join_uri(dir_or_uri, "tensors.safetensors")
    if not io.exists(json_uri):
        raise TrainStateError(f"{json_uri}: no such file")
    try:
        doc = io.read_sealed_json(json_uri)
    except io.DamagedFileError as exc:
        raise TrainStateError(str(exc)) from None
    if doc.get("format") != TRAIN_STATE_FORMAT:
        raise TrainStateError(f"{json_uri}: format {doc.get('format')!r}, expected {TRAIN_STATE_FORMAT!r}")
    data = io.read_bytes(st_uri)
    if io.sha256_bytes(data) != doc["tensors_sha256"]:
        raise TrainStateError(f"{st_uri}: checksum does not match state.json")
    tensors, _ = _st.loads(data, where=st_uri)
    trainable = {n: tensors[f"trainable/{n}"] for n in doc["trainable"]}
    opt_state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = t
    for pid, vals in doc["optimizer_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(vals)
    return TrainState(
        epoch=int(doc["epoch"]),
        step=int(doc["step"]),
        trainable=trainable,
        optimizer={"state": opt_state, "param_groups": doc["optimizer_param_groups"]},
        history=doc["history"],
        kernel_choices=dict(doc.get("kernel_choices") or {}),
    )
