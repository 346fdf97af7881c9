"""The comparison report's paired statistics, best-cell significance, recovery fractions and tuning table,
on per-image test predictions built so that the answer is known."""

import numpy as np
import pytest

from orchestrator.reporting.compare_stats import paired_section, recovery_section, significant_best, tuning_section

C, N, SEEDS = 3, 240, (0, 1, 2)


def _preds(labels, accuracy, rng):
    wrong = (labels + rng.integers(1, C, labels.size)) % C
    return np.where(rng.random(labels.size) < accuracy, labels, wrong)


def _task(accuracies: dict[str, float], seed: int = 0, copies: dict[str, str] | None = None):
    """One task's outputs as ``test_outputs`` gives them: each method's per-seed predictions at roughly the
    given accuracy; ``copies`` maps a method to another whose runs it repeats exactly."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    runs = {}
    for name, acc in accuracies.items():
        runs[name] = {}
        for s in SEEDS:
            p = _preds(labels, acc, rng)
            runs[name][s] = {"preds": p, "probs": np.eye(C)[p] * 0.8 + 0.2 / C}
    for name, source in (copies or {}).items():
        runs[name] = {s: dict(v) for s, v in runs[source].items()}
    return {"kind": "single_label", "num_classes": C, "labels": labels, "runs": runs}


def test_full_fine_tuning_is_better_than_head_only_on_a_task_that_needs_adaptation():
    outputs = {"t": _task({"head-only": 0.55, "full": 0.93})}
    lines, results = paired_section(outputs, ["t"], ["head-only", "full"], "head-only", {"t": "macro_f1"})
    r = results[("t", "full", "macro_f1")]
    assert r.verdict == "better" and r.difference > 0.25 and r.ci_low > 0 and r.p_adjusted < 0.05
    assert r.n_seeds == 3 and r.n_images == N
    assert "- `t`, macro-F1: full is better than head-only" in "\n".join(lines)
    # seen from the other side, the same comparison is "worse"
    _, back = paired_section(outputs, ["t"], ["head-only", "full"], "full", {"t": "macro_f1"})
    assert back[("t", "head-only", "macro_f1")].verdict == "worse"


def test_the_same_method_twice_with_the_same_seeds_shows_no_difference():
    outputs = {"t": _task({"shpeft": 0.8}, copies={"shpeft again": "shpeft"})}
    lines, results = paired_section(outputs, ["t"], ["shpeft", "shpeft again"], "shpeft", {"t": "auc"})
    for metric in ("macro_f1", "auc"):  # the task's own metric (AUC) joins macro-F1
        r = results[("t", "shpeft again", metric)]
        assert r.verdict == "no evidence of a difference"
        assert r.difference == 0 and r.ci_low == r.ci_high == 0 and r.p_value == 1.0
    assert "no evidence of a difference between shpeft again and shpeft" in "\n".join(lines)


def test_holm_adjusts_over_every_comparison_of_a_metric():
    outputs = {"a": _task({"ref": 0.7, "m1": 0.74, "m2": 0.7}, seed=1), "b": _task({"ref": 0.7, "m1": 0.72}, seed=2)}
    _, results = paired_section(outputs, ["a", "b"], ["ref", "m1", "m2"], "ref", {})
    raw = sorted(r.p_value for r in results.values())
    adjusted = sorted(r.p_adjusted for r in results.values())
    assert len(results) == 3 and adjusted[0] == pytest.approx(min(1.0, 3 * raw[0]))
    assert all(a >= p for a, p in zip(adjusted, raw))


def test_only_a_significantly_best_cell_is_bold():
    clear = _task({"full": 0.95, "shpeft": 0.7, "linear": 0.5}, seed=3)
    tied = _task({"full": 0.8}, seed=4, copies={"shpeft": "full"})
    outputs = {"clear": clear, "tied": tied}
    summary = {("clear", "full"): (0.95, 0, 3), ("clear", "shpeft"): (0.7, 0, 3), ("clear", "linear"): (0.5, 0, 3),
               ("tied", "full"): (0.8, 0, 3), ("tied", "shpeft"): (0.8, 0, 3)}
    assert significant_best(outputs, summary, ["clear", "tied"], ["shpeft", "linear", "full"]) == {("clear", "full")}


def test_recovery_fraction_table_places_a_method_between_head_only_and_full():
    outputs = {"t": _task({"linear": 0.5, "full": 0.95, "shpeft": 0.75}, seed=5)}
    lines = recovery_section(outputs, ["t"], ["shpeft", "linear", "full"], "linear", "full")
    row = next(line for line in lines if line.startswith("| shpeft |"))
    frac = float(row.split("|")[2].split()[0])
    assert 0.3 < frac < 0.7
    assert recovery_section(outputs, ["t"], ["shpeft"], None, "full") == []


def test_tuning_table_lists_values_tried_and_the_source_of_each_rate():
    tuning = [{"task": "t", "variant": "shpeft", "lr": lr, "val_score": v, "status": "ok", "train_s": 2.0}
              for lr, v in ((0.00333, 0.7), (0.01, 0.8), (0.03, 0.75))]
    rows = [{"task": "t", "variant": "shpeft", "lr": 0.01, "lr_source": "tuned"},
            {"task": "t", "variant": "full", "lr": 0.002, "lr_source": "job"}]
    lines = tuning_section(tuning, rows, ["t"], ["shpeft", "full"])
    assert "| t | shpeft | 0.00333: 0.700, 0.01: 0.800, 0.03: 0.750 | 0.01 | tuned | 6 |" in lines
    assert "| t | full | - | 0.002 | job | 0 |" in lines


def test_the_reference_may_name_one_density_of_a_method_compared_at_two():
    from orchestrator.reporting.compare_report import _is_entry, _variant_of

    rows = [{"method": "shpeft", "mix": "union", "density": d, "variant": lab, "status": "ok"}
            for d, lab in ((0.02, "shpeft (union)"), (0.001, "shpeft (union) @ 0.001"))]
    rows.append({"method": "linear", "mix": None, "density": None, "variant": "linear", "status": "ok"})
    labels = ["shpeft (union)", "shpeft (union) @ 0.001", "linear"]

    def pick(ref):
        return _variant_of(rows, labels, lambda m: m.name == ref.partition("@")[0].partition(":")[0], _is_entry(ref))

    assert pick("shpeft") == "shpeft (union)"  # the first variant of the method
    assert pick("shpeft@0.001") == pick("shpeft@1e-3") == "shpeft (union) @ 0.001"
    assert pick("shpeft:union@0.001") == "shpeft (union) @ 0.001"
    assert pick("shpeft@0.005") is None and pick("shpeft:rank_sum") is None
    assert pick("linear") == "linear"
