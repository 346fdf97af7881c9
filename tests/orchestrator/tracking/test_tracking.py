"""Experiment tracking: real jobs logged to a local MLflow store and TensorBoard, read back with stock readers."""

import glob
import hashlib
import os
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mlflow")
pytest.importorskip("tensorboardX")

from orchestrator.job.load import parse_job  # noqa: E402
from orchestrator.tracking.tracker import make_tracker  # noqa: E402
from orchestrator.workflows.validate import validate_job  # noqa: E402

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    # What `mlflow ui --backend-store-uri file:...` also needs with MLflow 3 (see docs/tracking.md).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(client, experiment="shpeft", **tags):
    exp = client.get_experiment_by_name(experiment)
    where = " and ".join(f"tags.`shpeft.{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp.experiment_id], where, max_results=1000)


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _tb_scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files in ``folder`` (CRC-checked, proto-decoded)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data):
        x = crc32c(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            header = data[i:i + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked(header)
            body = data[i + 12:i + 12 + length]
            assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked(body)
            i += 16 + length
            event = Event.FromString(body)
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _job(store, specs=None, **over):
    job = {
        "backbone": BACKBONE,
        "store": str(store),
        "tasks": [s.model_dump(mode="json") for s in specs] if specs else
        [{"name": "a", "format": "imagefolder", "source": str(store), "num_classes": 2}],
        "importance": {"batches": 2, "batch_size": 16},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "max_failures": 2},
    }
    job.update(over)
    return parse_job(job)


# ------------------------------------------------------------------------------------------- no Ray


def test_job_file_section_defaults_off_and_keeps_the_job_id(tmp_path):
    from orchestrator.job.spec import JobSpecError
    from orchestrator.job.keys import job_id

    plain = _job(tmp_path)
    tracked = _job(tmp_path, tracking={"mlflow": {"uri": "file:mlruns"}, "tensorboard": {}})
    assert not plain.tracking.enabled and tracked.tracking.enabled
    assert tracked.tracking.mlflow.experiment == "shpeft" and tracked.tracking.tensorboard.dir is None
    assert job_id(plain) == job_id(tracked)  # where a job is tracked does not change what it computes
    with pytest.raises(JobSpecError, match=r"tracking\.mlflow\.uri: .*scheme 'htp'"):
        _job(tmp_path, tracking={"mlflow": {"uri": "htp://host:5000"}})
    with pytest.raises(JobSpecError, match=r"tracking\.tensorboard\.logdir: .*allowed keys here: \['dir'\]"):
        _job(tmp_path, tracking={"tensorboard": {"logdir": "x"}})


def test_validate_reports_wandb_not_installed_and_unwritable_folders(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    job = _job(tmp_path, tracking={"wandb": {"project": "p"}, "mlflow": {"uri": f"file:{blocker}/mlruns"},
                                   "tensorboard": {"dir": str(tmp_path / "tb")}})
    problems = validate_job(job, data=False)
    assert "tracking.wandb: wandb is not installed" in problems
    # and on the command line: listed by field, exit 2
    import yaml
    from click.testing import CliRunner

    from orchestrator.cli.main import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    res = CliRunner().invoke(main, ["validate", str(path), "--no-data"])
    assert res.exit_code == 2 and "tracking.wandb: wandb is not installed" in res.output, res.output
    assert not any(p.startswith("tracking.mlflow") for p in problems)  # folders are checked with the data
    problems = validate_job(job, data=True)
    assert any(p.startswith("tracking.mlflow.uri: folder ") and "not writable" in p for p in problems), problems
    assert not any(p.startswith("tracking.tensorboard") for p in problems)
    assert not (tmp_path / "tb").exists()  # validate writes nothing


def test_relative_tracking_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    from orchestrator.tracking.uris import resolve_mlflow_uri, tensorboard_root

    monkeypatch.chdir(tmp_path)
    assert resolve_mlflow_uri("file:runs/ml", "/s") == f"file:{tmp_path}/runs/ml"
    assert resolve_mlflow_uri("sqlite:///ml.db", "/s") == f"sqlite:///{tmp_path}/ml.db"
    assert resolve_mlflow_uri("http://h:5000", "/s") == "http://h:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_mlflow_uri(None, "/s") == "file:/s/mlruns"
    assert tensorboard_root("tb", "/s", "j1") == f"{tmp_path}/tb/j1"
    assert tensorboard_root(None, "/s", "j1") == "/s/tensorboard/j1"
    with pytest.raises(ValueError, match="not a local folder"):
        resolve_mlflow_uri(None, "s3://bucket/store")
    with pytest.raises(ValueError, match="not a local folder"):
        tensorboard_root(None, "memory://bucket/store", "j1")


def _tracker(tmp_path, warnings):
    job = _job(tmp_path, tracking={"mlflow": {"uri": f"file:{tmp_path}/mlruns"}, "tensorboard": {}})
    return make_tracker(job, "job1", str(tmp_path), progress=False, warn=warnings.append)


class _Plan:
    task_name, method, density, alpha, mix, seed, metric = "a", "shpeft", 0.01, 0.5, "union", 0, "macro_f1"
    train = {"lr": 0.003, "epochs": 3}
    backbone = {"name": "test_vit"}


def _epoch(step, loss, task="a", trial=None):
    return {"kind": "epoch", "task": task, "trial": trial, "epoch": step, "epochs": 3, "metric": "macro_f1",
            "metrics": {"epoch": step, "train_loss": loss, "val_macro_f1": 0.5 + step / 10, "val_metric": 0.5,
                        "trainable": 10, "lr": 0.003}}


def test_repeated_epochs_are_logged_once_also_after_a_driver_restart(tmp_path):
    """A retried worker re-reports epochs; a rerun of a killed driver continues the task's run."""
    warnings = []
    first = _tracker(tmp_path, warnings)
    first.start_job(_job(tmp_path))
    first.planned(_Plan, "h1")
    for e in (_epoch(0, 1.0), _epoch(1, 0.9), _epoch(1, 0.9), {"kind": "message", "task": "a", "message": "x"},
              _epoch(0, 1.5, trial="t1")):
        first.on_event(e)
    # the driver dies here: runs stay RUNNING
    second = _tracker(tmp_path, warnings)
    second.start_job(_job(tmp_path))
    second.planned(_Plan, "h1")
    for e in (_epoch(1, 0.9), _epoch(2, 0.8)):
        second.on_event(e)
    second.task_finished({"task": "a", "status": "ok", "trained": True, "metric": "macro_f1", "val_macro_f1": 0.7,
                          "test_macro_f1": 0.65, "density": 0.01, "alpha": 0.5, "delta_uri": None})
    second.end_job(ok=True)
    assert warnings == []
    client = _client(f"file:{tmp_path}/mlruns")
    jobs, tasks = _runs(client, kind="job", job_id="job1"), _runs(client, kind="task", job_id="job1")
    assert len(jobs) == 1 and len(tasks) == 1 and tasks[0].info.status == "FINISHED"
    assert tasks[0].data.tags["mlflow.parentRunId"] == jobs[0].info.run_id
    history = client.get_metric_history(tasks[0].info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert tasks[0].data.metrics["final_test_macro_f1"] == 0.65
    assert tasks[0].data.params["lr"] == "0.003" and tasks[0].data.params["config_hash"] == "h1"
    assert "epoch" not in tasks[0].data.metrics and "trainable" not in tasks[0].data.metrics
    (trial,) = _runs(client, kind="trial", job_id="job1")  # the killed driver's trial, not continued
    assert trial.info.status == "KILLED" and trial.data.tags["mlflow.parentRunId"] == tasks[0].info.run_id
    # Run again after it finished (as with --force): the same parent run, a new run of the task.
    third = _tracker(tmp_path, warnings)
    third.start_job(_job(tmp_path))
    third.planned(_Plan, "h1")
    third.on_event(_epoch(0, 2.0))
    third.end_job(ok=True)
    assert [r.info.run_id for r in _runs(client, kind="job", job_id="job1")] == [jobs[0].info.run_id]
    tasks = _runs(client, kind="task", job_id="job1")
    assert len(tasks) == 2 and {len(client.get_metric_history(t.info.run_id, "train_loss")) for t in tasks} == {1, 3}


class _Broken:
    name = "broken"

    def __getattr__(self, item):
        def fail(*a, **k):
            if item == "log_metrics":
                raise ConnectionError("tracking server down")
            return set() if item == "logged_steps" else None
        return fail


def test_a_failing_backend_warns_once_and_the_others_go_on(tmp_path):
    warnings = []
    tracker = _tracker(tmp_path, warnings)
    tracker.backends.insert(0, _Broken())
    tracker.start_job(_job(tmp_path))
    tracker.planned(_Plan, "h1")
    for e in (_epoch(0, 1.0), _epoch(1, 0.9), _epoch(2, 0.8)):
        tracker.on_event(e)
    tracker.end_job(ok=True)
    assert len(warnings) == 1 and "tracking to broken failed" in warnings[0] and "server down" in warnings[0]
    assert [b.name for b in tracker.backends] == ["mlflow", "tensorboard"]
    client = _client(f"file:{tmp_path}/mlruns")
    (task,) = _runs(client, kind="task", job_id="job1")
    assert len(client.get_metric_history(task.info.run_id, "train_loss")) == 3
    assert [s for s, _ in _tb_scalars(f"{tmp_path}/tensorboard/job1/a")["train_loss"]] == [0, 1, 2]


def test_an_unreachable_server_costs_one_warning(tmp_path, capsys):
    job = _job(tmp_path, tracking={"mlflow": {"uri": "http://127.0.0.1:9"}})
    tracker = make_tracker(job, "job1", str(tmp_path), progress=False)
    tracker.start_job(job)
    tracker.planned(_Plan, "h1")
    tracker.on_event(_epoch(0, 1.0))
    tracker.end_job(ok=True)
    err = capsys.readouterr().err
    assert err.count("warning: tracking to mlflow failed") == 1 and not tracker.enabled


def test_cli_help_does_not_import_mlflow():
    code = "import sys, orchestrator.cli.main, orchestrator.job.spec; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------- real jobs

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    import safetensors.torch
    import timm

    path = str(tmp_path_factory.mktemp("weights") / "test_vit.safetensors")
    torch.manual_seed(123)
    model = timm.create_model(BACKBONE["name"], num_classes=7, **BACKBONE["kwargs"])
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def tracked(ray_local, backbone_file, tmp_path_factory):
    """A plain job of two tasks (one worker killed once after its last epoch), then a sweep of 2 trials in the
    same store and MLflow experiment."""
    from tasks.synthetic import write_task_family

    from orchestrator.workflows.run import run_job

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    root = tmp_path_factory.mktemp("tracked")
    specs = write_task_family(str(root / "data"), n_tasks=2, images_per_task=60, formats=("medmnist", "imagefolder"),
                              seed=3)
    BACKBONE["source"] = backbone_file
    tracking = {"mlflow": {"uri": f"file:{root}/mlruns"}, "tensorboard": {}}
    plain_job = _job(root / "store", specs, tracking=tracking)
    os.environ["SHPEFT_FAULT_INJECT"] = f"{specs[0].name}:1"
    try:
        plain = run_job(plain_job, progress=False)
    finally:
        del os.environ["SHPEFT_FAULT_INJECT"]
    sweep_job = _job(root / "store", specs, tracking=tracking,
                     training={"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "cpus_per_worker": 0.9},
                     sweep={"enabled": True, "trials_per_task": 1, "density_range": [0.005, 0.05], "seed": 1})
    swept = run_job(sweep_job, progress=False)
    return f"file:{root}/mlruns", plain_job, plain, swept


@pytest.mark.ray
def test_every_task_has_a_run_with_params_curves_final_metrics_and_its_artifact(tracked, tmp_path):
    uri, job, plain, _ = tracked
    assert plain.exit_code == 0, plain.rows
    client = _client(uri)
    (parent,) = _runs(client, kind="job", job_id=plain.job_id)
    assert parent.info.status == "FINISHED" and parent.data.params["backbone"] == "test_vit"
    tasks = {r.data.tags["shpeft.task"]: r for r in _runs(client, kind="task", job_id=plain.job_id)}
    assert set(tasks) == {r["task"] for r in plain.rows}
    for row in plain.rows:
        run = tasks[row["task"]]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        p = run.data.params
        assert (p["task"], p["method"], p["mix"], p["seed"], p["epochs"], p["backbone"]) == (
            row["task"], "shpeft", "union", "0", "2", "test_vit")
        assert float(p["density"]) == row["density"] and float(p["alpha"]) == row["alpha"]
        assert float(p["lr"]) == 3e-3 and p["config_hash"] == row["config_hash"] and p["job_id"] == plain.job_id
        # One value per epoch, even for the task whose worker was killed after epoch 1 and re-reported it.
        for name in ("val_macro_f1", "train_loss"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [0, 1]
        assert run.data.metrics["final_test_macro_f1"] == row["test_macro_f1"]
        assert run.data.metrics["final_val_accuracy"] == row["val_accuracy"]
        local = client.download_artifacts(run.info.run_id, "artifact", str(tmp_path / row["task"]))
        (name,) = os.listdir(local)
        assert name == os.path.basename(row["delta_uri"]) and _sha256(os.path.join(local, name)) == row["sha256"]
    assert {r["task"]: r["resumed_from_epoch"] for r in plain.rows}[job.tasks[0].name] == 0

    plots = client.download_artifacts(parent.info.run_id, "plots", str(tmp_path / "plots"))
    logged = set(os.listdir(plots))  # the run's plots, and the job report with its own PNGs
    assert plain.plots and {os.path.basename(p) for p in plain.plots} <= logged
    assert "report.md" in logged and plain.report and os.path.basename(plain.report) in logged
    for p in plain.plots:
        assert _sha256(os.path.join(plots, os.path.basename(p))) == _sha256(p)


@pytest.mark.ray
def test_tensorboard_has_each_task_curves_and_final_metrics(tracked):
    _, _, plain, _ = tracked
    for row in plain.rows:
        scalars = _tb_scalars(os.path.join(plain.store, "tensorboard", plain.job_id, row["task"]))
        assert [s for s, _ in scalars["val_macro_f1"]] == [0, 1] and [s for s, _ in scalars["train_loss"]] == [0, 1]
        (final,) = scalars["final_test_macro_f1"]
        assert final == (2, pytest.approx(row["test_macro_f1"], rel=1e-6))


@pytest.mark.ray
def test_sweep_trials_are_nested_runs_under_their_task(tracked):
    uri, _, plain, swept = tracked
    assert swept.exit_code == 0, swept.rows
    assert swept.job_id != plain.job_id
    client = _client(uri)
    (parent,) = _runs(client, kind="job", job_id=swept.job_id)
    tasks = {r.data.tags["shpeft.task"]: r for r in _runs(client, kind="task", job_id=swept.job_id)}
    trials = _runs(client, kind="trial", job_id=swept.job_id)
    assert len(trials) == 2
    for row in swept.rows:
        task = tasks[row["task"]]
        assert task.data.tags["mlflow.parentRunId"] == parent.info.run_id
        (trial,) = [t for t in trials if t.data.tags["shpeft.task"] == row["task"]]
        assert trial.data.tags["mlflow.parentRunId"] == task.info.run_id and trial.info.status == "FINISHED"
        assert trial.data.tags["shpeft.trial"] and float(trial.data.params["density"]) == row["density"]
        curve = client.get_metric_history(trial.info.run_id, "val_macro_f1")
        assert sorted(m.step for m in curve) == [0, 1]
        assert float(task.data.params["density"]) == row["density"] and task.data.params["best_trial"] == \
            trial.data.tags["shpeft.trial"]
        assert task.data.metrics["final_test_macro_f1"] == row["test_macro_f1"]
        assert sorted(m.step for m in client.get_metric_history(task.info.run_id, "val_macro_f1")) == [0, 1]
        tb = os.path.join(swept.store, "tensorboard", swept.job_id, row["task"],
                          f"trial-{trial.data.tags['shpeft.trial']}")
        assert [s for s, _ in _tb_scalars(tb)["val_macro_f1"]] == [0, 1]


@pytest.mark.ray
def test_a_job_whose_tracking_server_is_down_warns_once_and_ends_ok(tracked, capsys):
    from orchestrator.workflows.run import run_job

    _, job, plain, _ = tracked
    down = parse_job({**job.model_dump(mode="json"), "tracking": {"mlflow": {"uri": "http://127.0.0.1:9"}}})
    capsys.readouterr()
    again = run_job(down, progress=False)
    assert again.exit_code == 0 and again.job_id == plain.job_id  # tracking settings keep the job id
    assert again.counters["tasks_skipped"] == 2
    assert capsys.readouterr().err.count("warning: tracking to mlflow failed") == 1


def test_the_documented_tracking_snippets_validate(tmp_path):
    """The YAML in docs/tracking.md and the commented block in examples/sweep.yaml are valid sections."""
    import re

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    doc = open(os.path.join(root, "docs", "tracking.md")).read()
    (snippet,) = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if b.startswith("tracking:")]
    example = open(os.path.join(root, "examples", "sweep.yaml")).read().split("# tracking:", 1)[1]
    example = "tracking:" + "\n".join(line.removeprefix("#") for line in example.splitlines())
    for text in (snippet, example):
        job = _job(tmp_path, **yaml.safe_load(text))
        assert job.tracking.mlflow.uri.startswith("file:") and job.tracking.tensorboard is not None
