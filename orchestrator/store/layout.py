"""The store layout: every path shpeft writes under a job's store comes from here.

```
<store>/jobs/<job_id>.json                         the validated job
<store>/importance/<key>.safetensors               one dataset's map (+ its warmed head)
<store>/importance/agnostic-<key>.safetensors      a combined task-agnostic map
<store>/runs/<job_id>-<task>-<hash>/checkpoints/epoch-<n>/   a run's checkpoints (and Ray Train's runs)
<store>/sweeps/<task>-<hash>/                      a sweep: ledger.json, trials.json, trials/, runs/
<store>/sweeps/_tune/<job_id>/                     Tune's own state while a sweep runs
<store>/deltas/<task>/<job_id>-<hash>.safetensors  a task's artifact (.lora/ folder, .checkpoint.safetensors)
<store>/deltas/<task>/<job_id>-<hash>.eval.json    the artifact's evaluation: per-epoch history, val/test
                                                   confusion matrices, per-class sensitivity, specificity
                                                   and AUC, class names, the artifact's sha256
<store>/deltas/<task>/latest.json                  pointer to the task's newest verified artifact
<store>/catalogue/<job_id>.parquet                 results, one row per task
<store>/plots/<job_id>/*.png                       plots of a run
<store>/plots/<job_id>/report.md, report.json      `shpeft report`: the job's report (PNGs beside it)
<store>/reports/<id>/                              `shpeft compare`: results.parquet, report.md, PNGs, artifacts/
<store>/backbones/                                 the demo's pre-trained backbone
<store>/data/, data-smoke/, demo-job.yaml          the demo's generated datasets and its job file
<store>/logs/<job_id>/driver.log, <task>.log      a job's console lines and each task's worker output
<store>/mlruns/, tensorboard/<job_id>/             tracking of a local store without a tracking URI or folder
<store>/data-cache/digests/<root key>.json         per-file sha256 of a dataset root, by content key (tasks/digests.py)
<store>/data-cache/arrays/<npz sha256>/*.npy       .npz images decompressed once, read on demand (tasks/datacache.py)
```

Nothing else in shpeft joins a path under a store (a test checks the source tree); what a module writes
inside a folder it is given here (a report's PNGs) is named by that module.

An artifact's evaluation file sits beside it under the artifact's name (see ``eval_file``), wherever the
artifact is (``shpeft compare`` writes them under its report folder too).

Artifacts carry the job id and the task's config hash in their name, so two jobs in one store never
overwrite each other's files, even for tasks of the same name.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from shpeft_core.io import atomic_write_bytes, exists, join_uri, read_bytes

__all__ = [
    "normalise_store", "job_file", "importance_map", "agnostic_map", "run_root", "sweep_root", "artifact_uri", "task_artifact",
    "eval_file", "latest_pointer", "write_latest", "latest_artifact", "row_verified", "catalogue_dir", "catalogue_file",
    "plots_dir", "job_report_file", "report_dir", "backbones_dir", "sweep_trial_artifact",
    "sweep_summary", "read_sweep_summary", "sweep_checkpoints", "sweep_ledger", "tune_root", "tune_train_root", "train_runs_root",
    "run_checkpoints", "checkpoint_dir", "checkpoint_epochs", "fault_marker", "logs_dir", "log_file",
    "compare_results", "compare_tuning", "compare_artifacts_dir", "compare_report_file", "job_report_json", "backbone_file",
    "demo_data_dir", "demo_job_file", "deltas_dir", "job_evaluation_files", "damaged_copy", "mlflow_default_dir", "tensorboard_dir", "data_cache",
]

def normalise_store(store: str) -> str:
    """Local folders become absolute paths (Ray rejects relative storage paths); URIs stay as they are."""
    if "://" in store:
        return store.rstrip("/")
    return os.path.abspath(os.path.expanduser(store))


def job_file(store: str, job_id: str) -> str:
    return join_uri(store, "jobs", f"{job_id}.json")


def importance_map(store: str, key: str) -> str:
    return join_uri(store, "importance", f"{key}.safetensors")


def agnostic_map(store: str, key: str) -> str:
    return join_uri(store, "importance", f"agnostic-{key}.safetensors")


def run_root(store: str, job_id: str, task: str, config_hash: str) -> str:
    return join_uri(store, "runs", f"{job_id}-{task}-{config_hash}")


def sweep_root(store: str, task: str, config_hash: str) -> str:
    return join_uri(store, "sweeps", f"{task}-{config_hash}")


def sweep_trial_artifact(sweep_root_uri: str, trial_id: str, epochs: int | str | None, method: str) -> str:
    """A sweep trial's artifact holding its weights after ``epochs`` epochs."""
    return artifact_uri(join_uri(sweep_root_uri, "trials"), f"{trial_id}-e{epochs}", method)


def sweep_summary(sweep_root_uri: str) -> str:
    """The finished sweep's summary: its trials and the best one (sealed JSON)."""
    return join_uri(sweep_root_uri, "trials.json")


def read_sweep_summary(sweep_root_uri: str) -> dict | None:
    """The summary of the sweep at ``sweep_root_uri`` once it verifies; None when it is missing or damaged."""
    from shpeft_core.io import DamagedFileError, read_sealed_json

    uri = sweep_summary(sweep_root_uri)
    try:
        return read_sealed_json(uri) if exists(uri) else None
    except DamagedFileError:
        return None


def sweep_ledger(sweep_root_uri: str) -> str:
    """The sweep's finished trials, appended as each ends (sealed JSON)."""
    return join_uri(sweep_root_uri, "ledger.json")


def tune_root(store: str, job_id: str) -> str:
    """Tune's own state (and its trials' Ray Train runs under train/) while a job's sweep runs."""
    return join_uri(store, "sweeps", "_tune", job_id)


def tune_train_root(tune_root_uri: str) -> str:
    """The Ray Train runs of a sweep's data-parallel trials."""
    return join_uri(tune_root_uri, "train")


def train_runs_root(store: str) -> str:
    """Ray Train's run folders of data-parallel tasks (runs/<run_name>)."""
    return join_uri(store, "runs")


def run_checkpoints(run_root_uri: str) -> str:
    """A run's per-epoch checkpoints (``checkpoint_dir``)."""
    return join_uri(run_root_uri, "checkpoints")


def checkpoint_dir(checkpoints_uri: str, epochs: int) -> str:
    """The checkpoint holding the train state after ``epochs`` completed epochs."""
    return join_uri(checkpoints_uri, f"epoch-{int(epochs)}")


def checkpoint_epochs(checkpoints_uri: str) -> list[int]:
    """The completed-epoch counts of the checkpoints under ``checkpoints_uri``, newest first."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(checkpoints_uri)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted((int(n[6:]) for n in names if n.startswith("epoch-") and n[6:].isdigit()), reverse=True)


def fault_marker(run_root_uri: str) -> str:
    """Test hook: the marker of a fault injected once into a run."""
    return join_uri(run_root_uri, "fault-injected.json")


def logs_dir(store: str, job_id: str) -> str:
    return join_uri(store, "logs", job_id)


def log_file(store: str, job_id: str, name: str) -> str:
    return join_uri(logs_dir(store, job_id), f"{name}.log")


def sweep_checkpoints(sweep_root_uri: str, trial_id: str | None = None) -> str:
    """The sweep's trial checkpoints (one folder per trial; removed when the sweep ends)."""
    return join_uri(sweep_root_uri, "runs", trial_id) if trial_id else join_uri(sweep_root_uri, "runs")


def artifact_uri(folder: str, name: str, method: str) -> str:
    """A run's artifact named ``name`` in ``folder``, with the suffix of the kind ``method`` writes."""
    from shpeft_core.artifacts import artifact_name
    from shpeft_core.methods import get_method

    return join_uri(folder, artifact_name(name, get_method(method).artifact))


def deltas_dir(store: str) -> str:
    return join_uri(store, "deltas")


def task_artifact(store: str, task: str, job_id: str, config_hash: str, method: str) -> str:
    return artifact_uri(join_uri(deltas_dir(store), task), f"{job_id}-{config_hash}", method)


def job_evaluation_files(store: str, job_id: str) -> list[tuple[str, str, str]]:
    """(task, config hash, evaluation file URI) of every task artifact of ``job_id`` in the store, as
    ``task_artifact`` and ``eval_file`` name them (what rebuilds a damaged catalogue)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(deltas_dir(store))
    if not fs.exists(root):
        return []
    out = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*/{job_id}-*.eval.json")):
        task, name = path.rsplit("/", 2)[-2:]
        uri = fs.unstrip_protocol(path) if "://" in store else path
        out.append((task, name[len(job_id) + 1:-len(".eval.json")], uri))
    return out


def damaged_copy(path: str) -> str:
    """Where a damaged file is set aside: beside it, named with the time it was found."""
    return f"{path}.damaged-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def eval_file(artifact: str) -> str:
    """The evaluation JSON of the artifact at ``artifact``: same folder and name, ``.eval.json``."""
    from shpeft_core.artifacts import strip_suffix

    return strip_suffix(artifact) + ".eval.json"


def latest_pointer(store: str, task: str) -> str:
    return join_uri(deltas_dir(store), task, "latest.json")


def write_latest(store: str, row: dict) -> None:
    """Point deltas/<task>/latest.json at a finished, verified row's artifact (atomic replace)."""
    doc = {"task": row["task"], "uri": row["delta_uri"], "sha256": row["sha256"], "kind": row.get("artifact_kind"),
           "method": row.get("method"), "job_id": row.get("job_id"), "config_hash": row.get("config_hash"),
           "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(latest_pointer(store, row["task"]), json.dumps(doc, indent=1).encode())


def latest_artifact(store: str, task: str) -> dict:
    """The newest artifact of ``task`` in ``store`` ({uri, sha256, kind, method, job_id, ...}).

    Raises FileNotFoundError naming the pointer when the task has no finished artifact there.
    """
    uri = latest_pointer(store, task)
    if not exists(uri):
        raise FileNotFoundError(f"{uri}: no finished artifact of task {task!r} in this store")
    return json.loads(read_bytes(uri))


def row_verified(row: dict | None, config_hash: str, uri_field: str = "delta_uri") -> bool:
    """A finished row of this configuration whose artifact exists with the sha256 recorded in the row."""
    from shpeft_core.artifacts import artifact_sha256

    if not row or row.get("status") != "ok" or row.get("config_hash") != config_hash:
        return False
    uri = row.get(uri_field)
    try:
        return bool(uri) and artifact_sha256(uri, row.get("artifact_kind") or "delta") == row.get("sha256")
    except (FileNotFoundError, OSError):
        return False


def catalogue_dir(store: str) -> str:
    return join_uri(store, "catalogue")


def catalogue_file(store: str, job_id: str) -> str:
    return join_uri(store, "catalogue", f"{job_id}.parquet")


def plots_dir(store: str, job_id: str) -> str:
    return join_uri(store, "plots", job_id)


def job_report_file(store: str, job_id: str) -> str:
    return join_uri(plots_dir(store, job_id), "report.md")


def job_report_json(store: str, job_id: str) -> str:
    return join_uri(plots_dir(store, job_id), "report.json")


def report_dir(store: str, report_id: str) -> str:
    return join_uri(store, "reports", report_id)


def compare_results(report_root: str) -> str:
    """A comparison's results: one row per (task, method, seed)."""
    return join_uri(report_root, "results.parquet")


def compare_tuning(report_root: str) -> str:
    """A comparison's tuning runs: one row per (task, method, learning rate tried), scored on validation."""
    return join_uri(report_root, "tuning.parquet")


def compare_report_file(report_root: str) -> str:
    return join_uri(report_root, "report.md")


def compare_artifacts_dir(report_root: str, task: str) -> str:
    """Where a comparison keeps one task's artifacts (one per method and seed)."""
    return join_uri(report_root, "artifacts", task)


def backbones_dir(store: str) -> str:
    return join_uri(store, "backbones")


def backbone_file(store: str, name: str, key: str) -> str:
    """A backbone's weights kept in the store (the demo's pre-trained backbone), named by its content."""
    return join_uri(backbones_dir(store), f"{name}-{key}.safetensors")


def mlflow_default_dir(store: str) -> str:
    """Where MLflow tracks a job with a local store and no tracking URI (``file:`` store)."""
    return join_uri(store, "mlruns")


def tensorboard_dir(store: str, job_id: str) -> str:
    """A job's TensorBoard event files when the job names no folder of its own."""
    return join_uri(store, "tensorboard", job_id)


def demo_data_dir(store: str, smoke_test: bool = False) -> str:
    return join_uri(store, "data-smoke" if smoke_test else "data")


def demo_job_file(store: str, smoke_test: bool = False) -> str:
    return join_uri(store, "demo-smoke-job.yaml" if smoke_test else "demo-job.yaml")


def data_cache(store: str) -> str:
    """Derived data shared by every job, run and seed of the store: file digests and prepared arrays."""
    return join_uri(store, "data-cache")
