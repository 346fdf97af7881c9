"""Content keys: job ids, importance keys and config hashes of existing stores must not move.

The literals below were computed before the code was regrouped and the method registry introduced; a
change that moves any of them retrains every task of every existing store, so it must be deliberate
(and come with a migration note).
"""

from orchestrator.job.keys import agnostic_key, importance_key, task_config_hash
from orchestrator.job.spec import TrainingSection, affects_results, resolve_task
from orchestrator.job.keys import job_id
from orchestrator.job.load import parse_job

JOB = {
    "backbone": {"name": "test_vit", "source": None, "kwargs": {"img_size": 32, "patch_size": 8}},
    "store": "/tmp/golden-store",
    "tasks": [{"name": "t1", "source": "/tmp/golden-data/t1", "format": "imagefolder", "num_classes": 3}],
    "importance": {"batches": 4},
    "selection": {"density": 0.01, "alpha": 0.5},
    "method": {"name": "shpeft", "lr": {"full": 0.002}, "lora": {"rank": 4}},
    "training": {"epochs": 3, "batch_size": 8, "cpus_per_worker": 0.5, "max_failures": 1},
}


def test_keys_of_an_existing_job_do_not_move():
    job = parse_job(JOB)
    spec = resolve_task(job.tasks[0])
    assert job_id(job) == "92ef023dad09"
    assert importance_key("fp0", "dfp0", job, 3, "grad2") == "88a213411e01e0d312de05af"
    assert agnostic_key("fp0", ["a", "b"], job) == "13c2715a44b56ef9f590e67d"
    # gps moved deliberately (revision 1: its own supervised-contrastive pass, the biases and gammas it
    # trains in full): its artifacts of earlier versions retrain; no other method's hash moved.
    hashes = {m: task_config_hash(job, spec, "k1", "k2", method=m, seed=1)
              for m in ("shpeft", "lora", "full", "gps", "linear")}
    assert hashes == {"shpeft": "f55c1370ddbff73d", "lora": "c2d39210150ebeae", "full": "3e8d5b6c51c8b0fb",
                      "gps": "3fea73f10fe5c2d4", "linear": "9656bff69c28086b"}


def test_resource_only_training_fields_keep_the_config_hash():
    job = parse_job(JOB)
    spec = resolve_task(job.tasks[0])
    base = task_config_hash(job, spec, "k1", "k2")
    resource = [n for n in TrainingSection.model_fields if not affects_results(TrainingSection, n)]
    assert set(resource) == {"use_gpu", "cpus_per_worker", "gpus_per_worker", "data_workers",
                             "max_concurrent_tasks", "max_failures"}
    changed = {"use_gpu": True, "gpus_per_worker": 0.5, "cpus_per_worker": 2.0, "data_workers": 3,
               "max_concurrent_tasks": 4, "max_failures": 5}
    moved = parse_job({**JOB, "training": {**JOB["training"], **changed}})
    assert task_config_hash(moved, spec, "k1", "k2") == base
    # ... and a field that changes results moves it
    other = parse_job({**JOB, "training": {**JOB["training"], "epochs": 4}})
    assert task_config_hash(other, spec, "k1", "k2") != base
