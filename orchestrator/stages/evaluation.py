"""Evaluation of a saved artifact: a freshly built backbone with the artifact applied, on val and test.

Besides the row's summary metrics it writes the artifact's evaluation file (``store.eval_file``): the
training history saved inside the artifact, each split's confusion matrix and per-class sensitivity,
specificity and one-vs-rest AUC (multi_label tasks: ``per_finding`` instead, each finding's AUROC, F1,
sensitivity and specificity at its threshold, and ROC curve), the class names, the task kind, the sha256
of the artifact the numbers belong to, the catalogue fields (``row``), every image's label, prediction and
class probabilities per split (``predictions``, so reports can resample images; a multi_label task's
findings and probabilities), and a sha256 of its own content, checked by ``read_eval``. A multi_label
task's thresholds are chosen on validation (best F1 per finding) and applied unchanged to test; an
ordinal task's rows hold quadratic weighted kappa. A comparison's tuning runs are evaluated on validation
alone (``on``): nothing about them is measured on test.

``predictions[split]``: ``labels`` and ``preds`` (the arg-max the split's metrics were computed from)
as integer lists in the split's loader order (unshuffled: the same order for every method and seed),
and ``probs``, the [n, num_classes] softmax as little-endian float32 in base64 (4 bytes a value instead
of ~20 as JSON text). A multi_label task's have ``findings`` instead of labels and preds: the [n, C]
targets as int8 in base64 (1 present, 0 absent, -1 unknown), and ``probs`` each finding's sigmoid. ``split_predictions`` decodes and checks them; from labels and preds the
split's macro-F1 and accuracy are reproduced exactly. Files of format /2 (before predictions were
stored) are still read; they lack ``predictions`` and ``split_predictions`` returns None for them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shpeft_core.options import EVAL_SPLITS, SUMMARY_METRICS

from orchestrator.store.evaluation_files import EVAL_FORMAT, EvalFileError, read_eval, write_eval

__all__ = ["EVAL_FORMAT", "EvalFileError", "evaluate_artifact", "read_eval", "write_eval", "encode_predictions",
           "split_predictions"]


def evaluate_artifact(plan, batch_size: int | None = None, on: tuple[str, ...] = EVAL_SPLITS) -> dict[str, Any]:
    """Metrics of the saved artifact (a fresh backbone + the artifact, on the splits ``on``: val and test) as row
    fields; writes its evaluation file beside it. A multi_label task's thresholds are chosen on val, so
    val must be among the splits."""
    import torch

    from shpeft_core.artifacts import artifact_metadata, artifact_sha256, artifact_size
    from shpeft_core.methods import get_method, load_artifact
    from shpeft_core.train import evaluate
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for
    from tasks.spec import TaskSpec

    from orchestrator.runtime.console import now
    from orchestrator.store.layout import eval_file
    from shpeft_core.backbone import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(plan.task)
    device = "cuda" if plan.use_gpu and torch.cuda.is_available() else "cpu"
    model = load_artifact(build_backbone(plan.backbone, spec.num_classes), plan.method, plan.artifact_uri)
    model.to(device).eval()
    tf = transform_for(model, train=False)
    out: dict[str, Any] = {}
    splits: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    thresholds = None  # multi_label: chosen on val (the first split), applied to test
    for split in (s for s in EVAL_SPLITS if s in on):
        loader = build_loader(spec, split, transform=tf, batch_size=batch_size or plan.batch_size,
                              cache=getattr(plan, "data_cache", None))
        got = evaluate(model, loader, num_classes=spec.num_classes, device=device, per_class=True, kind=spec.kind,
                       thresholds=thresholds, predictions=True)
        p = got.pop("predictions")
        predictions[split] = encode_predictions(p["labels"], p.get("preds"), p["probs"])
        if spec.kind == "multi_label":
            thresholds = got["per_finding"]["threshold"]
        splits[split] = got
        for k in (m for m in SUMMARY_METRICS if m in got):  # kappa: ordinal tasks only
            out[f"{split}_{k}"] = float(got[k])
    kind = get_method(plan.method).artifact
    if kind == "delta":
        from shpeft_core.delta import load_delta

        delta = load_delta(plan.artifact_uri)
        sparse = int(sum(v.numel() for v in delta.values.values()))
        dense = int(sum(v.numel() for v in delta.dense.values()))
        out.update(sparse_values=sparse, dense_values=dense,
                   trainable=sparse + dense + int(sum(v.numel() for v in delta.head.values())))
        if delta.metadata.get("effective_alpha"):
            out["effective_alpha"] = float(delta.metadata["effective_alpha"])
    sha = artifact_sha256(plan.artifact_uri, kind)
    meta = artifact_metadata(plan.artifact_uri, kind)
    doc = {
        "format": EVAL_FORMAT,
        "task": spec.name,
        "method": plan.method,
        "metric": plan.metric,
        "class_names": spec.names(),
        "task_kind": spec.kind,
        "artifact_uri": plan.artifact_uri,
        "artifact_kind": kind,
        "artifact_sha256": sha,
        "density": plan.density,
        "alpha": plan.alpha,
        # Written by the training loop into the artifact; absent from artifacts of older versions.
        "history": json.loads(meta["history"]) if meta.get("history") else None,
        "splits": splits,
        "predictions": predictions,
        "written_at": now(),
    }
    out.update(sha256=sha, bytes=artifact_size(plan.artifact_uri, kind), eval_s=time.perf_counter() - t0)
    write_eval(eval_file(plan.artifact_uri), {**doc, "row": out})
    return out


def encode_predictions(labels, preds, probs) -> dict[str, Any]:
    """One split's per-image labels, arg-max predictions and probabilities, as stored in the file; a
    multi_label task's (``preds`` None, ``labels`` [n, C] with NaN unknown) as findings and probabilities."""
    import base64

    import numpy as np

    probs = np.asarray(probs, dtype="<f4")
    out = {"n": int(probs.shape[0]), "num_classes": int(probs.shape[1]),
           "probs": base64.b64encode(probs.tobytes()).decode("ascii")}
    if preds is None:
        y = np.asarray(labels, dtype=np.float64)
        coded = np.where(np.isnan(y), -1, y).astype(np.int8)
        return {**out, "findings": base64.b64encode(coded.tobytes()).decode("ascii")}
    return {**out, "labels": [int(v) for v in labels], "preds": [int(v) for v in preds]}


def split_predictions(doc: dict[str, Any], split: str, uri: str = "") -> dict[str, Any] | None:
    """``{"labels", "preds": int64 [n], "probs": float32 [n, C]}`` of ``split`` from a file read by
    ``read_eval`` (a multi_label task's: ``{"labels": float [n, C] with NaN unknown, "probs"}``); None for a
    file written before predictions were stored. Raises EvalFileError naming the field when they do not
    fit together."""
    import base64
    import binascii

    import numpy as np

    stored = (doc.get("predictions") or {}).get(split)
    if stored is None:
        return None
    where = f"evaluation file {uri or doc.get('artifact_uri', '')}: predictions.{split}"
    if "findings" in stored:
        return _finding_predictions(stored, where)
    try:
        n, c = int(stored["n"]), int(stored["num_classes"])
        labels = np.asarray(stored["labels"], dtype=np.int64)
        preds = np.asarray(stored["preds"], dtype=np.int64)
        raw = base64.b64decode(stored["probs"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise EvalFileError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    if labels.shape != (n,) or preds.shape != (n,):
        raise EvalFileError(f"{where}: {labels.size} labels and {preds.size} preds for n = {n}")
    if len(raw) != 4 * n * c:
        raise EvalFileError(f"{where}: probs holds {len(raw)} bytes, expected {4 * n * c} (n = {n}, {c} classes)")
    if n and (min(labels.min(), preds.min()) < 0 or max(labels.max(), preds.max()) >= c):
        raise EvalFileError(f"{where}: a label or prediction outside [0, {c})")
    return {"labels": labels, "preds": preds, "probs": np.frombuffer(raw, dtype="<f4").reshape(n, c)}


def _finding_predictions(stored: dict[str, Any], where: str) -> dict[str, Any]:
    import base64
    import binascii

    import numpy as np

    try:
        n, c = int(stored["n"]), int(stored["num_classes"])
        coded = np.frombuffer(base64.b64decode(stored["findings"], validate=True), dtype=np.int8)
        raw = base64.b64decode(stored["probs"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise EvalFileError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    if coded.size != n * c or len(raw) != 4 * n * c:
        raise EvalFileError(f"{where}: {coded.size} findings and {len(raw)} probability bytes for n = {n}, {c} findings")
    if not np.isin(coded, (-1, 0, 1)).all():
        raise EvalFileError(f"{where}: a finding outside 1 / 0 / -1 (unknown)")
    labels = np.where(coded == -1, np.nan, coded).astype(np.float64).reshape(n, c)
    return {"labels": labels, "probs": np.frombuffer(raw, dtype="<f4").reshape(n, c)}
