"""Orchestrator overhead: N tasks through run_job on a local Ray vs the same N trainings in a bare loop.

Both sides do the same work per task: its importance map, the combined pool map, the sparse model at
the same density/alpha, the same epochs, the delta saved and evaluated. Also times stage 1 (shared
importance) on a cache miss and on a hit.

Then the fixed cost per task (plain job) and per trial (sweep): the time from its submission to the end
of its first epoch, less the same first epoch in the bare loop (model, loaders, one epoch, in-process).
Epoch ends in the Ray workers are logged by a worker setup hook. And the packing of a job whose tasks each
train for T seconds (T ~ 3 s smoke, ~12 s default, ~60 s with --long): its training stage against the
ideal, (tasks x one task's bare time) / slots, and against the same tasks as waves of bare loops run
side by side in separate processes (what the cores give when every slot trains), and the share of the
slots' time spent inside the runs (slot use). The plain job runs twice: the second time every
importance map is cached, so its first wave waits on the worker pool's imports. And where start-up goes: submission to the run in its
worker (of which a new process and its imports), the first epoch and each later one beyond the bare
loop's, and the sweep job by phase. Prints tables and, last, one JSON line.

    python bench/orchestration.py [--smoke-test | --long] [--task-s S] [--cpus 2] [--tasks 4] [--only-startup]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
                     ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_var, _value)

import torch  # noqa: E402

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


def _job(store: str, specs, backbone_uri: str, epochs: int):
    from orchestrator.job.load import parse_job

    return parse_job({
        "backbone": {**BACKBONE, "source": backbone_uri},
        "store": store,
        "tasks": [s.model_dump(mode="json") for s in specs],
        # the bare loop pools every task's map, the target's included (and N = 1 has no other task)
        "importance": {"batches": 2, "batch_size": 16, "include_target": True},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0},
    })


def bare_loop(job, specs, store: str, threads: int) -> float:
    """The same stages in one process, one task after another."""
    from shpeft_core.delta import extract_delta, load_delta, apply_delta, save_delta
    from shpeft_core.importance import ImportanceConfig, combine_importance, compute_importance
    from shpeft_core.selection import hybrid_scores, select_mask
    from shpeft_core.sparse import apply_sparse_training
    from shpeft_core.train import TrainConfig, evaluate, fit
    from tasks.loaders import build_loader

    from shpeft_core.backbone import build_backbone
    from tasks.transforms import transform_for

    torch.set_num_threads(threads)
    bb = job.backbone.model_dump(mode="json")
    t0 = time.perf_counter()
    maps = {}
    for spec in specs:
        model = build_backbone(bb, spec.num_classes)
        loader = build_loader(spec, "train", transform=transform_for(model, train=False), batch_size=16,
                              shuffle=True, seed=0)
        maps[spec.name] = compute_importance(model, loader, ImportanceConfig(num_batches=2), num_classes=spec.num_classes)
    agnostic = combine_importance(list(maps.values()))
    for spec in specs:
        model = build_backbone(bb, spec.num_classes)
        apply_sparse_training(model, select_mask(hybrid_scores(maps[spec.name], agnostic, 0.5), 0.02))
        tr = build_loader(spec, "train", transform=transform_for(model, train=True), batch_size=16, shuffle=True)
        va = build_loader(spec, "val", transform=transform_for(model, train=False), batch_size=16)
        fit(model, tr, va, TrainConfig(epochs=job.training.epochs, lr=3e-3, warmup_epochs=0), num_classes=spec.num_classes)
        uri = f"{store}/{spec.name}.safetensors"
        save_delta(extract_delta(model, metadata={"alpha": "0.5", "estimator": "grad2", "importance_key": "bare",
                                                  "task": spec.name}), uri)
        fresh = build_backbone(bb, spec.num_classes)
        apply_delta(fresh, load_delta(uri))
        for split in ("val", "test"):
            evaluate(fresh, build_loader(spec, split, transform=transform_for(fresh, train=False), batch_size=16),
                     num_classes=spec.num_classes)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- fixed cost per task / trial, packing


def _timing_hook() -> None:
    """Worker setup hook: log when each run_plan starts and each of its epochs ends (SHPEFT_BENCH_TIMING).

    It imports nothing heavy itself: run_plan is wrapped when the worker first imports
    orchestrator.stages.task_run, so a cold process still pays its own imports inside the measured time.
    Logged per process: when it started and when that import finished.
    """
    import importlib.abc
    import importlib.util
    import json as _json
    import os as _os
    import sys as _sys
    import time as _time

    import psutil

    path = _os.environ["SHPEFT_BENCH_TIMING"]

    def log(**kv) -> None:
        with open(path, "a") as f:
            f.write(_json.dumps({**kv, "t": _time.time(), "pid": _os.getpid()}) + "\n")

    def wrap(tl) -> None:
        orig = tl.run_plan

        def run_plan(plan, *args, report=None, trial=None, **kwargs):
            log(kind="enter", task=plan.task_name, trial=trial)

            def timed(epoch, metrics, state):
                log(kind="epoch", task=plan.task_name, trial=trial, epoch=epoch)
                if report is not None:
                    report(epoch, metrics, state)

            return orig(plan, *args, report=timed, trial=trial, **kwargs)

        tl.run_plan = run_plan
        log(kind="imported", started=psutil.Process().create_time())

    class WrapOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, import_path, target=None):
            if name != "orchestrator.stages.task_run":
                return None
            _sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                wrap(module)

            spec.loader.exec_module = exec_and_wrap
            return spec

    if "orchestrator.stages.task_run" in _sys.modules:
        wrap(_sys.modules["orchestrator.stages.task_run"])
    else:
        _sys.meta_path.insert(0, WrapOnImport())


def _read_timing(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plans(job, specs, epochs: int, store: str):
    """Each task's TaskPlan as the pipeline builds it (its importance maps computed or loaded first)."""
    from orchestrator.job.plan import plan_for
    from orchestrator.stages.context import StageContext
    from orchestrator.stages.importance_maps import run_importance_stage
    from shpeft_core.backbone import build_backbone
    from shpeft_core.backbone import backbone_fingerprint

    fp = backbone_fingerprint(build_backbone(job.backbone.model_dump(mode="json"), 2))
    ctx = StageContext(job=job, store=job.store, job_id="bench", backbone_fp=fp, progress=False)
    imaps = run_importance_stage(ctx, specs, [])
    return [plan_for(job, s, fp, imaps, method="shpeft", seed=0, artifact=f"{store}/{s.name}.safetensors",
                     epochs=epochs) for s in specs]


def bare_trial(plan) -> dict[str, float]:
    """One task in this process, as a Ray task would run it: train (validating each epoch), write and
    evaluate the artifact. Returns the first epoch's time from the start, the mean later epoch, the total."""
    from orchestrator.stages.evaluation import evaluate_artifact
    from orchestrator.stages.task_run import run_plan

    ends: list[float] = []
    t0 = time.perf_counter()
    run_plan(plan, report=lambda epoch, metrics, state: ends.append(time.perf_counter()))
    train = time.perf_counter() - t0
    evaluate_artifact(plan)
    total = time.perf_counter() - t0
    later = [b - a for a, b in zip(ends, ends[1:])]
    return {"first_epoch_s": ends[0] - t0, "epoch_s": sum(later) / len(later) if later else ends[0] - t0,
            "train_s": train, "total_s": total}


def _side_child(plan, barrier, queue) -> None:
    import dataclasses

    # warm as the bare loop in this process is (imports done, one short run before the measured one)
    bare_trial(dataclasses.replace(plan, train={**plan.train, "epochs": 2}))
    barrier.wait()
    queue.put(bare_trial(plan))


def bare_side_by_side(plans) -> list[dict[str, float]]:
    """The bare loop in one fresh process per plan, all at once: what the machine gives when every slot
    trains (no Ray, no checkpoints), the baseline that separates sharing the cores from orchestration."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(len(plans)), ctx.Queue()
    procs = [ctx.Process(target=_side_child, args=(plan, barrier, queue)) for plan in plans]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return out


_SAYING_MODULES = ("orchestrator.stages.training", "orchestrator.stages.sweep")


def _patched_say(record: list):
    """Wrap the stages' `say` to timestamp the driver's '[task] training ...' and 'sweeping' lines."""
    import importlib

    import orchestrator.runtime.console as console

    def say(msg: str, progress: bool) -> None:
        record.append((time.time(), msg))
        console.say(msg, progress)

    for name in _SAYING_MODULES:
        importlib.import_module(name).say = say
    return console.say


def _restore_say(original) -> None:
    import importlib

    for name in _SAYING_MODULES:
        importlib.import_module(name).say = original


def _startup(events: list[dict], t_sub: float, bare: dict, **key) -> dict[str, float]:
    """Where one run's start-up went, from its submission (plain task) or Tune start (trial).

    to_worker_s: submission until run_plan starts in its worker; of that, cold_start_s is the part spent
    starting a new worker process and importing torch/timm/the project there (0 for a warm process);
    first_epoch_extra_s: run_plan's first epoch (model, loaders, epoch) less the bare loop's; fixed_s both;
    epoch_overhead_s: mean later epoch less the bare loop's (reporting, checkpoints, per-epoch artifact);
    run_s: run_plan's start to its last epoch's end.
    """
    (name, value), = key.items()
    mine = [e for e in events if e.get(name) == value]
    enter = min(e["t"] for e in mine if e["kind"] == "enter")
    pid = next(e["pid"] for e in mine if e["kind"] == "enter")
    ends = sorted(e["t"] for e in mine if e["kind"] == "epoch")
    proc = next((e for e in events if e["kind"] == "imported" and e["pid"] == pid), None)
    cold = 0.0
    if proc is not None and proc["t"] > t_sub:  # this run waited for its process to start and import
        cold = proc["t"] - max(t_sub, proc["started"])
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return {"to_worker_s": enter - t_sub, "run_s": ends[-1] - enter, "cold_start_s": max(0.0, cold),
            "first_epoch_extra_s": ends[0] - enter - bare["first_epoch_s"],
            "fixed_s": ends[0] - t_sub - bare["first_epoch_s"],
            "epoch_overhead_s": (sum(gaps) / len(gaps) - bare["epoch_s"]) if gaps else 0.0,
            "pid": pid}


def _mean_breakdown(parts) -> dict[str, float]:
    parts = list(parts)
    keys = ("to_worker_s", "cold_start_s", "first_epoch_extra_s", "fixed_s", "epoch_overhead_s")
    out = {k: round(sum(p[k] for p in parts) / len(parts), 3) for k in keys} if parts else {}
    out["processes"] = len({p["pid"] for p in parts})
    return out


def _sweep_phases(said: list, events: list[dict], sweep_s: float, t_job: float) -> dict[str, float]:
    """The sweep job's wall time by phase: before Tune starts, Tune start to the first trial's run_plan,
    trials, and after the last epoch (final evaluations, catalogue, plots)."""
    sweep_start = min(ts for ts, msg in said if msg.startswith("sweeping"))
    enters = [e["t"] for e in events if e["kind"] == "enter"]
    ends = [e["t"] for e in events if e["kind"] == "epoch"]
    return {"before_tune_s": round(sweep_start - t_job, 2), "tune_to_first_run_s": round(min(enters) - sweep_start, 2),
            "trials_s": round(max(ends) - min(enters), 2), "after_last_epoch_s": round(t_job + sweep_s - max(ends), 2)}


def startup_and_packing(work: str, weights: str, specs, args, timing_path: str) -> dict:
    import re

    import orchestrator.workflows.run as pipeline
    from shpeft_core.io import read_sealed_json

    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job
    from orchestrator.runtime.resources import trainer_slots

    target = args.task_s or (60.0 if args.long else 3.0 if args.smoke_test else 12.0)
    n = args.tasks
    cal_job = _job(os.path.join(work, "store-startup"), specs[:n], weights, 2)
    cal = bare_trial(_plans(cal_job, specs[:1], 2, os.path.join(work, "bare-cal"))[0])
    epochs = max(2, round((target - cal["first_epoch_s"]) / cal["epoch_s"]) + 1)
    job = _job(os.path.join(work, "store-startup"), specs[:n], weights, epochs)
    bare = bare_trial(_plans(job, specs[:1], epochs, os.path.join(work, "bare-sized"))[0])
    slots = trainer_slots(float(args.cpus), 0.0, job)
    print(f"one task trains {epochs} epochs: bare loop {bare['train_s']:.1f}s training + "
          f"{bare['total_s'] - bare['train_s']:.1f}s evaluation; first epoch {bare['first_epoch_s']:.2f}s "
          f"(incl. model and loaders), later epochs {bare['epoch_s']:.2f}s; {slots} slots", flush=True)
    # its own store: the job's importance cache stays as cold as the job would find it
    side_job = _job(os.path.join(work, "store-side"), specs[:n], weights, epochs)
    side = bare_side_by_side(_plans(side_job, [specs[i % n] for i in range(slots)], epochs,
                                    os.path.join(work, "bare-side")))
    side_total = max(r["total_s"] for r in side)
    print(f"{slots} bare loops side by side: {side_total:.1f}s each (one alone: {bare['total_s']:.1f}s; "
          f"later epochs {max(r['epoch_s'] for r in side):.2f}s)", flush=True)

    out: dict[str, Any] = {"target_train_s": target, "epochs": epochs, "slots": slots, "tasks": n,
                           "bare": {k: round(v, 2) for k, v in bare.items()},
                           "bare_side_by_side": {"total_s": round(side_total, 2),
                                                 "epoch_s": round(max(r["epoch_s"] for r in side), 3)}}
    said: list = []
    original = _patched_say(said)
    stage: dict[str, float] = {}
    original_train_all = pipeline.train_all

    def timed_train_all(*a, **kw):
        stage["t0"] = time.time()
        try:
            return original_train_all(*a, **kw)
        finally:
            stage["t1"] = time.time()

    def plain_job(job) -> dict[str, Any]:
        open(timing_path, "w").close()
        said.clear()
        t = time.time()
        res = run_job(job, progress=False)
        job_s = time.time() - t
        assert res.exit_code == 0, res.rows
        events = _read_timing(timing_path)
        submits = {m.group(1): ts for ts, msg in said if (m := re.match(r"\[(\S+)\] training ", msg))}
        # A task is handed to a worker when a slot is free for it; the first wave's slots are free from
        # the stage's start, so their start-up (a worker pool's too) counts from there.
        first_wave = sorted(submits, key=submits.get)[:slots]
        fixed = {task: _startup(events, stage["t0"] if task in first_wave else t_sub, bare, task=task)
                 for task, t_sub in submits.items()}
        ideal = n * bare["total_s"] / slots
        stage_s = stage["t1"] - stage["t0"]
        return {
            "fixed_per_task_s": round(sum(f["fixed_s"] for f in fixed.values()) / len(fixed), 2),
            "max_fixed_s": round(max(f["fixed_s"] for f in fixed.values()), 2),
            "submit_to_worker_s": round(sum(f["to_worker_s"] for f in fixed.values()) / len(fixed), 2),
            "training_stage_s": round(stage_s, 1), "job_s": round(job_s, 1), "ideal_s": round(ideal, 1),
            "ratio": round(stage_s / ideal, 3), "ratio_whole_job": round(job_s / ideal, 3),
            # the same tasks as waves of bare loops running side by side
            "ideal_side_by_side_s": round(-(-n // slots) * side_total, 1),
            "ratio_side_by_side": round(stage_s / (-(-n // slots) * side_total), 3),
            # the share of the stage's slot time spent inside the runs (run_plan's start to its last epoch)
            "slot_use": round(sum(f["run_s"] for f in fixed.values()) / (slots * stage_s), 3),
            "importance_computed": res.counters["importance_computed"],
            "breakdown": _mean_breakdown(fixed.values())}

    pipeline.train_all = timed_train_all
    try:
        out["job"] = plain_job(job)
        # The job again at another density: every importance map is cached, so the training stage starts as
        # soon as the job's worker pool is up, and its first wave waits for the pool's imports.
        out["job_cached"] = plain_job(parse_job({**job.model_dump(mode="json"),
                                                 "selection": {"density": 0.021, "alpha": 0.5}}))

        # A sweep: every trial trains all its epochs (ASHA's grace period = epochs), 2 trials per task.
        sweep_tasks = max(1, min(n, 2))
        sweep_job = parse_job({**job.model_dump(mode="json"),
                               "tasks": [s.model_dump(mode="json") for s in specs[:sweep_tasks]],
                               "sweep": {"enabled": True, "trials_per_task": 2, "density_range": [0.01, 0.03],
                                         "asha": {"grace_period": epochs}, "seed": 1}})
        open(timing_path, "w").close()
        said.clear()
        t = time.time()
        res = run_job(sweep_job, progress=False)
        sweep_s = time.time() - t
        assert res.exit_code == 0, res.rows
        events = _read_timing(timing_path)
        ledgers = []
        for r in res.rows:
            root = f"{res.store}/sweeps/{r['task']}-{r['config_hash']}"
            ledgers += read_sealed_json(f"{root}/ledger.json")["trials"]
        trial_parts = [_startup(events, tr["started_at"], bare, trial=tr["trial_id"]) for tr in ledgers
                       if tr["started_at"] and any(e.get("trial") == tr["trial_id"] for e in events)]
        trial_fixed = [p["fixed_s"] for p in trial_parts]
        sweep_start = min(ts for ts, msg in said if msg.startswith("sweeping"))
        first_trial = min((e["t"] for e in events if e["kind"] == "epoch" and e["epoch"] == 0), default=float("nan"))
        trials = len(ledgers)
        ideal = trials * bare["train_s"] / slots
        side_train = max(r["train_s"] for r in side)
        out["sweep"] = {"trials": trials,
                        "fixed_per_trial_s": round(sum(trial_fixed) / len(trial_fixed), 2) if trial_fixed else None,
                        "max_fixed_s": round(max(trial_fixed), 2) if trial_fixed else None,
                        "tune_start_to_first_epoch_s": round(first_trial - sweep_start - bare["first_epoch_s"], 2),
                        "job_s": round(sweep_s, 1), "ideal_s": round(ideal, 1), "ratio_whole_job": round(sweep_s / ideal, 3),
                        "ideal_side_by_side_s": round(trials * side_train / slots, 1),
                        "ratio_side_by_side": round(sweep_s / (trials * side_train / slots), 3),
                        "slot_use": round(sum(p["run_s"] for p in trial_parts) / (slots * sweep_s), 3),
                        "breakdown": _mean_breakdown(trial_parts), "phases": _sweep_phases(said, events, sweep_s, t)}
    finally:
        _restore_say(original)
        pipeline.train_all = original_train_all
    return out


def print_startup(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    j, c, s = res["job"], res["job_cached"], res["sweep"]
    t = Table(title=f"fixed cost per task/trial (target <= 5 s; bare first epoch {res['bare']['first_epoch_s']}s, "
                    f"later epochs {res['bare']['epoch_s']}s)")
    for col in ("kind", "runs", "fixed cost mean (s)", "max (s)", "submit -> worker (s)", "ok"):
        t.add_column(col)
    for kind, r in (("plain job", j), ("plain job, maps cached", c)):
        t.add_row(kind, str(res["tasks"]), str(r["fixed_per_task_s"]), str(r["max_fixed_s"]),
                  str(r["submit_to_worker_s"]), "yes" if r["max_fixed_s"] <= 5 else "NO")
    t.add_row("sweep", str(s["trials"]), str(s["fixed_per_trial_s"]), str(s["max_fixed_s"]),
              f"tune start -> 1st epoch {s['tune_start_to_first_epoch_s']}",
              "yes" if (s["max_fixed_s"] or 0) <= 5 else "NO")
    Console(width=160).print(t)
    p = Table(title=f"packing: each task trains ~{res['target_train_s']:.0f}s ({res['epochs']} epochs, bare "
                    f"{res['bare']['total_s']}s with evaluation); {res['slots']} slots; target ratio <= 1.15")
    for col in ("kind", "runs", "ideal (s)", "training stage (s)", "ratio", "whole job (s)", "ratio whole job",
                "side-by-side bare (s)", "ratio vs side-by-side", "slot use"):
        p.add_column(col)
    for kind, r in (("plain job", j), ("plain job, maps cached", c)):
        p.add_row(kind, str(res["tasks"]), str(r["ideal_s"]), str(r["training_stage_s"]), str(r["ratio"]),
                  str(r["job_s"]), str(r["ratio_whole_job"]), str(r["ideal_side_by_side_s"]),
                  f"{r['ratio_side_by_side']} (stage)", str(r["slot_use"]))
    p.add_row("sweep", str(s["trials"]), str(s["ideal_s"]), "-", "-", str(s["job_s"]), str(s["ratio_whole_job"]),
              str(s["ideal_side_by_side_s"]), f"{s['ratio_side_by_side']} (job)", str(s["slot_use"]))
    Console(width=160).print(p)
    b = Table(title="where start-up goes (means per run, s): submission -> run_plan in its worker (of which "
                    "starting a process + imports), first epoch beyond the bare loop's, each later epoch beyond it")
    for col in ("kind", "worker processes", "submit -> run_plan", "cold process + imports", "first epoch extra",
                "fixed", "per later epoch"):
        b.add_column(col)
    for kind, part in (("plain job", j["breakdown"]), ("plain job, maps cached", c["breakdown"]),
                       ("sweep", s["breakdown"])):
        if part:
            b.add_row(kind, str(part["processes"]), str(part["to_worker_s"]), str(part["cold_start_s"]),
                      str(part["first_epoch_extra_s"]), str(part["fixed_s"]), str(part["epoch_overhead_s"]))
    Console(width=160).print(b)
    print("sweep job by phase (s): " + ", ".join(f"{k} {v}" for k, v in s["phases"].items()), flush=True)
    print("slot use: the share of the slots' time (slots x stage or job) spent inside the runs, from run_plan's "
          "start to its last epoch", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="N = 1, 2 with one epoch (about a minute)")
    ap.add_argument("--long", action="store_true", help="size each task to train about 60 s (packing check)")
    ap.add_argument("--task-s", type=float, default=None,
                    help="size each task to train about this long (default 60 with --long, else 12; 3 smoke)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4, help="tasks in the fixed-cost / packing job")
    ap.add_argument("--only-startup", action="store_true", help="skip the N-task overhead and cache sections")
    args = ap.parse_args()

    import ray
    import safetensors.torch
    import timm

    from orchestrator.stages.importance_maps import run_importance_stage
    from orchestrator.stages.context import StageContext
    from orchestrator.workflows.run import run_job
    from shpeft_core.backbone import backbone_fingerprint
    from shpeft_core.backbone import build_backbone
    from tasks.synthetic import write_task_family

    ns = (1, 2) if args.smoke_test else (1, 2, 4)
    epochs = 1 if args.smoke_test else 2
    work = tempfile.mkdtemp(prefix="shpeft-bench-orch-")
    try:
        torch.manual_seed(0)
        weights = os.path.join(work, "backbone.safetensors")
        m = timm.create_model(BACKBONE["name"], num_classes=10, **BACKBONE["kwargs"])
        safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, weights)
        # --long: 10x the images, so a ~60 s task is tens of epochs, not hundreds of 0.1 s ones
        specs = write_task_family(os.path.join(work, "data"), n_tasks=max(*ns, args.tasks),
                                  images_per_task=1200 if args.long else 120,
                                  formats=("medmnist",), seed=5)
        timing_path = os.path.join(work, "timing.jsonl")
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, runtime_env={"worker_process_setup_hook": _timing_hook,
                              "env_vars": {"SHPEFT_BENCH_TIMING": timing_path, "PYTHONPATH": os.pathsep.join(
                                  p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                              os.environ.get("PYTHONPATH")) if p)}})
        ray_init_s = time.perf_counter() - t
        rows = {}
        cache: dict = {}
        for n in () if args.only_startup else ns:
            job = _job(os.path.join(work, f"store-n{n}"), specs[:n], weights, epochs)
            t = time.perf_counter()
            res = run_job(job, progress=False)
            orch = time.perf_counter() - t
            assert res.exit_code == 0, res.rows
            bare = bare_loop(job, specs[:n], os.path.join(work, f"bare-n{n}"), args.cpus)
            rows[n] = {"orchestrator_s": round(orch, 2), "bare_loop_s": round(bare, 2),
                       "ratio": round(orch / bare, 2), "overhead_per_task_s": round((orch - bare) / n, 2)}
            print(f"N={n}: orchestrator {orch:.1f}s, bare loop {bare:.1f}s, ratio {orch / bare:.2f}, "
                  f"overhead per task {(orch - bare) / n:+.1f}s", flush=True)

        if not args.only_startup:
            job = _job(os.path.join(work, "store-cache"), specs[:2], weights, epochs)
            fp = backbone_fingerprint(build_backbone(job.backbone.model_dump(mode="json"), 2))
            ctx = StageContext(job=job, store=job.store, job_id="bench", backbone_fp=fp, progress=False,
                               counters={"importance_computed": 0, "importance_loaded": 0})
            counters = ctx.counters
            times = []
            for _ in range(2):
                t = time.perf_counter()
                run_importance_stage(ctx, specs[:2], [])
                times.append(time.perf_counter() - t)
            cache = {"miss_s": round(times[0], 3), "hit_s": round(times[1], 3),
                     "speedup": round(times[0] / times[1], 1),
                     "computed": counters["importance_computed"], "loaded": counters["importance_loaded"]}
            print(f"importance stage (2 datasets + pool): miss {times[0]:.2f}s, hit {times[1]:.3f}s "
                  f"({cache['speedup']}x)", flush=True)
        startup = startup_and_packing(work, weights, specs, args, timing_path)
        print_startup(startup)
        ray.shutdown()
        print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cpus, ray {ray.__version__}",
                          "cpus": args.cpus, "epochs": epochs, "ray_init_s": round(ray_init_s, 2),
                          "n": rows, "importance_cache": cache, "startup": startup}))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # Run as bench.orchestration, not __main__: the worker setup hook is exported by reference to this module.
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.orchestration import main as _main

    _main()
