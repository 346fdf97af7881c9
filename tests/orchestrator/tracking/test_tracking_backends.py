"""The tracking backend registry: each job file section maps to a backend module that implements every hook,
imports its optional package only when built, and says where it writes."""

import subprocess
import sys

import pytest

from orchestrator.job.load import parse_job
from orchestrator.tracking.base import TrackingBackend, run_name
from orchestrator.tracking.tracker import BACKENDS, backend_class, make_tracker

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


def _job(store, **over):
    return parse_job({"backbone": BACKBONE, "store": str(store),
                      "tasks": [{"name": "a", "format": "imagefolder", "source": str(store), "num_classes": 2}], **over})


def test_every_tracking_section_has_a_backend_with_every_hook():
    from orchestrator.job.spec import TrackingSection

    sections = {name for name, field in TrackingSection.model_fields.items() if name not in ("artifacts",)}
    assert set(BACKENDS) == sections  # a section without a backend (or the reverse) is a registry slip
    for name in BACKENDS:
        cls = backend_class(name)
        assert issubclass(cls, TrackingBackend) and cls.name == name and cls.package
        assert not cls.__abstractmethods__, (name, cls.__abstractmethods__)
    with pytest.raises(KeyError, match="tracking.neptune is not a tracking backend; backends: mlflow, tensorboard, wandb"):
        backend_class("neptune")


def test_backend_modules_import_their_package_only_when_built():
    code = ("import sys\n"
            "from orchestrator.tracking.tracker import BACKENDS, backend_class\n"
            "for name in BACKENDS: backend_class(name)\n"
            "print(sorted(m for m in ('mlflow', 'tensorboardX', 'wandb', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_run_names():
    assert [run_name(k) for k in (("job",), ("task", "busi"), ("trial", "busi", "3f_00001"))] == [
        "job", "busi", "busi-trial-3f_00001"]


def test_the_console_names_each_backend_and_where_it_writes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboardX")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    job = _job(tmp_path, tracking={"mlflow": {"uri": f"file:{tmp_path}/mlruns"}, "tensorboard": {}})
    tracker = make_tracker(job, "job1", str(tmp_path), progress=True)
    assert [b.name for b in tracker.backends] == ["mlflow", "tensorboard"]
    assert capsys.readouterr().out == f"tracking to mlflow file:{tmp_path}/mlruns, tensorboard {tmp_path}/tensorboard/job1\n"


def test_a_backend_whose_package_is_missing_is_off_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, also where it is
    warnings = []
    job = _job(tmp_path, tracking={"wandb": {"project": "p", "mode": "offline"}})
    tracker = make_tracker(job, "job1", str(tmp_path), progress=False, warn=warnings.append)
    assert not tracker.enabled
    assert warnings == ["warning: tracking to wandb is off for this job: ModuleNotFoundError: import of wandb halted; "
                        "None in sys.modules"]
    tracker.start_job(job)  # a tracker without backends does nothing, and never fails
    tracker.end_job(ok=True)
    assert warnings[1:] == []
