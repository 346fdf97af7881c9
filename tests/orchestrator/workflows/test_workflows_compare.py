"""`shpeft compare`: every method in one harness, results.parquet, report.md and its PNGs, resume."""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from shpeft_core.delta import load_delta  # noqa: E402
from shpeft_core.artifacts import artifact_sha256  # noqa: E402

from orchestrator.workflows.compare import parse_methods, run_compare  # noqa: E402
from orchestrator.job.load import parse_job  # noqa: E402

from helpers_orch import BACKBONE, backbone_file, colour_task  # noqa: E402,F401

pytestmark = pytest.mark.ray

COLUMNS = {"task", "method", "seed", "density", "alpha", "val_macro_f1", "test_macro_f1", "val_accuracy",
           "test_accuracy", "val_auc", "test_auc", "trainable", "artifact_bytes", "train_s"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    specs = [colour_task(str(root), "colour-a", 0), colour_task(str(root), "colour-b", 1)]
    job = parse_job({
        "backbone": BACKBONE, "store": str(root / "store"),
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 2, "batch_size": 16},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "cpus_per_worker": 0.9},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        methods = "shpeft,shpeft:rank_sum,specific,agnostic,random,gps,linear,bitfit,lora,full"
        # every method at its default rate here; tuning is tested below on fewer methods
        result = run_compare(job, methods=methods, seeds=2, progress=False, tune=False)
        again = run_compare(job, methods=methods, seeds=2, progress=False, tune=False)
    finally:
        ray.shutdown()
    return job, result, again


def test_results_have_one_row_per_task_method_seed(compared):
    job, result, _ = compared
    assert result.exit_code == 0, [r for r in result.rows if r["status"] != "ok"]
    table = pq.read_table(io.BytesIO(open(result.results_uri, "rb").read())).to_pylist()
    assert COLUMNS <= set(table[0])
    keys = {(r["task"], r["method"], r["mix"], r["seed"]) for r in table}
    assert len(keys) == len(table) == 2 * 10 * 2
    for r in table:
        assert r["status"] == "ok"
        assert r["lr_source"] == "default" and r["importance_seed"] == r["seed"]
        assert artifact_sha256(r["artifact_uri"], r["artifact_kind"]) == r["sha256"]
        assert r["artifact_bytes"] > 0 and r["trainable"] > 0
    by = {(r["method"], r["mix"]): r for r in table if r["task"] == "colour-a" and r["seed"] == 0}
    # trainable counts are what each method trains: head < sparse < LoRA < full
    assert by[("linear", None)]["trainable"] < by[("shpeft", "union")]["trainable"] < by[("lora", None)]["trainable"] \
        < by[("full", None)]["trainable"]
    assert by[("shpeft", "union")]["trainable"] == by[("random", None)]["trainable"]  # same budget
    assert by[("lora", None)]["artifact_kind"] == "lora" and by[("full", None)]["artifact_kind"] == "checkpoint"
    # hybrid rules differ in what they select, not in how much
    a = load_delta(by[("shpeft", "union")]["artifact_uri"])
    b = load_delta(by[("shpeft", "rank_sum")]["artifact_uri"])
    assert a.metadata["mix"] == "union" and b.metadata["mix"] == "rank_sum"
    assert sum(v.numel() for v in a.indices.values()) == sum(v.numel() for v in b.indices.values())
    # the learnable colour task is learnt by every method that adapts the model
    for (m, _), r in by.items():
        assert r["test_macro_f1"] > 0.6, (m, r["test_macro_f1"])


def test_report_and_plots(compared):
    _, result, _ = compared
    text = open(result.report_uri).read()
    assert "| method | colour-a | colour-b | mean |" in text
    assert "shpeft (union)" in text and "shpeft (rank_sum)" in text
    assert "## Paired differences against shpeft (union) (test)" in text and "Holm" in text
    assert "## Recovery of the linear to full gap" in text
    for png in ("metric_vs_trainable.png", "alpha_curve.png", "selection_location.png", "mask_overlap.png"):
        path = os.path.join(os.path.dirname(result.report_uri), png)
        assert os.path.getsize(path) > 1000 and f"({png})" in text
    assert "- shpeft (union) vs full: " in text and "- Hybrid rule: shpeft (union)" in text
    assert "task-agnostic map: `colour-a` the pool of colour-b; `colour-b` the pool of colour-a." in text


def test_rerun_reuses_verified_runs(compared):
    _, result, again = compared
    assert again.report_id == result.report_id
    assert [r["sha256"] for r in again.rows] == [r["sha256"] for r in result.rows]
    assert [r["train_s"] for r in again.rows] == [r["train_s"] for r in result.rows]  # nothing retrained


def test_methods_option_is_checked():
    assert [(e.method, e.mix, e.density) for e in parse_methods("shpeft:rank_sum,linear,shpeft@0.001")] == [
        ("shpeft", "rank_sum", None), ("linear", None, None), ("shpeft", None, 0.001)]
    with pytest.raises(ValueError, match="'nope' is not a method"):
        parse_methods("shpeft,nope")
    with pytest.raises(ValueError, match="only shpeft takes a rule"):
        parse_methods("linear:union")
    with pytest.raises(ValueError, match="only mask methods take a density"):
        parse_methods("linear@0.01")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        parse_methods("shpeft@2")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        parse_methods("shpeft@abc")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    spec = colour_task(str(root), "colour-a", 0)
    job = parse_job({
        "backbone": BACKBONE, "store": str(root / "store"), "tasks": [spec.model_dump(mode="json")],
        "importance": {"batches": 2, "batch_size": 16}, "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "cpus_per_worker": 0.9, "lr": 0.05},
        "method": {"lr": {"full": 0.002}},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_compare(job, methods="shpeft,shpeft@0.005,linear,full", seeds=2, progress=False)
        fixed = run_compare(job, methods="specific", seeds=2, progress=False, tune=False, fixed_importance=True)
        no_beyond = run_compare(job, methods="linear", seeds=1, progress=False, tune_extensions=0)
    finally:
        ray.shutdown()
    return job, result, fixed, no_beyond


def test_learning_rates_are_chosen_on_validation_and_recorded(tuned):
    from orchestrator.stages.evaluation import read_eval
    from orchestrator.store.layout import compare_tuning, eval_file
    from orchestrator.workflows.compare_tuning import read_tuning

    _, result, _, _ = tuned
    assert result.exit_code == 0, [r for r in result.rows if r["status"] != "ok"]
    tuning = read_tuning(compare_tuning(os.path.dirname(result.results_uri)))
    # full is pinned by method.lr (not searched); the others try 3 rates each on the first seed
    assert sorted({r["variant"] for r in tuning}) == ["linear", "shpeft (union)", "shpeft (union) @ 0.005"]
    assert all(r["seed"] == 0 and r["status"] == "ok" for r in tuning)
    for variant in {r["variant"] for r in tuning}:
        tried = sorted(r["lr"] for r in tuning if r["variant"] == variant)
        assert {0.00333, 0.01, 0.03} <= set(tried)
        best = max(tuning, key=lambda r: (r["val_score"], -abs(np.log(r["lr"] / 0.01))) if r["variant"] == variant
                   else (-1, 0))["lr"]
        # a best value at an end of what was tried means the two steps beyond the grid were used up
        if best in (tried[0], tried[-1]):
            assert len(tried) == 5, (variant, tried)
    for r in tuning:  # a tuning run is measured on validation only
        doc = read_eval(eval_file(r["artifact_uri"]))
        chosen = any(x["artifact_uri"] == r["artifact_uri"] for x in result.rows)
        assert set(doc["splits"]) == ({"val", "test"} if chosen else {"val"})
    for r in result.rows:
        assert r["trainable"] > 0 and r["train_s"] > 0  # a reused tuning run keeps its own count and cost
        if r["method"] == "full":
            assert (r["lr"], r["lr_source"]) == (0.002, "job")
            continue
        assert r["lr_source"] == "tuned" and r["lr"] != 0.05  # training.lr is not used
        tried = {t["lr"]: t["val_score"] for t in tuning if t["variant"] == r["variant"]}
        assert r["lr"] in tried and tried[r["lr"]] == max(tried.values())
        assert r["reused_tuning_run"] == (r["seed"] == 0)  # the chosen tuning run is the first seed's run
    by = {(r["variant"], r["seed"]): r for r in result.rows}
    assert by[("shpeft (union) @ 0.005", 0)]["trainable"] < by[("shpeft (union)", 0)]["trainable"]
    text = open(result.report_uri).read()
    assert "## Learning rates (chosen on validation)" in text and "| colour-a | full | - | 0.002 | job |" in text
    assert "tuning s (total)" in text and "each seed draws its own importance batches and warm head" in text


def test_tuning_without_steps_beyond_the_grid_tries_the_grid_only(tuned):
    from orchestrator.store.layout import compare_tuning
    from orchestrator.workflows.compare_tuning import read_tuning

    _, result, _, no_beyond = tuned
    assert no_beyond.exit_code == 0 and no_beyond.report_id != result.report_id
    tried = sorted(r["lr"] for r in read_tuning(compare_tuning(os.path.dirname(no_beyond.results_uri))))
    assert tried == [0.00333, 0.01, 0.03]
    assert no_beyond.rows[0]["lr"] in tried and no_beyond.rows[0]["lr_source"] == "tuned"
    assert "no step beyond the grid" in open(no_beyond.report_uri).read()
    assert "at most twice" in open(result.report_uri).read()


def test_seeds_change_the_mask_of_importance_methods_unless_told_not_to(tuned):
    _, result, fixed, _ = tuned
    by = {(r["variant"], r["seed"]): r for r in result.rows}
    a, b = (load_delta(by[("shpeft (union)", s)]["artifact_uri"]) for s in (0, 1))
    assert a.metadata["importance_seed"] == "0" and b.metadata["importance_seed"] == "1"
    assert any(not np.array_equal(a.indices[k], b.indices[k]) for k in a.indices)
    c, d = (load_delta(r["artifact_uri"]) for r in sorted(fixed.rows, key=lambda r: r["seed"]))
    assert [r["importance_seed"] for r in fixed.rows] == [0, 0]
    assert all(np.array_equal(c.indices[k], d.indices[k]) for k in c.indices)
    assert "training.seed (--fixed-importance)" in open(fixed.report_uri).read()
