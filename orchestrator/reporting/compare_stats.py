"""The comparison report's uncertainty: paired differences against the reference method, significance of
the best cell, recovery fractions, and the learning-rate tuning table.

Invariants: every number here comes from the test predictions stored in the runs' evaluation files
(``stages.evaluation``: per image, in the split's fixed order) of runs whose artifact sha256 matches the
row; two methods are paired on the seeds both finished, seed s with seed s. Statistics are
``reporting.stats`` (SciPy bootstrap over seeds and images, paired permutation p-value, Holm over the
family of comparisons against the reference for one metric, verdict in words); macro-F1 is over the
task's fixed label set, AUC is macro one-vs-rest over classes (single-label and ordinal tasks) or the
unweighted mean over findings of each finding's AUROC on its known labels (multi-label tasks). Nothing
here reads validation predictions except the tuning table, which is validation only by construction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["test_outputs", "paired_section", "significant_best", "recovery_section", "tuning_section",
           "METRIC_WORDS"]

METRIC_WORDS = {"macro_f1": "macro-F1", "auc": "AUC", "accuracy": "accuracy"}
RESAMPLES = 2000


def test_outputs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """task -> {"kind", "num_classes", "labels", "runs": {variant: {seed: {"preds", "probs"}}}} from the
    verified evaluation files of the ok rows; a task whose runs disagree on the labels is left out."""
    from orchestrator.stages.evaluation import split_predictions
    from orchestrator.store.evaluation_files import EvalFileError, read_eval
    from orchestrator.store.layout import eval_file

    out: dict[str, dict[str, Any]] = {}
    broken: set[str] = set()
    for r in rows:
        if r.get("status") != "ok" or not r.get("artifact_uri") or not r.get("variant"):
            continue
        try:
            doc = read_eval(eval_file(r["artifact_uri"]))
            got = split_predictions(doc, "test") if doc and doc.get("artifact_sha256") == r.get("sha256") else None
        except (EvalFileError, ValueError, OSError):
            continue
        if got is None:
            continue
        t = out.setdefault(r["task"], {"kind": doc.get("task_kind") or "single_label",
                                       "num_classes": int(got["probs"].shape[1]), "labels": got["labels"],
                                       "runs": {}})
        same = t["labels"].shape == got["labels"].shape and np.array_equal(
            np.nan_to_num(t["labels"], nan=-1), np.nan_to_num(got["labels"], nan=-1))
        if not same:
            broken.add(r["task"])
        t["runs"].setdefault(r["variant"], {})[int(r["seed"])] = {"preds": got.get("preds"), "probs": got["probs"]}
    return {k: v for k, v in out.items() if k not in broken}


def _metrics_for(kind: str, task_metric: str | None) -> list[str]:
    if kind == "multi_label":
        return ["auc"]
    return ["macro_f1"] + (["auc"] if task_metric == "auc" else [])


def _stack(runs: dict[int, dict], seeds: list[int], metric: str) -> np.ndarray:
    key = "probs" if metric == "auc" else "preds"
    return np.stack([runs[s][key] for s in seeds])


def _pair(task: dict, a: str, b: str, metric: str, seed: int = 0):
    """paired_difference of variant a minus variant b on their common seeds, or None."""
    from orchestrator.reporting.stats import metric_statistic, paired_difference

    seeds = sorted(set(task["runs"].get(a, {})) & set(task["runs"].get(b, {})))
    if not seeds:
        return None
    fn = metric_statistic(metric, task["num_classes"])
    return paired_difference(task["labels"], _stack(task["runs"][a], seeds, metric),
                             _stack(task["runs"][b], seeds, metric), fn, seed=seed,
                             n_resamples=RESAMPLES, n_permutations=RESAMPLES)


def paired_section(outputs: dict[str, dict], tasks: list[str], labels: list[str], reference: str,
                   task_metrics: dict[str, str]) -> tuple[list[str], dict[tuple[str, str, str], Any]]:
    """Markdown lines of every method against ``reference`` (a variant label) per task and metric, Holm
    over the comparisons of one metric; and the results by (task, variant, metric)."""
    from orchestrator.reporting.stats import adjust_family

    raw: dict[str, list[tuple[str, str, Any]]] = {}
    for t in tasks:
        task = outputs.get(t)
        if not task or reference not in task["runs"]:
            continue
        for metric in _metrics_for(task["kind"], task_metrics.get(t)):
            for lab in labels:
                if lab != reference and lab in task["runs"]:
                    r = _pair(task, lab, reference, metric)
                    if r is not None:
                        raw.setdefault(metric, []).append((t, lab, r))
    results: dict[tuple[str, str, str], Any] = {}
    for metric, items in raw.items():
        for (t, lab, _), adj in zip(items, adjust_family([r for *_, r in items])):
            results[(t, lab, metric)] = adj
    if not results:
        return [], results
    lines = [f"## Paired differences against {reference} (test)", "",
             "Each method minus the reference on the same test images and seeds (seed s paired with seed s). "
             "95% interval: bootstrap over seeds and images (SciPy, BCa); p: paired permutation test on images; "
             "Holm-adjusted over the comparisons of one metric "
             f"({', '.join(f'{METRIC_WORDS.get(m, m)}: {len(v)}' for m, v in raw.items())}). The verdict says "
             "\"better\" or \"worse\" only where the adjusted p is below 0.05 and the interval excludes zero.",
             "", "| task | method | metric | method | reference | difference [95% interval] | p | p (Holm) | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (t, lab, metric), r in results.items():
        lines.append(f"| {t} | {lab} | {METRIC_WORDS.get(metric, metric)} | {r.metric_a:.3f} | {r.metric_b:.3f} | "
                     f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.p_value:.3g} | "
                     f"{r.p_adjusted:.3g} | {r.verdict} |")
    lines += ["", "Verdicts:", ""]
    for (t, lab, metric), r in results.items():
        words = {"better": f"{lab} is better than {reference}", "worse": f"{lab} is worse than {reference}"}
        text = words.get(r.verdict, f"no evidence of a difference between {lab} and {reference}")
        lines.append(f"- `{t}`, {METRIC_WORDS.get(metric, metric)}: {text} ({r.difference:+.3f} "
                     f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}], Holm p {r.p_adjusted:.3g}, {r.n_seeds} seed(s), "
                     f"{r.n_images} images).")
    return lines, results


def significant_best(outputs: dict[str, dict], summary, tasks: list[str], labels: list[str]) -> set[tuple[str, str]]:
    """(task, label) cells to bold: the best mean macro-F1 of the task, where it is significantly above the
    runner-up (paired permutation p < 0.05 and the 95% interval above zero; one test per task, unadjusted)."""
    from orchestrator.reporting.stats import verdict

    out = set()
    for t in tasks:
        ranked = sorted((summary[(t, lab)][0], lab) for lab in labels if (t, lab) in summary)
        task = outputs.get(t)
        if len(ranked) < 2 or not task or task["kind"] == "multi_label":
            continue
        (_, second), (_, best) = ranked[-2], ranked[-1]
        r = _pair(task, best, second, "macro_f1")
        if r is not None and verdict(r.difference, r.p_value, r.ci_low, r.ci_high) == "better":
            out.add((t, best))
    return out


def recovery_section(outputs: dict[str, dict], tasks: list[str], labels: list[str], floor: str | None,
                     ceiling: str | None) -> list[str]:
    """The recovery fraction (method - floor) / (ceiling - floor) of test macro-F1 per task, with a 95%
    bootstrap interval; floor head-only, ceiling full fine-tuning (both must have been compared)."""
    from orchestrator.reporting.stats import metric_statistic, recovery_fraction

    if not floor or not ceiling:
        return []
    shown = [lab for lab in labels if lab not in (floor, ceiling)]
    rows = []
    for lab in shown:
        cells = []
        for t in tasks:
            task = outputs.get(t)
            if not task or task["kind"] == "multi_label" or not all(v in task["runs"] for v in (lab, floor, ceiling)):
                cells.append("-")
                continue
            seeds = sorted(set(task["runs"][lab]) & set(task["runs"][floor]) & set(task["runs"][ceiling]))
            if not seeds:
                cells.append("-")
                continue
            fn = metric_statistic("macro_f1", task["num_classes"])
            frac, lo, hi = recovery_fraction(task["labels"], *(_stack(task["runs"][v], seeds, "macro_f1")
                                                               for v in (lab, floor, ceiling)), fn,
                                             n_resamples=RESAMPLES)
            if math.isnan(frac):
                cells.append("n/a (ceiling not above floor)")
            else:
                cells.append(f"{frac:.2f} " + ("(no interval: the gap vanishes in most resamples)" if math.isnan(lo)
                                               else f"[{lo:.2f}, {hi:.2f}]"))
        rows.append(f"| {lab} | " + " | ".join(cells) + " |")
    return ["", f"## Recovery of the {floor} to {ceiling} gap (test macro-F1)", "",
            f"(method - {floor}) / ({ceiling} - {floor}) per task, with a 95% percentile interval from the same "
            "bootstrap over seeds and images: 0 is no better than training the head, 1 matches full fine-tuning.",
            "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks), *rows]


def _beyond(extensions: int | None) -> str:
    if extensions is None:  # not given by the caller: the comparison's default
        return " (and a step beyond an end of the grid that won, at most twice)"
    if extensions == 0:
        return " (no step beyond the grid: a rate at its end may have won only because the grid ended there)"
    return (" (and a step beyond an end of the grid that won, at most "
            f"{'once' if extensions == 1 else 'twice' if extensions == 2 else f'{extensions} times'})")


def tuning_section(tuning: list[dict[str, Any]], chosen_rows: list[dict[str, Any]], tasks: list[str],
                   labels: list[str], extensions: int | None = None) -> list[str]:
    """The learning-rate search per (task, method): values tried with their validation score, the chosen
    value and where each final run's rate came from; ``extensions``: steps allowed beyond a winning end."""
    sources: dict[tuple[str, str], tuple[float, str]] = {}
    for r in chosen_rows:
        if r.get("lr") is not None:
            sources.setdefault((r["task"], r.get("variant")), (float(r["lr"]), r.get("lr_source") or "default"))
    if not sources:
        return []
    tried: dict[tuple[str, str], list[dict]] = {}
    for r in tuning:
        tried.setdefault((r["task"], r["variant"]), []).append(r)
    lines = ["## Learning rates (chosen on validation)", "",
             "Each (task, method) tried its default learning rate and its neighbours on a x3 log grid"
             f"{_beyond(extensions)}, on the first seed, for the final runs' epochs; "
             "the task's model-selection metric on validation chose (ties: the value nearest the default). That "
             "run is also the first seed's final run. `job`: pinned by the job's "
             "method.lr, not searched; `default`: the method's own default, not searched.", "",
             "| task | method | tried (validation score) | chosen | source | tuning s |", "|---|---|---|---:|---|---:|"]
    for t in tasks:
        for lab in labels:
            if (t, lab) not in sources:
                continue
            lr, source = sources[(t, lab)]
            runs = sorted(tried.get((t, lab), []), key=lambda r: r["lr"])
            cells = ", ".join(f"{r['lr']:.3g}: " + (f"{r['val_score']:.3f}" if r.get("status") == "ok"
                                                    and r.get("val_score") is not None else "failed") for r in runs)
            cost = sum(r.get("train_s") or 0.0 for r in runs)
            lines.append(f"| {t} | {lab} | {cells or '-'} | {lr:.3g} | {source} | {cost:.0f} |")
    return lines
