"""The demo recipe, explored in process (no Ray), on VALIDATION ONLY unless ``--final-test`` is given.

Builds the demo's data (``orchestrator.workflows.demo.DEMO_DATA``) and backbone (the shipped pre-trained
``DEMO_BACKBONE``, fingerprint-checked), computes one importance map per dataset with the settings given
(task-specific: its own train split; task-agnostic for target t: the rank-normalised mean over the OTHER
datasets, i.e. the source corpus and the other targets, never t itself), and trains, per target task,
seed and learning rate:

  full      every weight trainable (``--lr-full``; head at ``--head-lr``)
  linear    head only (at ``--head-lr``)
  shpeft    the hybrid (``--mix``, ``--alpha``) at ``--granularity``, ``--density``
  specific  alpha = 1
  agnostic  alpha = 0
  random    a seeded uniform random mask of the same size and granularity

Every method starts from the warm head the task's importance pass fitted (``--head random`` for a seeded
random head), as ``shpeft run`` and ``shpeft compare`` do, and trains the same epochs; the figure is the
last epoch's validation macro-F1. Nothing here looks at test data unless ``--final-test`` is given, which
is for a recipe already chosen on validation: recipes are explored on validation, so that a default can
never be picked on the split the comparison reports.

Prints mean +- std over seeds per task, method and learning rate, and the recovery fraction
(method - linear) / (full - linear) of the validation means where linear and full ran; the last line
is one JSON object; ``--json`` writes every run, with its curve, to a file.

    python bench/demo_recipe.py --methods shpeft,linear,full --density 1e-3 --lr-sparse 0.03,0.1,0.3
    python bench/demo_recipe.py --smoke-test    # a tiny run of every code path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shpeft_core import (  # noqa: E402
    BackboneSpec,
    ImportanceConfig,
    TrainConfig,
    apply_sparse_training,
    combine_importance,
    compute_importance,
    create_backbone,
    evaluate,
    fit,
    hybrid_mask,
    mask_size,
)
from shpeft_core.importance import load_warm_head  # noqa: E402

METHODS = ("full", "linear", "shpeft", "specific", "agnostic", "random")
MASK_METHODS = {"shpeft": None, "specific": 1.0, "agnostic": 0.0}  # method -> its fixed alpha (None: --alpha)

# filled in the parent before the worker pool forks (workers read it, never write it)
_CTX: dict = {}


def _loader(spec, split, model, *, train, seed=0, batch_size=32, shuffle=None):
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for

    return build_loader(spec, split, transform=transform_for(model, train=train), batch_size=batch_size,
                        shuffle=train if shuffle is None else shuffle, seed=seed)


def mask_for(method: str, ti: int, seed: int):
    from shpeft_core.eligibility import eligible_parameters
    from shpeft_core.selection import random_mask

    a = _CTX["args"]
    if method == "random":
        shapes = {n: p.shape for n, p in eligible_parameters(build_model(_CTX["targets"][ti]), _CTX["rules"]).items()}
        return random_mask(shapes, a.density, seed, a.granularity)
    alpha = MASK_METHODS[method] if MASK_METHODS[method] is not None else a.alpha
    return hybrid_mask(_CTX["specific"][ti] if alpha > 0 else None, _CTX["agnostic"][ti] if alpha < 1 else None,
                       alpha, a.density, a.granularity, a.mix)


def build_model(spec):
    from orchestrator.workflows.demo import DEMO_BACKBONE

    return create_backbone(BackboneSpec(DEMO_BACKBONE["name"], _CTX["backbone_uri"], DEMO_BACKBONE["kwargs"]),
                           spec.num_classes)


def run_one(job: tuple[int, str, int, float]) -> dict:
    ti, method, seed, lr = job
    torch.set_num_threads(_CTX["threads"])
    a = _CTX["args"]
    spec = _CTX["targets"][ti]
    model = build_model(spec)
    if a.head == "warm":
        load_warm_head(model, _CTX["specific"][ti])
    k, head_lr = None, a.head_lr
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "linear":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        head_lr = lr  # the head is all it trains: its lr is the one searched
    else:
        mask = mask_for(method, ti, seed)
        apply_sparse_training(model, mask)
        k = mask_size(mask)
    cfg = TrainConfig(epochs=a.epochs, lr=lr, head_lr=head_lr, warmup_epochs=a.warmup_epochs,
                      weight_decay=a.weight_decay, seed=seed)
    t0 = time.perf_counter()
    train = _loader(spec, "train", model, train=True, seed=seed, batch_size=a.batch_size)
    val = _loader(spec, "val", model, train=False, batch_size=256)
    hist = fit(model, train, val, cfg, num_classes=spec.num_classes)
    out = {"task": spec.name, "method": method, "seed": seed, "k": k, "lr": lr, "val": hist[-1]["macro_f1"],
           "val_curve": [round(h["macro_f1"], 3) for h in hist], "seconds": time.perf_counter() - t0}
    if a.final_test:
        out["test"] = evaluate(model, _loader(spec, "test", model, train=False, batch_size=256),
                               num_classes=spec.num_classes)["macro_f1"]
    return out


def prepare(args) -> None:
    """Data, backbone, importance maps (specific per dataset with its warm head, leave-one-out agnostic)."""
    from orchestrator.workflows.demo import DEMO_BACKBONE, DEMO_DATA, demo_backbone_uri
    from tasks.fingerprint import dataset_fingerprint
    from tasks.synthetic import write_source_corpus, write_task_family

    torch.set_num_threads(args.threads_prepare)
    t0 = time.perf_counter()
    d = dict(DEMO_DATA)
    if args.smoke_test:
        d.update(pool_images=240, images_per_task=90, n_tasks=2)
    root = os.path.join(args.store, "data-smoke" if args.smoke_test else "data")
    corpus = write_source_corpus(root, image_size=d["image_size"], num_images=d["pool_images"],
                                 cue_strength=d["source_cue_strength"], lesion_size=d["lesion_size"])
    targets = write_task_family(root, n_tasks=d["n_tasks"], image_size=d["image_size"],
                                images_per_task=d["images_per_task"], num_classes=d["num_classes"],
                                max_imbalance=d["max_imbalance"], cue_strength=d["cue_strength"],
                                lesion_size=d["lesion_size"], formats=("medmnist", "imagefolder", "parquet"))
    t_data = time.perf_counter() - t0
    _CTX["backbone_uri"] = args.backbone or demo_backbone_uri()
    _CTX["rules"] = tuple(args.rules.split(",")) if args.rules else None
    datasets = [corpus, *targets]
    icfg = ImportanceConfig(estimator=args.estimator, num_batches=args.importance_batches or None,
                            head_warmup=args.head_warmup, rules=_CTX["rules"])
    maps = []
    t1 = time.perf_counter()
    for spec in datasets:
        model = build_model(spec)
        loader = _loader(spec, "train", model, train=False, shuffle=True, seed=0, batch_size=32)
        maps.append(compute_importance(model, loader, icfg, num_classes=spec.num_classes, seed=args.importance_seed,
                                       dataset_fingerprint=dataset_fingerprint(spec)))
    t_imp = time.perf_counter() - t1
    agnostic = [combine_importance([m for j, m in enumerate(maps) if j != i + 1]) for i in range(len(targets))]
    _CTX.update(args=args, targets=targets, specific=maps[1:], agnostic=agnostic, threads=args.threads)
    print(f"backbone {DEMO_BACKBONE['name']} {DEMO_BACKBONE['kwargs']} from {_CTX['backbone_uri']}")
    print(f"data {t_data:.1f}s; importance {t_imp:.1f}s ({args.estimator}, "
          f"{args.importance_batches or 'all'} batches x 32 per dataset, head warm-up {args.head_warmup}, "
          f"{len(datasets)} datasets, rules {args.rules or 'default'})", flush=True)


def _ms(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}" if xs else "-"


def report(runs: list[dict], targets, total: float, final_test: bool) -> dict:
    names = [t.name for t in targets]
    arms = list(dict.fromkeys((r["method"], r["lr"]) for r in runs))
    split_cols = ("val", "test") if final_test else ("val",)
    print()
    print(f"{'task':<28} {'method':<9} {'lr':>8} {'k':>6} " + " ".join(f"{s + ' macro-F1':>15}" for s in split_cols))
    summary: dict = {}
    for name in names:
        for m, lr in arms:
            rs = [r for r in runs if r["task"] == name and r["method"] == m and r["lr"] == lr]
            if not rs:
                continue
            summary.setdefault(f"{m}@{lr:g}", {})[name] = {s: statistics.mean(r[s] for r in rs) for s in split_cols}
            k = rs[0]["k"]
            print(f"{name:<28} {m:<9} {lr:>8.2g} {k if k is not None else '-':>6} "
                  + " ".join(f"{_ms([r[s] for r in rs]):>15}" for s in split_cols))
        print()
    print(f"{'mean over tasks':<38} {'val':>8}" + (f" {'test':>8}" if final_test else "") + "  recovery (val)")
    best = {m: max((a for a in summary if a.startswith(m + "@")), key=lambda a: statistics.mean(
        v["val"] for v in summary[a].values()), default=None) for m in ("linear", "full")}
    for arm, per_task in summary.items():
        vals = [per_task[n]["val"] for n in names if n in per_task]
        rec = ""
        if best["linear"] and best["full"]:
            lo, hi = summary[best["linear"]], summary[best["full"]]
            fr = [(per_task[n]["val"] - lo[n]["val"]) / (hi[n]["val"] - lo[n]["val"]) for n in names
                  if n in per_task and n in lo and n in hi and hi[n]["val"] != lo[n]["val"]]
            rec = " ".join(f"{f:.2f}" for f in fr) + (f" (mean {statistics.mean(fr):.2f})" if fr else "")
        tests = f" {statistics.mean(per_task[n]['test'] for n in names if n in per_task):>8.3f}" if final_test else ""
        print(f"{'':<20} {arm:<17} {statistics.mean(vals):>8.3f}{tests}  {rec}")
    print(f"\n{len(runs)} trainings, total {total:.1f}s")
    return summary


def main(argv=None) -> int:
    from orchestrator.workflows.demo import DEMO_TRAINING

    tr = DEMO_TRAINING
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "shpeft-demo-recipe"))
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--final-test", action="store_true",
                    help="also evaluate test macro-F1 (only for a recipe already chosen on validation)")
    ap.add_argument("--backbone", default=None, help="weights file instead of the shipped demo backbone")
    ap.add_argument("--methods", default="shpeft,linear,full", help=f"any of {','.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--tasks", default=None, help="comma-separated task indices (default: all)")
    ap.add_argument("--epochs", type=int, default=tr["epochs"])
    ap.add_argument("--batch-size", type=int, default=tr["batch_size"])
    ap.add_argument("--lr-full", default=str(tr["lr_full"]), help="comma-separated learning rates")
    ap.add_argument("--lr-sparse", default=str(tr["lr"]), help="comma-separated learning rates (mask methods)")
    ap.add_argument("--lr-linear", default=str(tr["head_lr"]), help="comma-separated learning rates (head only)")
    ap.add_argument("--head-lr", type=float, default=tr["head_lr"], help="the head's lr beside the trained entries")
    ap.add_argument("--warmup-epochs", type=float, default=tr["warmup_epochs"])
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--density", type=float, default=tr["density"])
    ap.add_argument("--alpha", type=float, default=tr["alpha"])
    ap.add_argument("--mix", choices=("union", "rank_sum"), default="union")
    ap.add_argument("--granularity", choices=("global", "per_tensor", "per_row"), default=tr["granularity"])
    ap.add_argument("--estimator", choices=("grad2", "grad1", "taylor1", "taylor2"), default="grad2")
    ap.add_argument("--importance-batches", type=int, default=tr["importance_batches"], help="0: one whole pass")
    ap.add_argument("--importance-seed", type=int, default=0)
    ap.add_argument("--head-warmup", choices=("linear_probe", "ridge"), default="linear_probe")
    ap.add_argument("--rules", default=None, help="comma-separated eligibility regexes (default: the built-in rules)")
    ap.add_argument("--head", choices=("warm", "random"), default="warm")
    ap.add_argument("--workers", type=int, default=2, help="trainings run in parallel (one thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--threads-prepare", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write every run to this file")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.epochs, args.seeds, args.importance_batches = 1, 1, 1
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    lrs = {m: [float(x) for x in (args.lr_full if m == "full" else args.lr_linear if m == "linear"
                                  else args.lr_sparse).split(",")] for m in methods}
    t0 = time.perf_counter()
    prepare(args)
    targets = _CTX["targets"]
    tis = [int(i) for i in args.tasks.split(",")] if args.tasks else range(len(targets))
    jobs = [(ti, m, s, lr) for ti in tis for s in range(args.seeds) for m in methods for lr in lrs[m]]
    print(f"{len(jobs)} trainings: epochs {args.epochs}, batch {args.batch_size}, lrs {lrs}, head {args.head_lr}, "
          f"density {args.density}, alpha {args.alpha}, {args.mix} {args.granularity}, head {args.head}; "
          f"{'val and TEST' if args.final_test else 'validation only'}", flush=True)
    runs = []

    def show(r):
        runs.append(r)
        test = f" test {r['test']:.3f}" if "test" in r else ""
        print(f"  {r['task']} {r['method']} lr {r['lr']:g} seed {r['seed']}: val {r['val']:.3f}{test} "
              f"({r['seconds']:.1f}s) {r['val_curve']}", flush=True)

    if args.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("fork")) as pool:
            for r in pool.map(run_one, jobs):
                show(r)
    else:
        for j in jobs:
            show(run_one(j))
    total = time.perf_counter() - t0
    summary = report(runs, [targets[i] for i in tis], total, args.final_test)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary, "total_s": total}, f, indent=1)
    print(json.dumps({"summary": summary, "total_s": round(total, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
