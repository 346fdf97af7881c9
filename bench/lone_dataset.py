"""A task with no other dataset beside it: which task-agnostic map should its hybrid use? Decided on validation.

A user's first job is often one dataset and no ``importance.pool_datasets``, so the leave-one-out pool is
empty. This runs `shpeft compare` (the same harness, seeds, epochs and evaluation as every comparison) on
the demo's target tasks (``orchestrator.workflows.demo``: the shipped pre-trained backbone, DEMO_TRAINING's
density, alpha, rule and granularity), 3 seeds each, and prints validation macro-F1 (test beside it,
never used to decide) for:

  shpeft + magnitude  the hybrid with the pre-trained weights' |w| as its agnostic map (``agnostic: magnitude``)
  magnitude only      the agnostic ablation on that map (alpha 0: the largest-|w| entries)
  specific only       alpha 1: the task's own ranking, what a lone task can do without any agnostic map
  shpeft + pool       the hybrid with the leave-one-out pool (the other demo targets and the source corpus):
                      what the task would get with other datasets beside it (a reference, not an option)

The magnitude map and the task's own map do not depend on the other tasks, so the three lone-task variants
run as one job of all targets. The last line is one JSON object (val and test means per task and variant).

    python bench/lone_dataset.py                  # 3 tasks x 3 seeds x 4 variants: 36 runs, ~35 CPU-s each
    python bench/lone_dataset.py --smoke-test     # every code path on tiny data, 1 seed

The figures and the choice they support are in docs/method.md ("A task with nothing to pool").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = (  # (label, importance.agnostic, compare method)
    ("shpeft + magnitude", "magnitude", "shpeft"),
    ("magnitude only", "magnitude", "agnostic"),
    ("specific only", "pool", "specific"),
    ("shpeft + pool", "pool", "shpeft"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="Store folder (default: a temporary one); reruns reuse its runs.")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from orchestrator.job.load import parse_job
    from orchestrator.runtime.session import ray_session
    from orchestrator.workflows.compare import run_compare
    from orchestrator.workflows.demo import demo_job_dict, install_demo_backbone, write_demo_data

    store = os.path.abspath(args.store or tempfile.mkdtemp(prefix="shpeft-lone-"))
    seeds = 1 if args.smoke_test else args.seeds
    corpus, targets = write_demo_data(os.path.join(store, "data"), args.smoke_test)
    backbone = install_demo_backbone(store, progress=False)
    base = demo_job_dict(store, backbone, targets, [corpus], smoke_test=args.smoke_test, cpus=args.cpus)
    base["sweep"]["enabled"] = False
    t0 = time.perf_counter()
    rows: dict[tuple[str, str], list[dict]] = {}
    with ray_session(None, args.cpus):
        for agnostic in ("magnitude", "pool"):
            job = parse_job({**base, "importance": {**base["importance"], "agnostic": agnostic}}, "lone-dataset job")
            methods = [m for _, a, m in VARIANTS if a == agnostic]
            result = run_compare(job, methods=methods, seeds=seeds, progress=False)
            for label, a, m in VARIANTS:
                if a == agnostic:
                    for r in result.rows:
                        if r["method"] == m:
                            if r["status"] != "ok":
                                print(f"FAILED {label} {r['task']} seed {r['seed']}: {r['error']}")
                                return 1
                            rows.setdefault((label, r["task"]), []).append(r)

    tasks = [t.name for t in targets]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    print(f"\nmacro-F1, mean ± std over {seeds} seed(s); validation decides, test is shown beside it "
          f"({time.perf_counter() - t0:.0f} s, {args.cpus} CPUs)")
    header = f"{'variant':20s}" + "".join(f"{t[:26]:>28s}" for t in tasks) + f"{'mean':>16s}"
    for split in ("val", "test"):
        print(f"\n{split}\n{header}")
        for label, _, _ in VARIANTS:
            cells, means = [], []
            for t in tasks:
                vals = [r[f"{split}_macro_f1"] for r in rows[(label, t)]]
                mean, std = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
                means.append(mean)
                cells.append(f"{mean:.3f} ± {std:.3f}")
                summary.setdefault(split, {}).setdefault(label, {})[t] = round(mean, 4)
            summary[split][label]["mean"] = round(statistics.fmean(means), 4)
            print(f"{label:20s}" + "".join(f"{c:>28s}" for c in cells) + f"{statistics.fmean(means):>16.3f}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
