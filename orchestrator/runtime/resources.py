"""Cluster sizing: what one worker holds, how many trainers fit at once, and Ray's view of the store.

See docs/orchestrator.md for why the slot rule cannot deadlock.
"""

from __future__ import annotations

import math
import os
from typing import Any

from shpeft_core.io import local_path

from orchestrator.job.spec import JobSpec

# Reserved by each Tune trial function: Tune rejects 0, and the trial itself only waits on its trainer.
TRIAL_CPU = 0.01

__all__ = ['TRIAL_CPU', 'cluster_resources', 'worker_resources', 'trainer_slots', 'ray_storage']


def cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def worker_resources(job: JobSpec) -> dict[str, float]:
    tr = job.training
    gpus = tr.gpus_per_worker if tr.gpus_per_worker > 0 else (1.0 if tr.use_gpu else 0.0)
    out = {"CPU": tr.cpus_per_worker}
    if gpus:
        out["GPU"] = gpus
    return out


def trainer_slots(cpus: float, gpus: float, job: JobSpec, *, per_slot_overhead_cpu: float = 0.0,
                  user_limit: int | None = None) -> int:
    """How many trainers fit at once: every one of them can hold all its workers simultaneously.

    ``per_slot_overhead_cpu`` is what each slot reserves besides its workers (a Tune trial's 0.01 CPU).
    Raises when not even one trainer fits, since it would wait forever.
    """
    res = worker_resources(job)
    w = job.training.workers_per_task
    need_cpu = w * res["CPU"] + per_slot_overhead_cpu
    need_gpu = w * res.get("GPU", 0.0)
    fit = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fit = min(fit, math.floor(gpus / need_gpu + 1e-9))
    if fit < 1:
        raise RuntimeError(
            f"one task needs {w} workers x {res} (+{per_slot_overhead_cpu} CPU) but the cluster has "
            f"{cpus} CPUs and {gpus} GPUs; lower training.workers_per_task / cpus_per_worker"
        )
    return max(1, min(fit, user_limit or fit))


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train/Tune: local paths direct, URIs via fsspec."""
    path = local_path(uri)
    if path is not None:
        return os.path.abspath(path), None
    import pyarrow.fs
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(uri)
    return p, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
