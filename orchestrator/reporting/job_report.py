"""`shpeft report`: one job's report for clinicians and reviewers, written beside the run's plots.

``<store>/plots/<job_id>/report.md`` with its PNGs, and ``report.json`` holding the same numbers for
machines. Per task: learning curves from the history saved with the artifact, the test split's confusion
matrix, per-class sensitivity, specificity and one-vs-rest AUC with their macro values (a multi-label
task: a per-finding table of AUROC, F1, sensitivity and specificity at thresholds chosen on validation,
and the test ROC curves; an ordinal task adds quadratic weighted kappa), and the sweep's trials when the
job had one; for the job: where the sparse methods' selected weights sit. Everything
comes from files in the store (the catalogue, each artifact's evaluation file, sweep summaries), so a
job written before evaluation files existed still gets what can be shown, and the report says what
is missing and why.
"""

from __future__ import annotations

import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shpeft_core.options import DEFAULT_METRIC, METRIC_LABELS  # noqa: E402
from shpeft_core.io import atomic_write_bytes, exists, join_uri, read_bytes  # noqa: E402

from orchestrator.store import layout as layout  # noqa: E402
from orchestrator.reporting.plots import (log_density_axis, plot_roc_curves, plot_selection_location,  # noqa: E402
                                          save_png)

__all__ = ["JobReportError", "write_job_report", "fmt"]


class JobReportError(ValueError):
    """The job is not in the store's catalogue."""


_METRIC_LABELS = METRIC_LABELS
_LOSS_LABELS = {"multi_label": "binary cross-entropy loss (mean over findings)"}


def _metric_label(metric: str) -> str:
    return _METRIC_LABELS.get(metric, metric.replace("_", " "))


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: ``n/a`` where it is undefined (e.g. the AUC of a class absent from the split)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _job_doc(store: str, job_id: str):
    """The job as run (jobs/<id>.json), or None when it is missing, no longer parses, or is not the job of
    that id (its content hashes to the id: a changed file does not)."""
    from orchestrator.job.spec import JobSpecError
    from orchestrator.job.keys import job_id as id_of
    from orchestrator.job.load import parse_job

    uri = layout.job_file(store, job_id)
    if not exists(uri):
        return None
    try:
        job = parse_job(json.loads(read_bytes(uri)), uri)
    except (JobSpecError, ValueError):
        return None
    return job if id_of(job) == job_id else None


def _checkpoint_history(store: str, job_id: str, row: dict) -> list[dict] | None:
    """The history in the run's newest checkpoint (one-worker runs keep theirs): curves for older jobs."""
    from shpeft_core.train import read_train_history

    root = layout.run_checkpoints(layout.run_root(store, job_id, row["task"], row.get("config_hash") or ""))
    for k in layout.checkpoint_epochs(root):
        history = read_train_history(layout.checkpoint_dir(root, k))
        if history:
            return history
    return None


def _sweep(store: str, row: dict) -> dict | None:
    if not row.get("sweep_trials") or not row.get("config_hash"):
        return None
    # a damaged summary is said under "Missing from this report", as one that is gone
    return layout.read_sweep_summary(layout.sweep_root(store, row["task"], row["config_hash"]))


# ---------------------------------------------------------------- plots


def _plot_curves(task: str, metric: str, history: list[dict], uri: str, kind: str = "single_label") -> str:
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="training loss")
    if any(h.get("loss") is not None for h in history):
        ax1.plot(epochs, [h.get("loss") for h in history], marker="s", label="validation loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(_LOSS_LABELS.get(kind, "cross-entropy loss"))
    ax1.set_title(f"{task}: loss per epoch")
    ax1.legend(fontsize=8)
    shown = [m for m in dict.fromkeys((metric, "accuracy")) if any(h.get(m) is not None for h in history)]
    lo = min([0.0] + [h[m] for h in history for m in shown if h.get(m) is not None])  # kappa can be negative
    for m in shown:
        ax2.plot(epochs, [h.get(m) for h in history], marker="o", label=f"validation {_metric_label(m)}")
    ax2.set_ylim(lo - 0.02, 1.02)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation score (at most 1)")
    ax2.set_title(f"{task}: validation score per epoch")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: math.ceil(len(epochs) / 20)])
    return save_png(fig, uri)


def _plot_confusion(task: str, split: str, names: list[str], cm: list[list[int]], uri: str) -> str:
    import numpy as np

    mat = np.asarray(cm, dtype=float)
    rows = mat.sum(1, keepdims=True)
    share = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    size = 2.2 + 0.75 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30 if max(map(len, names)) > 6 else 0, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(mat[i, j])}\n{share[i, j]:.0%}" if rows[i, 0] else "0", ha="center", va="center",
                    fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class's cases")
    ax.set_title(f"{task}: {split} split confusion matrix (n = {int(mat.sum())})")
    return save_png(fig, uri)


def _plot_sweep(task: str, metric: str, trials: list[dict], best: dict | None, uri: str) -> str | None:
    pts = [t for t in trials if t.get("val_metric") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4))
    sc = ax.scatter([t["density"] for t in pts], [t["val_metric"] for t in pts], c=[t["alpha"] for t in pts],
                    cmap="viridis", vmin=0, vmax=1, s=40, edgecolors="k", linewidths=0.5)
    if best is not None:
        ax.scatter([best["density"]], [best["val_metric"]], marker="*", s=260, facecolors="none", edgecolors="red",
                   linewidths=1.5, label="best trial (its model is the task's)")
        ax.legend(fontsize=8, loc="lower right")
    log_density_axis(ax)
    lo, hi = min(t["val_metric"] for t in pts), max(t["val_metric"] for t in pts)
    pad = max(0.05, 0.1 * (hi - lo))
    ax.set_ylim(max(-0.02, lo - pad), min(1.02, hi + pad))
    ax.set_xlabel("density (fraction of eligible weights trained, log scale)")
    ax.set_ylabel(f"validation {_metric_label(metric)}")
    fig.colorbar(sc, ax=ax, label="alpha (1 = task-specific, 0 = task-agnostic)")
    ax.set_title(f"{task}: sweep trials ({len(trials)})")
    return save_png(fig, uri)


# ---------------------------------------------------------------- Markdown pieces


def _class_table(names: list[str], split: dict) -> list[str]:
    pc = split["per_class"]
    lines = ["| class | cases | sensitivity (recall) | specificity | AUC (one-vs-rest) |", "|---|---:|---:|---:|---:|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {pc['support'][i]} | {fmt(pc['sensitivity'][i])} | {fmt(pc['specificity'][i])} | "
                     f"{fmt(pc['auc'][i])} |")
    lines.append(f"| **macro (mean over classes)** | {split['n']} | {fmt(pc['macro_sensitivity'])} | "
                 f"{fmt(pc['macro_specificity'])} | {fmt(pc['macro_auc'])} |")
    return lines


def _finding_table(names: list[str], split: dict) -> list[str]:
    pf = split["per_finding"]
    lines = ["| finding | positive / negative / unknown | AUROC | F1 | threshold | sensitivity | specificity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {pf['positives'][i]} / {pf['negatives'][i]} / {pf['unknown'][i]} | {fmt(pf['auc'][i])} | "
                     f"{fmt(pf['f1'][i])} | {fmt(pf['threshold'][i])} | {fmt(pf['sensitivity'][i])} | "
                     f"{fmt(pf['specificity'][i])} |")
    lines.append(f"| **macro (mean over findings)** | {split['n']} images | {fmt(pf['macro_auc'])} | {fmt(pf['macro_f1'])} | "
                 f"| {fmt(pf['macro_sensitivity'])} | {fmt(pf['macro_specificity'])} |")
    return lines


def _trial_table(metric: str, summary: dict) -> list[str]:
    best = summary.get("best") or {}
    trials = sorted(summary["trials"], key=lambda t: (t.get("started_at") or 0, t.get("trial_id") or ""))
    lines = [f"| trial | density | alpha | learning rate | epochs run | validation {_metric_label(metric)} | best |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, t in enumerate(trials, 1):
        value = "failed" if t.get("error") else fmt(t.get("val_metric"))
        is_best = best and t.get("trial_id") == best.get("trial_id")
        lines.append(f"| {i} | {t['density']:.3g} | {t['alpha']:.3f} | {t.get('lr', float('nan')):.2g} | "
                     f"{t.get('epochs') if t.get('epochs') is not None else 'n/a'} | {value} | "
                     f"{'**best**' if is_best else ''} |")
    return lines


def _intro(job, job_id: str, store: str, tasks: list[str]) -> list[str]:
    what = ""
    if job is not None:
        from shpeft_core.backbone import source_label

        src = source_label(job.backbone.source)
        what = (f"Backbone `{job.backbone.name}` (weights: {'random initialisation' if src == 'random' else src}); "
                f"{job.training.epochs} epoch(s) per task"
                + (f"; sweep of {job.sweep.trials_per_task} trial(s) per task" if job.sweep.enabled else "") + ". ")
    return [
        f"# Report of job `{job_id}`",
        "",
        f"{what}{len(tasks)} task(s): {', '.join(tasks)}. Store `{store}`.",
        "",
        "All numbers come from each task's saved model (the artifact applied to a freshly built backbone). "
        "The test split was used neither for training nor for choosing a model. How to read the per-class "
        "tables: *sensitivity* (recall) is the share of a class's cases the model assigns to that class; "
        "*specificity* is the share of the other cases it does not assign to that class; *AUC* is the area "
        "under the one-vs-rest ROC curve of the class's predicted probability (0.5 = chance, 1 = perfect). "
        "`n/a` marks a value that is undefined on the split, e.g. the AUC of a class with no case in it. "
        "A multi-label task has one probability per finding: its table gives each finding's AUROC and its F1, "
        "sensitivity and specificity at a threshold chosen on the validation split (the best F1 there); "
        "*unknown* counts images whose label for the finding was uncertain and ignored. An ordinal task "
        "(grades) also reports quadratic weighted kappa: agreement beyond chance, with far-off grades weighing "
        "more (1 = perfect, 0 = chance).",
        "",
    ]


# ---------------------------------------------------------------- the report


def _agnostic_line(row: dict) -> list[str]:
    """Which task-agnostic map the task's selection mixed in (none for methods that use none)."""
    source, pool = row.get("agnostic_source"), row.get("agnostic_pool")
    if source == "magnitude":
        return ["Task-agnostic map: the pre-trained weights' magnitude |w| (no other dataset to pool)."]
    if source in ("pool", "pool+magnitude"):
        blend = ", blended with |w|" if source == "pool+magnitude" else ""
        return [f"Task-agnostic map: the importance pooled over {pool or 'the other datasets'}{blend}."]
    return []


def _task_section(store: str, job_id: str, row: dict, root: str, pngs: list[str], missing: list[str]) -> tuple[list[str], dict]:
    from orchestrator.store.evaluation_files import EvalFileError, read_eval

    task, metric = row["task"], row.get("metric") or DEFAULT_METRIC
    lines = [f"## Task `{task}`", ""]
    data: dict[str, Any] = {"status": row.get("status"), "method": row.get("method"), "metric": metric}
    if row.get("status") != "ok":
        lines += [f"This task failed: {row.get('error') or 'no error recorded'}.", "",
                  f"Its whole log, with the traceback: `shpeft logs {store} {job_id} --task {task}`.", ""]
        return lines, data
    ev, ev_uri = None, None
    if row.get("delta_uri"):
        ev_uri = layout.eval_file(row["delta_uri"])
        try:
            ev = read_eval(ev_uri)
        except EvalFileError as exc:
            missing.append(f"`{task}`: {exc}; it is not used. Rerun the job with `--force`.")
        else:
            if ev is not None and ev.get("artifact_sha256") != row.get("sha256"):
                missing.append(f"`{task}`: its evaluation file belongs to another artifact than the catalogue's "
                               "(sha256 differs); it is not used. Rerun the job with `--force`.")
                ev = None
            elif ev is None:
                missing.append(f"`{task}`: no evaluation file (the job ran before they were written), so no "
                               "confusion matrix or per-class metrics. Rerun the job with "
                               "`shpeft run JOB.yaml --force` to get them.")
    verified = layout.row_verified(row, row.get("config_hash") or "")
    sweep = _sweep(store, row)
    lines += [
        f"Method `{row.get('method')}`"
        + (f", density {row['density']:.3g}, alpha {row['alpha']:.3g}" if row.get("density") is not None else "")
        + (f", {row['trainable']:,} trainable parameters" if row.get("trainable") else "")
        + f"; model selection metric: validation {_metric_label(metric)}"
        + (f"; chosen by a sweep of {row['sweep_trials']} trial(s)" if row.get("sweep_trials") else "") + ".",
        *_agnostic_line(row),
        _headline(row, ev),
        # Paths carry content hashes; people get the check, report.json and `shpeft show` the path.
        ("The saved model is the one the catalogue recorded (sha256 verified)." if verified else
         "**The saved model is missing, or its sha256 does not match the catalogue's.**"),
        "",
    ]
    data.update(agnostic_source=row.get("agnostic_source"), agnostic_pool=row.get("agnostic_pool"),
                artifact_uri=row.get("delta_uri"), artifact_sha256=row.get("sha256"), artifact_verified=verified,
                eval_uri=ev_uri if ev is not None else None)

    history = ev.get("history") if ev else None
    source = "the artifact"
    if not history:
        history = _checkpoint_history(store, job_id, row)
        source = "the run's last checkpoint"
    lines += ["### Learning curves", ""]
    if history:
        pngs.append(_plot_curves(task, metric, history, join_uri(root, f"{task}_curves.png"),
                                 (ev or {}).get("task_kind") or "single_label"))
        lines += [f"![{task}: learning curves]({task}_curves.png)", "",
                  f"{len(history)} epoch(s), from the history saved in {source}. The validation score is measured "
                  "after each epoch on the validation split.", ""]
    else:
        lines += ["No per-epoch history was saved for this task.", ""]
        missing.append(f"`{task}`: no learning curves (no history in an evaluation file or a checkpoint).")
    data["history"] = history

    if ev is not None and "per_finding" in ev["splits"]["test"]:
        names = ev["class_names"]
        test, val = ev["splits"]["test"], ev["splits"]["val"]
        curves = {n: c for n, c in zip(names, test["per_finding"].get("roc") or []) if c}
        lines += [f"### Test split (n = {test['n']} images)", "", *_finding_table(names, test), ""]
        if curves:
            pngs.append(plot_roc_curves({task: curves}, join_uri(root, f"{task}_roc.png"),
                                        title=f"{task}: test ROC curve per finding"))
            lines += [f"![{task}: test ROC curves]({task}_roc.png)", ""]
        lines += [f"Validation split (n = {val['n']} images, where the thresholds were chosen): mean AUROC "
                  f"{fmt(val['per_finding']['macro_auc'])}, macro-F1 {fmt(val['per_finding']['macro_f1'])}.", ""]
        data.update(class_names=names, test=test, val=val)
    elif ev is not None:
        names = ev["class_names"]
        test, val = ev["splits"]["test"], ev["splits"]["val"]
        pngs.append(_plot_confusion(task, "test", names, test["per_class"]["confusion"],
                                    join_uri(root, f"{task}_confusion.png")))
        lines += [f"### Test split (n = {test['n']})", "",
                  f"![{task}: test confusion matrix]({task}_confusion.png)", "",
                  *_class_table(names, test), "",
                  f"Validation split (n = {val['n']}): macro sensitivity {fmt(val['per_class']['macro_sensitivity'])}, "
                  f"macro specificity {fmt(val['per_class']['macro_specificity'])}, "
                  f"macro AUC {fmt(val['per_class']['macro_auc'])}.", ""]
        data.update(class_names=names, test=test, val=val)

    if sweep is not None:
        png = _plot_sweep(task, metric, sweep["trials"], sweep.get("best"), join_uri(root, f"{task}_sweep.png"))
        lines += [f"### Sweep ({len(sweep['trials'])} trial(s))", "",
                  "Each trial trained the task at another density / alpha / learning rate; trials that showed "
                  "no promise were stopped early (fewer epochs run). The best trial by the last validation "
                  "score is the task's model.", "", *_trial_table(metric, sweep), ""]
        if png:
            pngs.append(png)
            lines += [f"![{task}: sweep trials]({task}_sweep.png)", ""]
        data["sweep"] = {"trials": sweep["trials"], "best_trial_id": (sweep.get("best") or {}).get("trial_id")}
    elif row.get("sweep_trials"):
        missing.append(f"`{task}`: the sweep's trial summary (trials.json) is gone from the store or damaged.")
    return lines, data


def _headline(row: dict, ev: dict | None) -> str:
    if (ev or {}).get("task_kind") == "multi_label":
        return (f"Test mean AUROC {fmt(row.get('test_auc'))}, macro-F1 {fmt(row.get('test_macro_f1'))} and mean "
                f"accuracy {fmt(row.get('test_accuracy'))} over findings at thresholds chosen on validation "
                f"(validation: {fmt(row.get('val_auc'))}, {fmt(row.get('val_macro_f1'))}, "
                f"{fmt(row.get('val_accuracy'))}).")
    kappa = (f"; quadratic weighted kappa {fmt(row.get('test_kappa'))} (validation {fmt(row.get('val_kappa'))})"
             if row.get("test_kappa") is not None or row.get("val_kappa") is not None else "")
    return (f"Test accuracy {fmt(row.get('test_accuracy'))}, macro-F1 {fmt(row.get('test_macro_f1'))}, "
            f"macro AUC {fmt(row.get('test_auc'))} (validation: {fmt(row.get('val_accuracy'))}, "
            f"{fmt(row.get('val_macro_f1'))}, {fmt(row.get('val_auc'))}){kappa}.")


def _masks(rows: list[dict]) -> dict[str, Any]:
    """Selected indices of each task trained with a sparse method, labelled by task name."""
    from shpeft_core.delta import load_delta
    from shpeft_core.methods import MethodError, get_method

    def uses_mask(name) -> bool:
        try:
            return get_method(name).uses_mask
        except MethodError:  # a row of a method this installation does not know
            return False

    masks = {}
    methods = {r.get("method") for r in rows}
    for r in rows:
        if (r.get("status") == "ok" and uses_mask(r.get("method")) and r.get("artifact_kind") == "delta"
                and r.get("delta_uri") and exists(r["delta_uri"])):
            label = r["task"] if len(methods) == 1 else f"{r['task']} ({r['method']})"
            masks[label] = load_delta(r["delta_uri"]).indices
    return masks


_RUN_PLOTS = (("importance_mass_per_layer.png", "share of importance per layer, per dataset and task-agnostic pool"),
              ("density_vs_metric.png", "density vs validation metric over all tasks (line: Pareto front)"),
              ("alpha_vs_metric.png", "alpha vs validation metric over all tasks"))


def write_job_report(store: str, job_id: str) -> tuple[str, list[str]]:
    """Write report.md, report.json and the PNGs for ``job_id`` under <store>/plots/<job_id>/.

    Returns (report.md URI, PNG URIs). Raises JobReportError when the store's catalogue has no such job.
    """
    from orchestrator.store.results import read_catalogue
    from orchestrator.runtime.console import now
    from orchestrator.job.spec import task_name

    store = layout.normalise_store(store)
    rows = read_catalogue(store, job_id).to_pylist()
    if not rows:
        known = sorted({r["job_id"] for r in read_catalogue(store, on_damaged=lambda _: None).to_pylist()})
        raise JobReportError(f"no job {job_id!r} in the catalogue of {store}; known jobs: {', '.join(known) or 'none'}")
    job = _job_doc(store, job_id)
    order = [task_name(e) for e in job.tasks] if job is not None else []
    rows.sort(key=lambda r: (order.index(r["task"]) if r["task"] in order else len(order), r["task"]))
    tasks = [r["task"] for r in rows]
    root = layout.plots_dir(store, job_id)
    pngs: list[str] = []
    missing: list[str] = []
    if job is None:
        missing.append(f"the job file (`{layout.job_file(store, job_id)}`) is missing, unreadable, or not this job's: "
                       "backbone and settings are not shown.")

    sections, per_task = [], {}
    for r in rows:
        lines, data = _task_section(store, job_id, r, root, pngs, missing)
        sections += lines
        per_task[r["task"]] = data

    kappa = any(r.get("test_kappa") is not None for r in rows)
    summary = ["## Summary (test split)", "",
               "| task | status | method | cases | accuracy | macro-F1 | macro sensitivity | macro specificity | macro AUC |"
               + (" kappa |" if kappa else ""),
               "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if kappa else "")]
    for r in rows:
        test = per_task[r["task"]].get("test") or {}
        pc = test.get("per_class") or test.get("per_finding") or {}  # findings: per-finding means
        n = test.get("n")
        summary.append(f"| {r['task']} | {r.get('status')} | {r.get('method') or 'n/a'} | {n if n is not None else 'n/a'} | "
                       f"{fmt(r.get('test_accuracy'))} | {fmt(r.get('test_macro_f1'))} | "
                       f"{fmt(pc.get('macro_sensitivity'))} | {fmt(pc.get('macro_specificity'))} | "
                       f"{fmt(r.get('test_auc'))} |" + (f" {fmt(r.get('test_kappa'))} |" if kappa else ""))

    lines = [*_intro(job, job_id, store, tasks), *summary, "", *sections]
    masks = _masks(rows)
    png = plot_selection_location(masks, join_uri(root, "selection_location.png"),
                                  title="where the selected weights sit: per transformer block")
    if png:
        pngs.append(png)
        lines += ["## Where the selected weights sit", "",
                  "Share of each task's selected (trained) backbone weights per transformer block, in network "
                  "order, and per module type.", "", "![where the selected weights sit](selection_location.png)", ""]
    run_plots = [(f, what) for f, what in _RUN_PLOTS if exists(join_uri(root, f))]
    if run_plots:
        lines += ["## Other plots of the run", ""] + [f"- [{what}]({f})" for f, what in run_plots] + [""]
    if missing:
        lines += ["## Missing from this report", "", *[f"- {m}" for m in missing], ""]
    lines += [f"Written {now()} by `shpeft report`; the same numbers are in `report.json` beside this file.", ""]

    from shpeft_core.metrics import json_safe

    doc = {"job_id": job_id, "store": store, "written_at": now(), "tasks": per_task, "missing": missing}
    atomic_write_bytes(layout.job_report_json(store, job_id), json.dumps(json_safe(doc), indent=1, allow_nan=False).encode())
    uri = layout.job_report_file(store, job_id)
    atomic_write_bytes(uri, "\n".join(lines).encode())
    return uri, pngs
