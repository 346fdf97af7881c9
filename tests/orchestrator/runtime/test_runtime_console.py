"""The console a user sees (live view, plain lines) and the logs every job keeps in its store."""

import io
import logging
import os
import sys
import warnings

import pytest

ray = pytest.importorskip("ray")

from rich.console import Console  # noqa: E402

from orchestrator.runtime.progress import ProgressView  # noqa: E402
from orchestrator.runtime.tasklog import StoreLogs, captured_output, log_file, read_logs  # noqa: E402


def _terminal():
    out = io.StringIO()
    return out, Console(file=out, force_terminal=True, width=140, color_system=None)


def _events():
    return [
        {"kind": "plan", "task": "derma", "method": "shpeft", "metric": "macro_f1", "epochs": 3, "trials": 0},
        {"kind": "plan", "task": "chest", "method": "shpeft", "metric": "macro_f1", "epochs": 2, "trials": 2},
        {"kind": "epoch", "task": "derma", "epoch": 0, "epochs": 3, "metric": "macro_f1",
         "metrics": {"train_loss": 1.5, "val_macro_f1": 0.41}},
        {"kind": "epoch", "task": "derma", "epoch": 1, "epochs": 3, "metric": "macro_f1",
         "metrics": {"train_loss": 1.1, "val_macro_f1": 0.62}},
        {"kind": "epoch", "task": "chest", "trial": "t1", "epoch": 0, "epochs": 2, "metric": "macro_f1",
         "metrics": {"train_loss": 0.9, "val_macro_f1": 0.55}},
        # ASHA stops t1 after one epoch; t2 runs both
        {"kind": "trial_end", "task": "chest", "trial": "t1", "val_metric": 0.55},
        {"kind": "epoch", "task": "chest", "trial": "t2", "epoch": 0, "epochs": 2, "metric": "macro_f1",
         "metrics": {"train_loss": 0.8, "val_macro_f1": 0.70}},
    ]


def test_live_view_shows_epochs_trials_metric_and_importance():
    out, console = _terminal()
    view = ProgressView(console=console, live=True)
    view.start()
    for e in _events():
        view.handle(e)
    view.handle({"kind": "importance", "name": "derma (grad2)", "done": 3, "total": 8})
    derma, chest = view.rows["derma"], view.rows["chest"]
    assert (derma.completed, derma.total) == (2, 3) and derma.status() == "epoch 2/3, val_macro_f1 0.6200"
    # the stopped trial counts as a whole trial's epochs: 2 (t1) + 1 (t2) of 4
    assert (chest.completed, chest.total) == (3, 4)
    assert chest.status() == "trials 1/2 done, best val_macro_f1 0.7000"
    view.handle({"kind": "task_end", "task": "derma", "state": "done", "value": 0.66})
    view.handle({"kind": "task_end", "task": "chest", "state": "failed", "error": "boom"})
    assert derma.completed == derma.total and derma.status() == "done val_macro_f1 0.6600"
    assert chest.status().startswith("FAILED") and chest.completed == 3  # a failed task's bar does not fill up
    view.stop()
    text = out.getvalue()
    for piece in ("derma", "chest", "importance", "3/8", "done val_macro_f1 0.6600", "FAILED", "eta"):
        assert piece in text, piece


def test_plain_view_prints_one_line_per_epoch_and_no_bars():
    out = io.StringIO()
    view = ProgressView(console=Console(file=out, force_terminal=False, width=140), live=False)
    view.start()
    for e in _events():
        view.handle(e)
    view.stop()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[derma] epoch 1/3 loss 1.5000 val_macro_f1 0.4100",
        "[derma] epoch 2/3 loss 1.1000 val_macro_f1 0.6200",
        "[chest trial t1] epoch 1/2 loss 0.9000 val_macro_f1 0.5500",
        "[chest trial t2] epoch 1/2 loss 0.8000 val_macro_f1 0.7000",
    ]


class _Board:
    """Records what a worker would push to the progress actor (the object under test is the capture)."""

    def __init__(self):
        self.events = []
        outer = self

        class _Push:
            @staticmethod
            def remote(event):
                outer.events.append(event)

        self.push = _Push()


def test_captured_output_keeps_prints_warnings_and_the_traceback_then_restores_streams():
    board = _Board()
    out, err = sys.stdout, sys.stderr
    with pytest.raises(ZeroDivisionError) as raised:
        with captured_output(board, "derma", trial="t3"):
            print("loading 40 images")
            warnings.warn("resizing 28 px images to 32 px", UserWarning)
            logging.getLogger("some.library").warning("slow decoder")
            logging.getLogger("some.library").info("not kept: below WARNING")
            1 / 0
    assert sys.stdout is out and sys.stderr is err
    lines = [ln for e in board.events for ln in e["lines"]]
    assert all(e["task"] == "derma" and e["trial"] == "t3" for e in board.events)
    assert "loading 40 images" in lines
    assert any("resizing 28 px images to 32 px" in ln for ln in lines)
    assert "WARNING some.library: slow decoder" in lines
    assert not any("not kept" in ln for ln in lines)
    assert lines[-1] == "ZeroDivisionError: division by zero" and any(ln.startswith("Traceback") for ln in lines)
    assert raised.value.shpeft_logged  # so the driver does not write the traceback a second time


def test_a_deliberate_exit_is_not_logged_as_an_error():
    """Tune ends a finished or ASHA-stopped trial by raising SystemExit in it: no traceback in the log."""
    board = _Board()
    with pytest.raises(SystemExit):
        with captured_output(board, "derma", trial="t1"):
            print("epoch 4 reported")
            raise SystemExit(0)
    lines = [ln for e in board.events for ln in e["lines"]]
    assert lines == ["epoch 4 reported"]


def test_store_logs_write_each_task_file_and_append_on_a_rerun(tmp_path):
    store = str(tmp_path)
    logs = StoreLogs(store, "job1")
    for e in _events():
        logs(e)
    logs({"kind": "log", "task": "derma", "lines": ["hello from the worker"]})
    logs({"kind": "task_end", "task": "chest", "state": "failed", "error": "ValueError: bad image"})
    logs.flush()
    derma = open(log_file(store, "job1", "derma")).read()
    assert "epoch 2/3 train_loss 1.1000 val_macro_f1 0.6200" in derma and "hello from the worker" in derma
    chest = open(log_file(store, "job1", "chest")).read()
    assert "[trial t2] epoch 1/2" in chest and "failed: ValueError: bad image" in chest

    again = StoreLogs(store, "job1")  # a rerun of the same job keeps what the first run wrote
    again({"kind": "log", "task": "derma", "lines": ["second run"]})
    again.flush()
    text = open(log_file(store, "job1", "derma")).read()
    assert text.startswith(derma.rstrip("\n").splitlines()[0]) and "hello from the worker" in text
    assert text.count("run started") == 2 and text.rstrip().endswith("second run")
    assert [n for n, _ in read_logs(store, "job1")] == ["chest", "derma"]


# ---------------------------------------------------------------- a real job

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


@pytest.mark.ray
def test_job_keeps_worker_logs_in_the_store_and_prints_no_traceback(tmp_path, capsys):
    from click.testing import CliRunner

    from orchestrator.cli.main import main
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job
    from tasks.synthetic import write_task_family

    specs = write_task_family(str(tmp_path / "data"), n_tasks=2, images_per_task=40,
                              formats=("imagefolder", "imagefolder"), seed=5)
    # One validation image of the second task is corrupted after the job was written: its worker fails
    # at the end of its first epoch (the importance pass reads training images only).
    broken_dir = os.path.join(specs[1].source, "val")
    victim = sorted(os.path.join(r, f) for r, _, fs in os.walk(broken_dir) for f in fs)[0]
    open(victim, "wb").write(b"not an image")
    job = parse_job({
        "backbone": BACKBONE, "store": str(tmp_path / "store"),
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 1, "batch_size": 8},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "max_failures": 0},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_job(job, progress=True)
    finally:
        ray.shutdown()
    console = capsys.readouterr().out
    good, bad = specs[0].name, specs[1].name
    assert result.failed == [bad]
    assert "Traceback" not in console
    assert f"shpeft logs {result.store} {result.job_id} --task {bad}" in console

    logs = dict(read_logs(result.store, result.job_id))
    assert f"job {result.job_id}: 2 task(s)" in logs["driver"]
    assert "epoch 2/2 train_loss" in logs[good] and "done" in logs[good]
    assert "Traceback" in logs[bad] and "failed" in logs[bad]
    # the worker's own traceback once (not Ray's wrapped copy of it too), then the line saying it failed
    assert logs[bad].count("Traceback (most recent call last)") == 1
    last = logs[bad].rstrip().splitlines()[-1]
    assert " failed: DatasetError: " in last and "unreadable image" in last

    runner = CliRunner()
    one = runner.invoke(main, ["logs", result.store, result.job_id, "--task", bad])
    assert one.exit_code == 0 and one.output == logs[bad]
    every = runner.invoke(main, ["logs", result.store, result.job_id])
    assert every.exit_code == 0 and every.output.startswith("==> driver.log <==")
    assert f"==> {good}.log <==" in every.output
    missing = runner.invoke(main, ["logs", result.store, "no-such-job"])
    assert missing.exit_code == 2 and "no logs for job no-such-job" in missing.output


def test_the_driver_logs_a_traceback_only_when_the_worker_could_not():
    from orchestrator.workflows.run import _finish_row

    def run(exc):
        posted = []

        def work():
            raise exc

        row = _finish_row({"task": "derma"}, work, posted.append)
        assert row["status"] == "failed" and row["error"].endswith("boom")
        return posted

    # a lost process (no worker wrote anything): the driver's traceback is the only one
    lost = run(RuntimeError("boom"))
    assert len(lost) == 1 and lost[0]["lines"][0].startswith("Traceback") and lost[0]["task"] == "derma"
    # the worker's own error, which captured_output already wrote, directly or wrapped as Ray wraps it
    logged = ValueError("boom")
    logged.shpeft_logged = True
    assert run(logged) == []

    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    assert run(Wrapped(logged)) == []


POOL_ERROR = ("RuntimeError: the task-agnostic pool of my-texture is empty (it leaves the task itself out); add "
              "importance.pool_datasets, or set importance.agnostic: magnitude or auto (the pre-trained weights' "
              "|w|), or importance.include_target: true")


@pytest.mark.parametrize("error, cause", [
    (POOL_ERROR, "the task-agnostic pool of my-texture is empty…"),
    ("DatasetError: /data/ct/val/b/0.png: unreadable image (not in a format Pillow decodes; 6 bytes)",
     "/data/ct/val/b/0.png: unreadable image…"),
    ("ValueError: boom", "boom"),
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA out of memory…"),
    ("KeyError: " + "/a-very/long/path/without/any/space/" * 4 + "x.png is missing from the table of images",
     "/a-very/long/path/without/any/space/" * 4 + "x.png…"),
])
def test_short_cause_is_the_gist_cut_between_words(error, cause):
    from orchestrator.reporting.tables import short_cause

    got = short_cause(error)
    assert got == cause
    words = set(" ".join(error.split()).split())
    # every word shown is a whole word of the message (no word cut in two)
    assert all(w.strip("…,.:;()") in {x.strip(",.:;()") for x in words} for w in got.split()), got


def test_a_failed_task_row_shows_its_cause_and_the_log_command_in_full(capsys):
    from orchestrator.reporting.tables import print_results_table

    store = "/home/someone/projects/my-study/store"
    print_results_table([{"task": "my-texture", "status": "failed", "metric": "macro_f1", "error": POOL_ERROR,
                          "trained": False}], store, "0123456789ab")
    out = capsys.readouterr().out
    lines = [ln.strip("│ ") for ln in out.splitlines()]
    assert any(ln.endswith("the task-agnostic pool of my-texture is empty…") for ln in lines), out
    assert f"full log: shpeft logs {store} 0123456789ab --task my-texture" in out  # on one line, whole
    assert "importance.pool_datasets" not in out  # the rest is in the log, not half in the table


@pytest.mark.ray
def test_a_task_that_cannot_be_planned_has_its_whole_error_in_its_log_and_a_short_one_in_the_table(tmp_path, capsys):
    """The first-run failure as it was met: one task, a pooled agnostic map asked for and nothing to pool
    (`shpeft validate` stops this before Ray; run_job called directly still reports it well)."""
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job
    from tasks.synthetic import write_colour_task

    spec = write_colour_task(str(tmp_path / "data"), "my-texture", 0, n_train=12, n_eval=6)
    job = parse_job({"backbone": BACKBONE, "store": str(tmp_path / "store"), "tasks": [spec.model_dump(mode="json")],
                     "importance": {"batches": 1, "batch_size": 8, "agnostic": "pool"},
                     "training": {"epochs": 1, "batch_size": 8}})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_job(job, progress=True)
    finally:
        ray.shutdown()
    console = capsys.readouterr().out
    assert result.failed == ["my-texture"] and "Traceback" not in console
    (row,) = result.rows
    assert row["error"].startswith("RuntimeError: the task-agnostic pool of my-texture is empty")
    assert row["error"].endswith("importance.include_target: true")
    log = dict(read_logs(result.store, result.job_id))["my-texture"]
    assert f"failed before training: {row['error']}" in log
    assert f"[my-texture] FAILED: {row['error']} (full log: shpeft logs" in console  # the whole line, once
    table = console[console.index("shpeft results"):]
    assert "the task-agnostic pool of my-texture is empty…" in table
    assert f"full log: shpeft logs {result.store} {result.job_id} --task my-texture" in table
    assert "include_target" not in table
