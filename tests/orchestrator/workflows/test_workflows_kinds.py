"""Multi-label and ordinal tasks end to end on a local 2-CPU Ray: a multi-label task read from a label table
is learnt by SH-PEFT and by full fine-tuning (mean AUROC above 0.9), its reports show per-finding tables and
ROC curves, its delta serves per-finding probabilities equal to the merged model's, and an ordinal task
reports quadratic weighted kappa."""

import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from shpeft_core.delta import load_delta, merge_delta  # noqa: E402
from tasks.synthetic_findings import write_findings_task, write_grades_task  # noqa: E402

from orchestrator.job.load import parse_job  # noqa: E402
from orchestrator.store.evaluation_files import read_eval  # noqa: E402
from orchestrator.store.layout import eval_file  # noqa: E402
from orchestrator.workflows.compare import run_compare  # noqa: E402
from orchestrator.workflows.demo import DEMO_BACKBONE, demo_backbone_uri  # noqa: E402
from orchestrator.workflows.run import run_job  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    findings = write_findings_task(str(root / "data"), num_images=200)
    grades = write_grades_task(str(root / "data"), num_images=200)
    # The demo's small pre-trained ViT: features in which the marks are visible, as a pre-trained backbone's are.
    job = parse_job({
        "backbone": {**DEMO_BACKBONE, "source": demo_backbone_uri()}, "store": str(root / "store"),
        "tasks": [findings.model_dump(mode="json"), grades.model_dump(mode="json")],
        "importance": {"batches": 3, "batch_size": 32},
        "selection": {"density": 0.02, "alpha": 0.5, "granularity": "per_tensor"},
        "training": {"epochs": 6, "batch_size": 32, "lr": 3e-2, "head_lr": 1e-2, "warmup_epochs": 1,
                     "cpus_per_worker": 0.9},
        "method": {"lr": {"full": 2e-3}},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_job(job, progress=False)
        compared = run_compare(job, methods="shpeft,full", seeds=1, progress=False)
    finally:
        ray.shutdown()
    return job, findings, grades, result, compared


def test_multi_label_task_is_learnt_by_shpeft_and_full_fine_tuning(runs):
    _, findings, _, result, compared = runs
    assert result.exit_code == 0 and compared.exit_code == 0, (result.rows, compared.rows)
    rows = {r["method"]: r for r in compared.rows if r["task"] == findings.name}
    for method in ("shpeft", "full"):
        assert rows[method]["test_auc"] > 0.9, (method, rows[method])
        ev = read_eval(eval_file(rows[method]["artifact_uri"]))
        test, val = ev["splits"]["test"]["per_finding"], ev["splits"]["val"]["per_finding"]
        assert ev["task_kind"] == "multi_label" and ev["class_names"] == findings.class_names
        assert test["threshold"] == val["threshold"]  # chosen on validation, applied to test
        assert test["macro_auc"] == pytest.approx(rows[method]["test_auc"])
        assert sum(test["unknown"]) + sum(val["unknown"]) > 0  # uncertain labels were ignored, not guessed
    job_row = next(r for r in result.rows if r["task"] == findings.name)
    assert job_row["metric"] == "auc" and job_row["test_auc"] > 0.9


def test_reports_show_per_finding_tables_roc_curves_and_kappa(runs):
    _, findings, grades, result, compared = runs
    report = open(result.report).read()
    assert "| finding | positive / negative / unknown | AUROC | F1 | threshold |" in report
    for name in findings.class_names:
        assert f"| {name} |" in report
    roc = os.path.join(os.path.dirname(result.report), f"{findings.name}_roc.png")
    assert os.path.getsize(roc) > 1000 and f"({findings.name}_roc.png)" in report
    assert "quadratic weighted kappa" in report
    text = open(compared.report_uri).read()
    assert f"## `{findings.name}`: test AUROC per finding" in text and f"(roc_{findings.name}.png)" in text
    assert "## Test quadratic weighted kappa" in text and grades.name in text
    assert os.path.getsize(os.path.join(os.path.dirname(compared.report_uri), f"roc_{findings.name}.png")) > 1000


def test_ordinal_task_reports_quadratic_kappa(runs):
    _, _, grades, result, compared = runs
    row = next(r for r in result.rows if r["task"] == grades.name)
    assert row["status"] == "ok" and row["metric"] == "kappa"
    assert row["test_kappa"] is not None and -1 <= row["test_kappa"] <= 1 and row["val_kappa"] is not None
    ev = read_eval(eval_file(row["delta_uri"]))
    assert ev["task_kind"] == "ordinal" and "per_class" in ev["splits"]["test"]
    assert all(r["test_kappa"] is not None for r in compared.rows if r["task"] == grades.name)


def test_delta_serves_per_finding_probabilities_equal_to_the_merged_model(runs):
    from orchestrator.serving.predict import decode_image, predict_files
    from orchestrator.serving.server import DeltaServer
    from tasks.transforms import transform_for

    job, findings, _, _, compared = runs
    uri = next(r["artifact_uri"] for r in compared.rows if r["task"] == findings.name and r["method"] == "shpeft")
    delta = load_delta(uri)
    assert delta.metadata["task_kind"] == "multi_label"
    images = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(findings.source, "images"))
                    for f in fs)[:4]
    merged = merge_delta(delta).eval()
    tf = transform_for(merged, train=False)
    with torch.no_grad():
        ref = torch.sigmoid(merged(torch.stack([tf(decode_image(p)) for p in images])).double()).numpy()
    preds = predict_files([uri], images, backbone_source=job.backbone.source)  # the weights one trusts
    got = np.array([[p.probability for p in preds if p.image == img] for img in images])
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    assert {p.kind for p in preds} == {"multi_label"} and len(preds) == 4 * findings.num_classes
    srv = DeltaServer.func_or_class(job.backbone.model_dump(mode="json"), max_deltas=1)
    loaded = srv._load(uri)
    out = srv._run_groups([loaded] * len(images), [srv._decode(open(p, "rb").read()) for p in images])
    for body, want in zip(out, ref):
        np.testing.assert_allclose(body["probabilities"], want, atol=1e-6, rtol=0)
        assert body["task_kind"] == "multi_label" and "class_index" not in body
        assert body["findings"] == [n for n, p in zip(findings.class_names, want) if p >= 0.5]
