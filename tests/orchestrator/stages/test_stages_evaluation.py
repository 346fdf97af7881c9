"""The evaluation file's per-image predictions: stored compactly, checked when read, and enough to reproduce
the split's metrics (what paired bootstrap statistics resample)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from shpeft_core.backbone import BackboneSpec
from shpeft_core.io import write_sealed_json
from shpeft_core.metrics import class_metrics, macro_f1

from orchestrator.stages.evaluation import (EVAL_FORMAT, EvalFileError, encode_predictions, evaluate_artifact,
                                            read_eval, split_predictions, write_eval)
from orchestrator.store.layout import eval_file

from helpers_orch import BACKBONE, backbone_file, random_delta, task_specs  # noqa: F401


@pytest.fixture(scope="module")
def evaluated(task_specs, tmp_path_factory):
    spec = task_specs[0]
    path = tmp_path_factory.mktemp("artifact") / "task.safetensors"
    bb = BackboneSpec(BACKBONE["name"], BACKBONE["source"], BACKBONE["kwargs"])
    random_delta(bb, path, spec.name, spec.names(), seed=3, density=0.05, scale=0.05)
    plan = SimpleNamespace(task=spec.model_dump(mode="json"), use_gpu=False, method="shpeft", artifact_uri=str(path),
                           backbone=dict(BACKBONE), batch_size=7, metric="macro_f1", density=0.05, alpha=0.5)
    row = evaluate_artifact(plan)
    return spec, row, str(path)


def test_stored_predictions_reproduce_the_stored_metrics(evaluated):
    spec, row, path = evaluated
    doc = read_eval(eval_file(path))
    assert doc["format"] == EVAL_FORMAT == "shpeft-eval/3"
    assert "predictions" not in doc["splits"]["test"]  # kept out of the per-split summaries reports copy
    for split in ("val", "test"):
        pred = split_predictions(doc, split)
        n = doc["splits"][split]["n"]
        assert pred["labels"].shape == pred["preds"].shape == (n,) and pred["probs"].shape == (n, spec.num_classes)
        assert pred["probs"].dtype == np.float32
        assert macro_f1(pred["labels"], pred["preds"], spec.num_classes) == row[f"{split}_macro_f1"] \
            == doc["splits"][split]["macro_f1"]
        assert float((pred["labels"] == pred["preds"]).mean()) == row[f"{split}_accuracy"]
        assert np.array(doc["splits"][split]["per_class"]["support"]).tolist() == \
            np.bincount(pred["labels"], minlength=spec.num_classes).tolist()
        auc = class_metrics(pred["labels"], pred["probs"].astype(np.float64), spec.num_classes)["macro_auc"]
        assert auc == pytest.approx(row[f"{split}_auc"], abs=1e-5)  # float32 probabilities
        assert (pred["probs"].argmax(1) == pred["preds"]).mean() > 0.99


def test_predictions_damaged_inside_a_sealed_file_are_refused_by_field(evaluated, tmp_path):
    _, _, path = evaluated
    doc = read_eval(eval_file(path))
    uri = str(tmp_path / "x.eval.json")
    test = doc["predictions"]["test"]
    for bad, why in (({**test, "labels": test["labels"][:-1]}, "labels"),
                     ({**test, "probs": test["probs"][:-8]}, "probs"),
                     ({**test, "probs": "not base64!"}, "unreadable"),
                     ({**test, "preds": [99] * test["n"]}, "outside")):
        write_eval(uri, {**doc, "predictions": {**doc["predictions"], "test": bad}})
        with pytest.raises(EvalFileError, match=why) as err:
            split_predictions(read_eval(uri), "test", uri)
        assert "predictions.test" in str(err.value) and uri in str(err.value)


def test_files_of_the_previous_format_are_read_without_predictions(tmp_path):
    uri = str(tmp_path / "old.eval.json")
    write_sealed_json(uri, {"format": "shpeft-eval/2", "task": "t", "splits": {"test": {"macro_f1": 0.5}},
                            "row": {"test_macro_f1": 0.5}})
    doc = read_eval(uri)
    assert doc["row"]["test_macro_f1"] == 0.5 and split_predictions(doc, "test") is None


def test_encoded_probabilities_are_compact_and_exact_in_float32():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    enc = encode_predictions(probs.argmax(1), probs.argmax(1), probs)
    assert len(enc["probs"]) == 4 * -(-(50 * 4 * 4) // 3)  # base64 of 4 bytes a value
    back = split_predictions({"predictions": {"test": json.loads(json.dumps(enc))}}, "test")
    assert np.array_equal(back["probs"], probs.astype(np.float32))


def test_validation_only_evaluation_measures_nothing_on_test(task_specs, tmp_path):
    spec = task_specs[0]
    path = tmp_path / "tuning.safetensors"
    bb = BackboneSpec(BACKBONE["name"], BACKBONE["source"], BACKBONE["kwargs"])
    random_delta(bb, path, spec.name, spec.names(), seed=4, density=0.05, scale=0.05)
    plan = SimpleNamespace(task=spec.model_dump(mode="json"), use_gpu=False, method="shpeft", artifact_uri=str(path),
                           backbone=dict(BACKBONE), batch_size=7, metric="macro_f1", density=0.05, alpha=0.5)
    row = evaluate_artifact(plan, on=("val",))
    assert "val_macro_f1" in row and not any(k.startswith("test_") for k in row)
    doc = read_eval(eval_file(str(path)))
    assert set(doc["splits"]) == set(doc["predictions"]) == {"val"}


def test_multi_label_predictions_round_trip_with_unknown_findings():
    labels = np.array([[1.0, np.nan, 0.0], [0.0, 1.0, np.nan]])
    probs = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.5]])
    stored = encode_predictions(labels, None, probs)
    got = split_predictions({"predictions": {"test": stored}}, "test")
    assert np.array_equal(np.isnan(got["labels"]), np.isnan(labels))
    assert np.array_equal(np.nan_to_num(got["labels"], nan=-1), np.nan_to_num(labels, nan=-1))
    assert np.allclose(got["probs"], probs) and got["probs"].dtype == np.float32
    with pytest.raises(EvalFileError, match="findings"):
        split_predictions({"predictions": {"test": {**stored, "n": 3}}}, "test")
