"""What trains one run: build the method's model from its plan, train, checkpoint, write the artifact.

``run_plan`` is the loop itself (no Ray). Data-parallel runs (several workers) go through Ray Train:
``train_task_loop`` is their worker function. A one-worker run needs no worker group: it runs
``run_plan`` directly in a Ray task (``run_with_checkpoints``, checkpointing each epoch into the store
and resuming from the newest checkpoint when the task is retried) or in a Tune trial, which starts
in about a second instead of the tens of seconds a Ray Train worker group takes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

__all__ = ["train_task_loop", "run_plan", "run_with_checkpoints", "latest_checkpoint", "val_metric_value",
           "build_task_model"]


def val_metric_value(metrics: dict[str, Any], metric: str) -> float:
    for key in (f"val_{metric}", metric):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    raise KeyError(f"metric {metric!r} not found in epoch metrics {sorted(metrics)}")


def build_task_model(plan) -> tuple[torch.nn.Module, Any, int, dict[str, str]]:
    """The plan's backbone with its head initialised and exactly the method's parameters trainable.

    Returns (model to train, the method's save handle, trainable parameter count, what the artifact's
    metadata records about the mask: ``selected`` entries and, where the mask knows it, ``effective_alpha``,
    the share of them the task-specific ranking chose).
    """
    from shpeft_core.backbone import build_backbone
    from shpeft_core.importance import ImportanceMap, load_warm_head
    from shpeft_core.methods import get_method
    from shpeft_core.sparse import count_trainable

    method = get_method(plan.method)
    model = build_backbone(plan.backbone, plan.num_classes)
    specific = ImportanceMap.load(plan.specific_uri) if plan.specific_uri else None
    head_map = specific if plan.head_map_uri == plan.specific_uri else ImportanceMap.load(plan.head_map_uri)
    if plan.head_init == "warm" and head_map is not None:
        load_warm_head(model, head_map)
    mask, info = None, {}
    if method.uses_mask:
        from shpeft_core.selection import effective_alpha, mask_size

        agnostic = ImportanceMap.load(plan.agnostic_uri) if plan.agnostic_uri and plan.alpha < 1 else None
        mask = method.mask(model, specific=specific, agnostic=agnostic, density=plan.density, alpha=plan.alpha,
                           granularity=plan.granularity, mix=plan.mix, seed=plan.seed, rules=plan.rules,
                           equal_budget=plan.equal_budget)
        info["selected"] = str(mask_size(mask))
        share = effective_alpha(mask)
        if share is not None:
            info["effective_alpha"] = repr(float(share))
    net, handle = method.prepare(model, mask=mask, settings=plan.settings)
    return net, handle, count_trainable(net), info


def _push_progress(cfg: dict[str, Any], event: dict[str, Any]) -> None:
    board = cfg.get("board")
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
    """Ray Train worker entry point (TorchTrainer ``train_loop_per_worker``).

    ``cfg`` holds the run's :class:`~orchestrator.job.plan.TaskPlan` under "plan" and Ray-only extras
    beside it: "board" (progress actor), "fault" (test hook), "trial" (sweep trial id).
    """
    import ray.train
    import ray.train.torch

    from shpeft_core.train import load_train_state, save_train_state

    plan = cfg["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if plan.use_gpu else torch.device("cpu")

    start_epoch, resume_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = load_train_state(d)
        start_epoch = int(resume_state.epoch)  # completed epochs
        _push_progress(cfg, {"kind": "message", "task": plan.task_name,
                             "message": f"resuming after {start_epoch} completed epoch(s) from the last checkpoint"})
    # Index of the last epoch the restored checkpoint covers; -1 when starting fresh.
    resumed_from = start_epoch - 1 if checkpoint is not None else -1

    def report(epoch: int, report: dict[str, Any], state) -> None:
        _maybe_inject_fault(cfg, epoch)
        report["resumed_from_epoch"] = resumed_from
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="shpeft-ckpt-") as d:
                save_train_state(state, d)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)

    run_plan(plan, rank=rank, world=world, device=device, resume_state=resume_state,
             wrap=(lambda m: ray.train.torch.prepare_model(m)) if world > 1 or plan.use_gpu else None,
             report=report, board=cfg.get("board"), trial=cfg.get("trial"),
             trial_artifact=cfg.get("trial_artifact"))


def run_plan(plan, *, rank: int = 0, board=None, trial: str | None = None, **kwargs) -> dict[str, Any]:
    """Train one plan in this process (a Ray Train worker, or a plain Ray task for one-worker runs).

    Rank 0's output (prints, warnings, an error's traceback) goes to the task's log in the store; see
    :func:`_train_plan` for the arguments.
    """
    from orchestrator.runtime.tasklog import captured_output

    with captured_output(board if rank == 0 else None, plan.task_name, trial):
        return _train_plan(plan, rank=rank, board=board, trial=trial, **kwargs)


def _train_plan(plan, *, rank: int = 0, world: int = 1, device=None, resume_state=None, wrap=None, report=None,
                board=None, trial: str | None = None, trial_artifact=None,
                validate_each_epoch: bool = True) -> dict[str, Any]:
    """Train one plan in this process.

    After every epoch ``report(epoch, metrics, TrainState)`` is called (checkpointing is the caller's);
    rank 0 writes the trial artifact after epoch e to ``trial_artifact(e)`` (a sweep trial; no write
    where it returns None), and the plan's artifact at the end. Returns the last epoch's metrics plus the artifact's sha256 / bytes / kind.
    ``validate_each_epoch=False``: validation after the last epoch only (same weights; no per-epoch curve).
    """
    from shpeft_core.methods import save_artifact
    from shpeft_core.metrics import json_safe
    from shpeft_core.train import TrainConfig, fit
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for
    from tasks.spec import TaskSpec

    torch.set_num_threads(max(1, int(os.environ.get("SHPEFT_TORCH_THREADS", "1"))))
    device = device or torch.device("cpu")
    spec = TaskSpec.model_validate(plan.task)
    model, handle, trainable, mask_info = build_task_model(plan)
    train_tf = transform_for(model, train=True)
    eval_tf = transform_for(model, train=False)
    model = model.to(device)
    model = wrap(model) if wrap is not None else model
    train_cfg = TrainConfig(**{**plan.train, "device": str(device)})
    train_loader = build_loader(spec, "train", transform=train_tf, batch_size=plan.batch_size, shuffle=True,
                                seed=train_cfg.seed, num_workers=plan.data_workers, rank=rank, world_size=world,
                                cache=plan.data_cache)
    val_loader = build_loader(spec, "val", transform=eval_tf, batch_size=plan.batch_size,
                              num_workers=plan.data_workers, cache=plan.data_cache)
    epochs = int(train_cfg.epochs)
    last: dict[str, Any] = {}

    def write_artifact(uri: str, epoch: int, history: list[dict]) -> dict[str, Any]:
        # The per-epoch history travels inside the artifact, so a copied sweep trial keeps its own curves.
        meta = {**plan.metadata, **mask_info, "epochs_trained": str(epoch + 1), "trainable": str(trainable),
                "history": json.dumps(json_safe(history), allow_nan=False)}
        return save_artifact(model, handle, plan.method, uri, meta)  # extract_delta unwraps DDP itself

    def on_epoch_end(epoch: int, metrics: dict[str, Any], state) -> None:
        validated = validate_each_epoch or epoch == epochs - 1
        value = val_metric_value(metrics, plan.metric) if validated else None
        # fit() returns evaluate()'s keys unprefixed; they are validation metrics.
        out = {
            (k_ if k_ in ("epoch", "train_loss", "lr") else f"val_{k_}"): float(v)
            for k_, v in metrics.items() if isinstance(v, (int, float)) and v is not None
        }
        out.update(epoch=epoch, epochs=epoch + 1, val_metric=value, trainable=trainable)
        last.clear()
        last.update(out)
        if rank == 0:
            uri = trial_artifact(epoch) if trial_artifact is not None else None
            if uri:
                write_artifact(uri, epoch, state.history)
            if board is not None:
                board.push.remote({"kind": "epoch", "task": plan.task_name, "trial": trial, "epoch": epoch,
                                   "epochs": epochs, "metric": plan.metric, "metrics": out})
        if report is not None:
            report(epoch, out, state)

    history = fit(model, train_loader, val_loader, train_cfg, num_classes=plan.num_classes, kind=plan.kind,
                  start_epoch=0, resume_state=resume_state, on_epoch_end=on_epoch_end,
                  validate_each_epoch=validate_each_epoch)

    if rank == 0 and plan.artifact_uri:
        last.update(write_artifact(plan.artifact_uri, epochs - 1, history))
    return last


def latest_checkpoint(root: str):
    """(epochs covered, TrainState) of the newest readable checkpoint under ``root``, or (0, None).

    A checkpoint folder is ``epoch-<k>`` with its state.json written last, so a half-written one
    fails to load and the one before it is used.
    """
    from shpeft_core.train import TrainStateError, load_train_state

    from orchestrator.store.layout import checkpoint_dir, checkpoint_epochs

    for k in checkpoint_epochs(root):
        try:
            return k, load_train_state(checkpoint_dir(root, k))
        except (TrainStateError, FileNotFoundError, ValueError):
            continue
    return 0, None


def run_with_checkpoints(plan, checkpoint_root: str, *, board=None, fault=None, keep: int = 2, trial=None,
                         trial_artifact=None, after_epoch=None) -> dict[str, Any]:
    """One-worker training in this process with its TrainState saved each epoch under ``checkpoint_root``.

    When the process dies and the task is retried, training resumes after the newest checkpoint.
    ``after_epoch(epoch, metrics)`` is called once that epoch's checkpoint (and trial artifact) is written.
    """
    from shpeft_core.io import remove
    from shpeft_core.train import save_train_state

    from orchestrator.store.layout import checkpoint_dir

    start, resume_state = latest_checkpoint(checkpoint_root)
    if resume_state is not None and board is not None:
        board.push.remote({"kind": "message", "task": plan.task_name,
                           "message": f"resuming after {start} completed epoch(s) from the last checkpoint"})
    cfg = {"fault": fault}

    def report(epoch: int, metrics: dict[str, Any], state) -> None:
        _maybe_inject_fault(cfg, epoch)
        save_train_state(state, checkpoint_dir(checkpoint_root, epoch + 1))
        if epoch + 1 - keep > 0:
            remove(checkpoint_dir(checkpoint_root, epoch + 1 - keep), recursive=True)
        if after_epoch is not None:
            after_epoch(epoch, {**metrics, "resumed_from_epoch": start - 1 if resume_state is not None else -1})

    out = run_plan(plan, resume_state=resume_state, report=report, board=board, trial=trial,
                   trial_artifact=trial_artifact)
    out["resumed_from_epoch"] = start - 1 if resume_state is not None else None
    return out
