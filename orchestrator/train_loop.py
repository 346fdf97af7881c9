"""What runs inside each Ray Train worker: build the sparse model, train, checkpoint, write the delta.

Everything arrives as a plain JSON-able dict (``loop_config``) so the same function serves the plain
per-task trainer and every sweep trial.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

__all__ = ["train_task_loop", "build_backbone", "val_metric_value", "build_sparse_model"]


def build_backbone(backbone: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The job's backbone with a fresh head; seeded so a random-init backbone is reproducible everywhere."""
    from shpeft_core.backbone import BackboneSpec, create_backbone

    spec = BackboneSpec(name=backbone["name"], source=backbone.get("source"), kwargs=dict(backbone.get("kwargs") or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(spec, num_classes)


def val_metric_value(metrics: dict[str, Any], metric: str) -> float:
    for key in (f"val_{metric}", metric):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    raise KeyError(f"metric {metric!r} not found in epoch metrics {sorted(metrics)}")


def build_sparse_model(cfg: dict[str, Any]) -> tuple[torch.nn.Module, int]:
    """Backbone + hybrid mask at (density, alpha) + sparse-delta modules; returns (model, k)."""
    from shpeft_core.importance import ImportanceMap
    from shpeft_core.selection import hybrid_scores, mask_size, select_mask
    from shpeft_core.sparse import apply_sparse_training

    model = build_backbone(cfg["backbone"], cfg["num_classes"])
    specific = ImportanceMap.load(cfg["specific_uri"])
    agnostic = ImportanceMap.load(cfg["agnostic_uri"]) if cfg.get("agnostic_uri") else None
    scores = hybrid_scores(specific, agnostic, float(cfg["alpha"]))
    mask = select_mask(scores, float(cfg["density"]), granularity=cfg["granularity"])
    apply_sparse_training(model, mask)
    return model, mask_size(mask)


def _push_progress(cfg: dict[str, Any], event: dict[str, Any]) -> None:
    board = cfg.get("progress_board")
    if board is not None:
        board.push.remote(event)


def _maybe_inject_fault(cfg: dict[str, Any], epoch: int) -> None:
    """Test hook: kill this worker process once, at the end of the given epoch, before it checkpoints."""
    fault = cfg.get("fault")
    if not fault or int(fault["epoch"]) != epoch:
        return
    from shpeft_core.io import atomic_write_bytes, exists

    if exists(fault["marker"]):
        return
    atomic_write_bytes(fault["marker"], json.dumps({"epoch": epoch}).encode())
    # Train V2's controller collects reports by polling the workers; give it a few polls to
    # register the previous epoch's checkpoint, as a real crash later in an epoch would.
    time.sleep(3.0)
    os._exit(1)


def train_task_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker entry point (TorchTrainer ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    from shpeft_core.delta import extract_delta, save_delta
    from shpeft_core.train import TrainConfig, fit, load_train_state, save_train_state
    from tasks.data import build_loader, transform_for
    from tasks.spec import TaskSpec

    torch.set_num_threads(max(1, int(cfg.get("torch_threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")

    spec = TaskSpec.model_validate(cfg["task"])
    model, k = build_sparse_model(cfg)
    train_tf = transform_for(model, train=True)
    eval_tf = transform_for(model, train=False)
    model = ray.train.torch.prepare_model(model) if world > 1 or cfg["use_gpu"] else model

    train_cfg = TrainConfig(**{**cfg["train"], "device": str(device)})
    train_loader = build_loader(
        spec, "train", transform=train_tf, batch_size=cfg["batch_size"], shuffle=True, seed=train_cfg.seed,
        num_workers=cfg.get("data_workers", 0), rank=rank, world_size=world, drop_last=False,
    )
    val_loader = build_loader(
        spec, "val", transform=eval_tf, batch_size=cfg["batch_size"], num_workers=cfg.get("data_workers", 0),
    )

    start_epoch, resume_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = load_train_state(d)
        start_epoch = int(resume_state.epoch)  # completed epochs
        _push_progress(cfg, {"kind": "message", "task": cfg["task_name"],
                             "message": f"resuming after {start_epoch} completed epoch(s) from the last checkpoint"})
    # Index of the last epoch the restored checkpoint covers; -1 when starting fresh.
    resumed_from = start_epoch - 1 if checkpoint is not None else -1
    epochs = int(train_cfg.epochs)
    metric = spec.metric

    def write_delta(uri: str, epoch: int) -> dict[str, Any]:
        meta = {**cfg["delta_metadata"], "epochs_trained": str(epoch + 1), "trainable_values": str(k)}
        delta = extract_delta(model, metadata=meta)  # unwraps DDP itself
        return save_delta(delta, uri)

    def on_epoch_end(epoch: int, metrics: dict[str, Any], state) -> None:
        _maybe_inject_fault(cfg, epoch)
        value = val_metric_value(metrics, metric)
        # fit() returns evaluate()'s keys unprefixed; they are validation metrics.
        report = {
            (k_ if k_ in ("epoch", "train_loss", "lr") else f"val_{k_}"): float(v)
            for k_, v in metrics.items() if isinstance(v, (int, float)) and v is not None
        }
        report.update(epoch=epoch, val_metric=value, trainable_values=k, resumed_from_epoch=resumed_from)
        if rank == 0:
            if cfg.get("trial_delta_uri"):
                write_delta(cfg["trial_delta_uri"], epoch)
            _push_progress(cfg, {"kind": "epoch", "task": cfg["task_name"], "trial": cfg.get("trial_name"),
                                 "epoch": epoch, "epochs": epochs, "metric": metric, "metrics": report})
            with tempfile.TemporaryDirectory(prefix="shpeft-ckpt-") as d:
                save_train_state(state, d)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)

    fit(model, train_loader, val_loader, train_cfg, num_classes=cfg["num_classes"],
        start_epoch=start_epoch, resume_state=resume_state, on_epoch_end=on_epoch_end)

    if rank == 0 and cfg.get("final_delta_uri"):
        write_delta(cfg["final_delta_uri"], epochs - 1)
