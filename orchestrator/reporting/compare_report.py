"""The comparison report: a Markdown table of mean ± std per task and method, and the PNGs beside it.

Macro-F1 is the common table; tasks of other kinds add their own: a multi-label task's per-finding test
AUROC per method (mean over seeds) and ROC curves (each method's first seed), an ordinal task's quadratic
weighted kappa. Those come from the runs' evaluation files (orchestrator/stages/evaluation.py)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shpeft_core.options import DEFAULT_METRIC  # noqa: E402
from shpeft_core.io import atomic_write_bytes, exists, join_uri  # noqa: E402

from orchestrator.reporting.plots import (plot_roc_curves, plot_selection_location, save_png as _save,  # noqa: E402
                                          selection_location)
from orchestrator.store.layout import compare_report_file  # noqa: E402

__all__ = ["write_report", "summarise", "mean_over_tasks", "selection_location", "mask_jaccard"]

METRIC = DEFAULT_METRIC
REFERENCE_METHOD = "shpeft"  # the method every other one is measured against


def _on_alpha_curve(method: str) -> bool:
    """The hybrid and its alpha = 0 / 1 ends: methods whose results lie on one alpha axis."""
    from shpeft_core.methods import MethodError, get_method
    from shpeft_core.methods.sparse import Hybrid

    try:
        return isinstance(get_method(method), Hybrid)
    except MethodError:
        return False


def _label(r: dict[str, Any], job_mix: str) -> str:
    """A row's method label: its variant (rule and own density) where recorded."""
    from shpeft_core.methods import get_method

    return r.get("variant") or get_method(r["method"]).label(r.get("mix") or job_mix)


def _at_job_density(r: dict[str, Any]) -> bool:
    return " @ " not in (r.get("variant") or "")


def summarise(rows: list[dict[str, Any]], job_mix: str, split: str = "test",
              metric: str = METRIC) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(task, method label) -> (mean, std, n) of the split's ``metric`` (macro-F1) over the ok runs."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        v = r.get(f"{split}_{metric}")
        if r.get("status") == "ok" and v is not None and not math.isnan(v):
            groups.setdefault((r["task"], _label(r, job_mix)), []).append(float(v))
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def mean_over_tasks(summary, label: str, tasks: list[str]) -> float | None:
    """A method label's mean over ``tasks`` of ``summarise``'s means; None unless every task has one."""
    vals = [summary[(t, label)][0] for t in tasks if (t, label) in summary]
    return statistics.fmean(vals) if len(vals) == len(tasks) and vals else None


def _table(summary, tasks: list[str], labels: list[str], bold: set[tuple[str, str]] | None = None) -> list[str]:
    """Mean ± std per (method, task) and the mean over tasks; ``bold``: the cells to bold (significantly best)."""
    bold = bold or set()
    head = "| method | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 1)]
    means = {lab: mean_over_tasks(summary, lab, tasks) for lab in labels}
    for lab in labels:
        cells = []
        for t in tasks:
            if (t, lab) not in summary:
                cells.append("-")
                continue
            m, s, _ = summary[(t, lab)]
            cell = f"{m:.3f} ± {s:.3f}"
            cells.append(f"**{cell}**" if (t, lab) in bold else cell)
        mean = means[lab]
        mean_cell = "-" if mean is None else f"{mean:.3f}"
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {mean_cell} |")
    return lines


def mask_jaccard(a: dict[str, Any], b: dict[str, Any]) -> float:
    sa = {(n, int(i)) for n, idx in a.items() for i in idx.tolist()}
    sb = {(n, int(i)) for n, idx in b.items() for i in idx.tolist()}
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def _plot_metric_vs_trainable(rows, job_mix: str, labels: list[str], uri: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, lab in enumerate(labels):
        pts = [(r["trainable"], r[f"test_{METRIC}"]) for r in rows
               if r.get("status") == "ok" and _label(r, job_mix) == lab and r.get("trainable")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=lab, color=f"C{i % 10}", alpha=0.7, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {METRIC}")
    ax.set_title("test macro-F1 vs trainable parameters (one point per task and seed)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, uri)


def _plot_alpha_curve(rows, tasks: list[str], job_mix: str, uri: str) -> str | None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for i, t in enumerate(tasks):
        by_alpha: dict[float, list[float]] = {}
        for r in rows:
            if (r["task"] == t and r.get("status") == "ok" and _on_alpha_curve(r["method"]) and _at_job_density(r)
                    and r.get("mix") in (None, job_mix) and r.get("alpha") is not None):
                by_alpha.setdefault(float(r["alpha"]), []).append(float(r[f"test_{METRIC}"]))
        if len(by_alpha) < 2:
            continue
        xs = sorted(by_alpha)
        ys = [statistics.fmean(by_alpha[x]) for x in xs]
        es = [statistics.stdev(by_alpha[x]) if len(by_alpha[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=t, color=f"C{i % 10}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("alpha (0 = task-agnostic only, 1 = task-specific only)")
    ax.set_ylabel(f"test {METRIC} (mean ± std over seeds)")
    ax.set_title(f"alpha curve at the job's density ({job_mix} rule)")
    ax.legend(fontsize=7)
    return _save(fig, uri)


def _shpeft_masks(rows, tasks: list[str], job_mix: str) -> dict[str, dict[str, Any]]:
    from shpeft_core.delta import load_delta

    masks = {}
    for t in tasks:
        cands = sorted((r for r in rows if r["task"] == t and r["method"] == REFERENCE_METHOD
                        and r.get("mix") in (None, job_mix) and _at_job_density(r)
                        and r.get("status") == "ok" and r.get("artifact_uri") and exists(r["artifact_uri"])),
                       key=lambda r: r["seed"])
        if cands:
            masks[t] = load_delta(cands[0]["artifact_uri"]).indices
    return masks


def _plot_overlap(masks: dict[str, dict[str, Any]], uri: str) -> tuple[str | None, list[list[float]]]:
    names = list(masks)
    if len(names) < 2:
        return None, []
    mat = [[mask_jaccard(masks[a], masks[b]) for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 1.0 * len(names)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{mat[i][j]:.2f}", ha="center", va="center", color="w" if mat[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("task-to-task Jaccard overlap of SH-PEFT masks")
    return _save(fig, uri), mat


def _claims(summary, tasks: list[str], labels: list[str], job_mix: str) -> list[str]:
    from shpeft_core.methods import get_method

    ref = get_method(REFERENCE_METHOD)
    sh = ref.label(job_mix)
    means = {lab: mean_over_tasks(summary, lab, tasks) for lab in labels}
    out = []
    if means.get(sh) is None:
        return out
    for other in labels:
        if other != sh and means.get(other) is not None and not other.startswith(f"{ref.name} ("):
            d = means[sh] - means[other]
            out.append(f"- {sh} vs {other}: {means[sh]:.3f} vs {means[other]:.3f} mean test macro-F1 "
                       f"({'+' if d >= 0 else ''}{d:.3f}).")
    other_mix = next((lab for lab in labels if lab.startswith(f"{ref.name} (") and lab != sh and " @ " not in lab),
                     None)
    if other_mix and means.get(other_mix) is not None:
        d = means[sh] - means[other_mix]
        out.append(f"- Hybrid rule: {sh} {means[sh]:.3f} vs {other_mix} {means[other_mix]:.3f} "
                   f"({'+' if d >= 0 else ''}{d:.3f}).")
    return out


def _evals(rows: list[dict[str, Any]], job_mix: str) -> dict[tuple, dict]:
    """(task, method label, seed) -> the run's evaluation file, for runs whose file verifies."""
    from orchestrator.store.evaluation_files import EvalFileError, read_eval
    from orchestrator.store.layout import eval_file

    out = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("artifact_uri"):
            continue
        try:
            ev = read_eval(eval_file(r["artifact_uri"]))
        except (EvalFileError, ValueError):
            continue
        if ev is not None and ev.get("artifact_sha256") == r.get("sha256"):
            out[(r["task"], _label(r, job_mix), r["seed"])] = ev
    return out


def _kind_sections(root: str, rows, tasks: list[str], labels: list[str], job_mix: str, plots: list[str]) -> list[str]:
    """Per-finding AUROC tables and ROC curves of multi-label tasks, kappa tables of ordinal ones."""
    evals = _evals(rows, job_mix)
    kinds = {k[0]: ev.get("task_kind") or "single_label" for k, ev in evals.items()}
    lines: list[str] = []
    ordinal = [t for t in tasks if kinds.get(t) == "ordinal"]
    if ordinal:
        test = summarise(rows, job_mix, "test", "kappa")
        lines += ["", "## Test quadratic weighted kappa (ordinal tasks; mean ± std over seeds)", "",
                  *_table(test, ordinal, labels)]
    for t in (t for t in tasks if kinds.get(t) == "multi_label"):
        per_method: dict[str, list[list[float | None]]] = {}
        curves: dict[str, dict] = {}
        names: list[str] = []
        for (task, label, seed), ev in sorted(evals.items(), key=lambda kv: kv[0][2]):
            if task != t:
                continue
            pf = ev["splits"]["test"]["per_finding"]
            names = ev["class_names"]
            per_method.setdefault(label, []).append(pf["auc"])
            curves.setdefault(label, {n: c for n, c in zip(names, pf.get("roc") or []) if c})
        shown = [lab for lab in labels if lab in per_method]
        lines += ["", f"## `{t}`: test AUROC per finding (mean over seeds; thresholds, F1 and sensitivity per run "
                  "are in each run's evaluation file)", "", "| finding | " + " | ".join(shown) + " |",
                  "|---|" + "---:|" * len(shown)]
        for i, name in enumerate(names):
            cells = []
            for lab in shown:
                vals = [a[i] for a in per_method[lab] if a[i] is not None]
                cells.append(f"{statistics.fmean(vals):.3f}" if vals else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        png = plot_roc_curves({lab: curves[lab] for lab in shown}, join_uri(root, f"roc_{t}.png"),
                              title=f"{t}: test ROC per finding (first seed of each method)")
        if png:
            plots.append(png)
            lines += ["", f"![{t}: test ROC curves](roc_{t}.png)"]
    return lines
def _agnostic_sentence(agnostic: dict[str, dict[str, Any]] | None, tasks: list[str], job) -> str:
    """Which task-agnostic map each task's hybrid and agnostic runs used: the pool (naming its datasets) or
    the pre-trained weights' magnitude."""
    parts = []
    for t in tasks:
        a = (agnostic or {}).get(t) or {}
        if a.get("source") == "magnitude":
            parts.append(f"`{t}` the pre-trained weights' magnitude |w| (no dataset to pool)")
        elif a.get("datasets"):
            blend = (f", blended with |w| at {job.importance.magnitude_blend:g}"
                     if a.get("source") == "pool+magnitude" else "")
            parts.append(f"`{t}` the pool of {', '.join(a['datasets'])}{blend}")
        elif a.get("error"):
            parts.append(f"`{t}` none ({a['error']})")
    where = "; ".join(parts) or "none"
    return where + (", the task itself included" if job.importance.include_target else "")


def _variant_of(rows, labels: list[str], test, row_test=lambda r: True) -> str | None:
    """The first label among ``labels`` whose rows satisfy ``test(method)`` and ``row_test(row)``."""
    from shpeft_core.methods import get_method

    for lab in labels:
        if any(r.get("variant") == lab and test(get_method(r["method"])) and row_test(r)
               for r in rows if r.get("status") == "ok"):
            return lab
    return None


def _is_entry(text: str):
    """A row test for a --methods entry ``method[:rule][@density]`` (rule and density only where given)."""
    head, _, dens = text.partition("@")
    _, _, mix = head.partition(":")

    def test(r) -> bool:
        if mix and r.get("mix") != mix:
            return False
        return not dens or (r.get("density") is not None and math.isclose(float(r["density"]), float(dens)))

    return test


def write_report(root: str, rows: list[dict[str, Any]], *, job, task_order: list[str], labels: list[str],
                 agnostic: dict[str, dict[str, Any]] | None = None, seconds: float = 0.0,
                 tuning: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None,
                 ) -> tuple[str, list[str]]:
    """report.md and its PNGs under ``root``; returns (report URI, PNG URIs). ``tuning``: the tuning runs
    (compare_tuning); ``settings``: the comparison's options (tune, fixed_importance, equal_budget, reference)."""
    from orchestrator.reporting import compare_stats as cs

    settings = settings or {}
    job_mix = job.selection.mix
    tasks = [t for t in task_order if any(r["task"] == t for r in rows)]
    test = summarise(rows, job_mix, "test")
    val = summarise(rows, job_mix, "val")
    outputs = cs.test_outputs(rows)
    reference_method = settings.get("reference") or REFERENCE_METHOD
    reference = _variant_of(rows, labels, lambda m: m.name == reference_method.partition("@")[0].partition(":")[0],
                            _is_entry(reference_method))
    task_metrics = {r["task"]: r.get("metric") for r in rows if r.get("metric")}
    plots: list[str] = []
    seeds_note = ("every seed uses the importance maps and warm head of training.seed (--fixed-importance)"
                  if settings.get("fixed_importance") else
                  "each seed draws its own importance batches and warm head (and data order and augmentation)")
    tune_note = (f"learning rates chosen per (task, method) on validation from {settings['tune']} values (below)"
                 if settings.get("tune") else "learning rates: each method's default or its pinned method.lr")
    lines = [
        "# shpeft comparison report",
        "",
        f"Backbone `{job.backbone.name}`; {len(tasks)} task(s); seeds per method: "
        f"{max((n for *_, n in test.values()), default=0)}; epochs {job.training.epochs}; density "
        f"{job.selection.density:g}, alpha {job.selection.alpha:g}, rule `{job_mix}`; "
        f"head start `{job.training.head_init}`; task-agnostic map: {_agnostic_sentence(agnostic, tasks, job)}. "
        f"Every method uses the same data, transforms, schedule, epochs and evaluation of its saved artifact; "
        f"models are selected on nothing (last epoch), test metrics are reported; {tune_note}; {seeds_note}"
        f"{'; every mask method selects the job k (--equal-budget)' if settings.get('equal_budget') else ''}. "
        "Macro-F1 is over each task's full label set (an absent class counts as 0); AUC is macro one-vs-rest "
        f"(multi-label: the mean over findings of each finding's AUROC). Wall time {seconds:.0f} s.",
        "",
        "## Test macro-F1 (mean ± std over seeds; bold: significantly above every other method of the task)",
        "",
        *_table(test, tasks, labels, cs.significant_best(outputs, test, tasks, labels)),
        "",
        "## Validation macro-F1",
        "",
        *_table(val, tasks, labels),
        "",
    ]
    paired, _ = cs.paired_section(outputs, tasks, labels, reference, task_metrics) if reference else ([], {})
    lines += paired or [f"(No paired statistics: the reference method {reference_method} has no finished run with "
                        "stored test predictions.)"]
    floor = _variant_of(rows, labels, lambda m: m.head_only)
    ceiling = _variant_of(rows, labels, lambda m: m.trains_all)
    lines += cs.recovery_section(outputs, tasks, labels, floor, ceiling)
    lines += ["", *cs.tuning_section(tuning or [], rows, tasks, labels, settings.get("tune_extensions"))]
    tune_cost: dict[str, float] = {}
    for r in tuning or []:
        tune_cost[r["variant"]] = tune_cost.get(r["variant"], 0.0) + (r.get("train_s") or 0.0)
    lines += ["", "## Cost and budget", "",
              "Trainable parameters are the mean over runs; a method's budget is the job's density unless it says "
              "`own` (LoRA's rank, GPS's per-row K, every bias, every weight). Effective alpha: the share of a "
              "hybrid mask the task-specific ranking chose. Tuning s: all tuning runs of the method, every task "
              "(the run at the chosen rate is also the first seed's final run).", "",
              "| method | budget | trainable parameters | effective alpha | artifact bytes | train s (mean) | tuning s (total) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for lab in labels:
        rs = [r for r in rows if r.get("status") == "ok" and _label(r, job_mix) == lab]
        if rs:
            eff = [r["effective_alpha"] for r in rs if r.get("effective_alpha") is not None]
            lines.append(f"| {lab} | {rs[0].get('budget') or '-'} | "
                         f"{statistics.fmean(r['trainable'] or 0 for r in rs):,.0f} | "
                         f"{f'{statistics.fmean(eff):.3f}' if eff else '-'} | "
                         f"{statistics.fmean(r['artifact_bytes'] or 0 for r in rs):,.0f} | "
                         f"{statistics.fmean(r['train_s'] or 0 for r in rs):.1f} | {tune_cost.get(lab, 0.0):.0f} |")
    lines += _kind_sections(root, rows, tasks, labels, job_mix, plots)
    claims = _claims(test, tasks, labels, job_mix)
    if claims:
        lines += ["", "## Differences (mean test macro-F1 over tasks; see the paired statistics for what they support)",
                  "", *claims]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r['task']} {_label(r, job_mix)} seed {r['seed']}: {r['error']}"
                                               for r in failed]
    lines += ["", "## Plots", ""]
    p = _plot_metric_vs_trainable(rows, job_mix, labels, join_uri(root, "metric_vs_trainable.png"))
    plots.append(p)
    lines.append("![test macro-F1 vs trainable parameters](metric_vs_trainable.png)")
    p = _plot_alpha_curve(rows, tasks, job_mix, join_uri(root, "alpha_curve.png"))
    if p:
        plots.append(p)
        lines.append("![alpha curve](alpha_curve.png)")
    masks = _shpeft_masks(rows, tasks, job_mix)
    p = plot_selection_location(masks, join_uri(root, "selection_location.png"))
    if p:
        plots.append(p)
        lines.append("![where the selected weights sit](selection_location.png)")
    p, mat = _plot_overlap(masks, join_uri(root, "mask_overlap.png"))
    if p:
        plots.append(p)
        lines.append("![task-to-task mask overlap](mask_overlap.png)")
    lines.append("")
    uri = compare_report_file(root)
    atomic_write_bytes(uri, "\n".join(lines).encode())
    return uri, plots
