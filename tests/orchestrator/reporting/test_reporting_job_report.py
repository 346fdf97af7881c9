"""`shpeft report` and the evaluation file each finished task writes beside its artifact."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shpeft_core.metrics import class_metrics

from orchestrator.cli.main import main

# ---------------------------------------------------------------- per-class metrics, by hand

# Seven cases of a 3-class task; class 2 never occurs. Arg-max predictions: 0 0 1 | 1 1 2 0.
LABELS = [0, 0, 0, 1, 1, 1, 1]
PROBS = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1],
         [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]


def test_class_metrics_match_a_hand_computed_confusion_matrix():
    m = class_metrics(LABELS, np.array(PROBS), 3)
    assert m["confusion"] == [[2, 1, 0], [1, 2, 1], [0, 0, 0]]
    assert m["support"] == [3, 4, 0]
    # class 0: TP 2, FN 1, FP 1, TN 3; class 1: TP 2, FN 2, FP 1, TN 2; class 2: TP 0, FN 0, FP 1, TN 6
    assert m["sensitivity"][:2] == pytest.approx([2 / 3, 1 / 2]) and m["sensitivity"][2] is None
    assert m["specificity"] == pytest.approx([3 / 4, 2 / 3, 6 / 7])
    # AUC: class 0 wins 11 of its 12 (positive, negative) pairs; class 1 wins 9 and ties one (0.3 vs 0.3)
    assert m["auc"][:2] == pytest.approx([11 / 12, 9.5 / 12]) and m["auc"][2] is None
    assert m["macro_sensitivity"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["macro_specificity"] == pytest.approx((3 / 4 + 2 / 3 + 6 / 7) / 3)
    assert m["macro_auc"] == pytest.approx((11 / 12 + 9.5 / 12) / 2)


def test_class_metrics_when_every_case_is_one_class():
    # Three cases, all class 0, predicted 0 1 0: specificity of class 0 and every AUC are undefined.
    m = class_metrics([0, 0, 0], np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), 2)
    assert m["confusion"] == [[2, 1], [0, 0]]
    assert m["sensitivity"][0] == pytest.approx(2 / 3) and m["sensitivity"][1] is None
    assert m["specificity"][0] is None and m["specificity"][1] == pytest.approx(2 / 3)
    assert m["auc"] == [None, None] and m["macro_auc"] is None


def test_class_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        class_metrics([0, 1], np.array(PROBS), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_metrics([0, 3], np.array(PROBS[:2]), 3)


def test_evaluate_per_class_agrees_with_its_summary_metrics():
    from shpeft_core.train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    out = evaluate(model, [(x[:25], y[:25]), (x[25:], y[25:])], num_classes=3, per_class=True)
    cm = np.array(out["per_class"]["confusion"])
    assert out["n"] == cm.sum() == 40
    assert out["accuracy"] == pytest.approx(np.trace(cm) / 40)
    assert out["auc"] == pytest.approx(out["per_class"]["macro_auc"])


def test_report_of_unknown_job_exits_2_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "store"), "0123456789ab"])
    assert res.exit_code == 2
    lines = [s for s in res.output.splitlines() if s.strip()]
    assert len(lines) == 1 and "no job '0123456789ab'" in lines[0] and "known jobs: none" in lines[0], res.output


# ---------------------------------------------------------------- a real job on Ray

from shpeft_core.io import sha256_file  # noqa: E402
from tasks.loaders import build_dataset  # noqa: E402

from orchestrator.store.evaluation_files import EvalFileError, read_eval, write_eval  # noqa: E402
from orchestrator.job.load import parse_job  # noqa: E402
from orchestrator.workflows.run import run_job  # noqa: E402
from orchestrator.store.layout import eval_file, job_report_file  # noqa: E402

# The backbone file (autouse) and synthetic tasks the Ray tests share (ray_local: conftest).
from helpers_orch import BACKBONE, backbone_file, task_specs  # noqa: E402,F401

EPOCHS = 2


def _job(store, specs, **over):
    job = {
        "backbone": BACKBONE, "store": str(store), "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 2, "batch_size": 16}, "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": EPOCHS, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "cpus_per_worker": 0.9},
    }
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v}
    return parse_job(job)


def _pngs_open(folder):
    from PIL import Image

    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    for p in pngs:
        with Image.open(os.path.join(folder, p)) as im:
            im.verify()
    return pngs


def test_evaluation_file_is_sealed_and_checked_when_read(tmp_path):
    from shpeft_core.io import write_sealed_json

    uri = str(tmp_path / "a.eval.json")
    doc = {"format": "shpeft-eval/2", "task": "t", "artifact_sha256": "ab" * 32, "splits": {"test": {"auc": float("nan")}},
           "row": {"test_macro_f1": 0.5, "sha256": "ab" * 32}}
    write_eval(uri, doc)
    got = read_eval(uri)
    assert got["row"] == doc["row"] and got["splits"]["test"]["auc"] is None  # strict JSON: NaN is stored as null
    assert read_eval(str(tmp_path / "none.eval.json")) is None
    text = open(uri).read()
    for bad, why in ((text.replace("0.5", "0.6"), "damaged"), (text[: len(text) // 2], "not readable"),
                     (json.dumps({k: v for k, v in json.loads(text).items() if k != "checksum"}), "no checksum")):
        open(uri, "w").write(bad)
        with pytest.raises(EvalFileError, match=why) as err:
            read_eval(uri)
        assert uri in str(err.value)
    write_sealed_json(uri, {**doc, "format": "shpeft-eval/1"})
    with pytest.raises(EvalFileError, match="format 'shpeft-eval/1'"):
        read_eval(uri)


@pytest.fixture(scope="module")
def job_run(ray_local, task_specs, tmp_path_factory):
    """Two tasks; the first one's worker is killed once after epoch 1 and resumes from its checkpoint."""
    job = _job(tmp_path_factory.mktemp("store"), task_specs)
    os.environ["SHPEFT_FAULT_INJECT"] = f"{task_specs[0].name}:1"
    try:
        return job, run_job(job, progress=False)
    finally:
        del os.environ["SHPEFT_FAULT_INJECT"]


@pytest.mark.ray
def test_each_task_writes_an_evaluation_file_linked_to_its_artifact(job_run, task_specs):
    job, result = job_run
    assert result.exit_code == 0, result.rows
    specs = {s.name: s for s in task_specs}
    # The resumed task's history still covers every epoch (the first from its checkpoint).
    assert [r["resumed_from_epoch"] for r in result.rows] == [0, None]
    for row in result.rows:
        doc = read_eval(eval_file(row["delta_uri"]))
        assert doc is not None, row["task"]
        assert doc["artifact_sha256"] == sha256_file(row["delta_uri"]) == row["sha256"]
        assert doc["artifact_uri"] == row["delta_uri"] and doc["class_names"] == specs[row["task"]].names()
        assert [h["epoch"] for h in doc["history"]] == list(range(EPOCHS))
        assert all(h["train_loss"] > 0 for h in doc["history"])
        test = doc["splits"]["test"]
        cm = np.array(test["per_class"]["confusion"])
        assert cm.shape == (specs[row["task"]].num_classes,) * 2
        assert cm.sum() == test["n"] == len(build_dataset(specs[row["task"]], "test"))
        assert np.trace(cm) / cm.sum() == pytest.approx(row["test_accuracy"])
        assert test["per_class"]["support"] == cm.sum(1).tolist()


@pytest.mark.ray
def test_run_and_the_report_command_write_a_readable_report(job_run, task_specs, tmp_path):
    from orchestrator.job.keys import job_id

    job, result = job_run
    assert result.report == job_report_file(result.store, result.job_id) and os.path.exists(result.report)
    os.remove(result.report)
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(json.dumps(job.model_dump(mode="json")))  # JSON is YAML
    res = CliRunner().invoke(main, ["report", result.store, str(job_yaml)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == result.report and job_id(job) == result.job_id
    text = open(result.report).read()
    for spec in task_specs:
        assert f"## Task `{spec.name}`" in text
        other = ({s.name for s in task_specs} - {spec.name}).pop()
        assert f"Task-agnostic map: the importance pooled over {other}." in text
        for name in spec.names():
            assert f"| {name} |" in text  # one per-class row per class
    for row in result.rows:  # no content keys in what people read
        assert row["config_hash"] not in text and row["importance_key"] not in text
    assert "Missing from this report" not in text
    folder = os.path.dirname(result.report)
    pngs = _pngs_open(folder)
    for spec in task_specs:
        assert {f"{spec.name}_curves.png", f"{spec.name}_confusion.png"} <= set(pngs)
        assert f"({spec.name}_confusion.png)" in text
    assert "selection_location.png" in pngs
    machine = json.load(open(os.path.join(folder, "report.json")))
    for row in result.rows:
        got = machine["tasks"][row["task"]]
        assert got["test"]["per_class"] == read_eval(eval_file(row["delta_uri"]))["splits"]["test"]["per_class"]


@pytest.mark.ray
def test_report_of_an_older_job_shows_what_it_can(job_run):
    """Without evaluation files (jobs run before they existed) the report still renders and says what is missing."""
    _, result = job_run
    moved = {eval_file(r["delta_uri"]): eval_file(r["delta_uri"]) + ".aside" for r in result.rows}
    for a, b in moved.items():
        os.replace(a, b)
    try:
        res = CliRunner().invoke(main, ["report", result.store, result.job_id])
    finally:
        for a, b in moved.items():
            os.replace(b, a)
    assert res.exit_code == 0, res.output
    text = open(result.report).read()
    assert "## Missing from this report" in text and "no evaluation file" in text
    for row in result.rows:
        assert f"## Task `{row['task']}`" in text and "### Learning curves" in text
    assert "_confusion.png" not in text


def _report_with_a_changed_file(result, uri: str, change) -> str:
    """`shpeft report` of the job while the JSON file at ``uri`` is changed by ``change(doc)``; its text."""
    good = open(uri).read()
    doc = json.loads(good)
    change(doc)
    open(uri, "w").write(json.dumps(doc, indent=1))
    try:
        res = CliRunner().invoke(main, ["report", result.store, result.job_id])
    finally:
        open(uri, "w").write(good)
    assert res.exit_code == 0, res.output
    return open(result.report).read()


@pytest.mark.ray
def test_report_names_a_damaged_evaluation_file_and_leaves_it_out(job_run):
    _, result = job_run
    row = result.rows[0]
    uri = eval_file(row["delta_uri"])

    def change(doc):
        doc["splits"]["test"]["macro_f1"] = 0.987654  # a changed number, the file still valid JSON

    text = _report_with_a_changed_file(result, uri, change)
    assert f"`{row['task']}`: evaluation file {uri}: damaged" in text and "0.987654" not in text
    assert f"{row['task']}_confusion.png" not in text and f"{result.rows[1]['task']}_confusion.png" in text


@pytest.mark.ray
def test_report_does_not_show_a_changed_job_file(job_run):
    from orchestrator.store.layout import job_file

    _, result = job_run
    uri = job_file(result.store, result.job_id)

    def change(doc):
        doc["training"]["epochs"] += 5  # still a valid job, but not the one this id names

    text = _report_with_a_changed_file(result, uri, change)
    assert f"the job file (`{uri}`) is missing, unreadable, or not this job's" in text


@pytest.mark.ray
def test_a_failing_report_never_fails_the_job(job_run, monkeypatch, capsys):
    import orchestrator.reporting.job_report

    def broken(store, job_id):
        raise OSError("disk full")

    job, _ = job_run
    monkeypatch.setattr(orchestrator.reporting.job_report, "write_job_report", broken)
    again = run_job(job, progress=False)  # every task is reused; only the report runs again
    assert again.exit_code == 0 and again.report is None
    lines = [s for s in capsys.readouterr().out.splitlines() if "report" in s]
    assert len(lines) == 1 and "report skipped: " in lines[0] and "disk full" in lines[0]


@pytest.mark.ray
def test_report_of_a_sweep_lists_its_trials(ray_local, task_specs, tmp_path):
    job = _job(tmp_path / "store", task_specs[:1], training={"epochs": 1}, importance={"include_target": True},
               sweep={"enabled": True, "trials_per_task": 2, "density_range": [0.005, 0.05], "seed": 1})
    result = run_job(job, progress=False)
    assert result.exit_code == 0, result.rows
    row = result.rows[0]
    doc = read_eval(eval_file(row["delta_uri"]))
    assert doc["artifact_sha256"] == row["sha256"] and len(doc["history"]) == 1
    assert doc["density"] == row["density"]
    text = open(result.report).read()
    assert "### Sweep (2 trial(s))" in text
    table = [s for s in text.splitlines() if s.startswith("| 1 |") or s.startswith("| 2 |")]
    assert len(table) == 2 and sum("**best**" in s for s in table) == 1
    assert f"{row['task']}_sweep.png" in _pngs_open(os.path.dirname(result.report))

    # The task's artifact is gone and its best trial's evaluation file was altered (a metric changed, the
    # file still valid JSON): the rerun reuses the finished sweep, but evaluates the copied artifact again
    # instead of trusting the altered file.
    best = json.loads(open(f"{result.store}/sweeps/{row['task']}-{row['config_hash']}/trials.json").read())["best"]
    trial_eval = eval_file(best["delta_uri"])
    doc = json.loads(open(trial_eval).read())
    assert doc["row"]["test_macro_f1"] == row["test_macro_f1"]
    doc["row"]["test_macro_f1"] = 0.123456
    open(trial_eval, "w").write(json.dumps(doc, indent=1))
    os.remove(row["delta_uri"])
    os.remove(eval_file(row["delta_uri"]))
    again = run_job(job, progress=False).rows[0]
    assert again["sha256"] == row["sha256"] and again["test_macro_f1"] == row["test_macro_f1"]
    assert read_eval(eval_file(again["delta_uri"]))["row"]["test_macro_f1"] == row["test_macro_f1"]
    with pytest.raises(EvalFileError, match="damaged"):
        read_eval(trial_eval)


@pytest.mark.ray
def test_a_data_parallel_task_writes_its_evaluation_file(ray_local, task_specs, tmp_path):
    """Two Ray Train workers: the history travels through the checkpoints into the artifact and its evaluation."""
    job = _job(tmp_path / "store", task_specs[1:], importance={"include_target": True},
               training={"workers_per_task": 2, "cpus_per_worker": 0.9})
    result = run_job(job, progress=False)
    assert result.exit_code == 0, result.rows
    row = result.rows[0]
    doc = read_eval(eval_file(row["delta_uri"]))
    assert doc["artifact_sha256"] == sha256_file(row["delta_uri"]) == row["sha256"]
    assert [h["epoch"] for h in doc["history"]] == list(range(EPOCHS))
    cm = np.array(doc["splits"]["test"]["per_class"]["confusion"])
    assert np.trace(cm) / cm.sum() == pytest.approx(row["test_accuracy"])
    assert f"{row['task']}_curves.png" in _pngs_open(os.path.dirname(result.report))
