"""The demo recipe, measured in process (no Ray): does SH-PEFT visibly adapt on the demo's tasks?

Builds the demo's data (``orchestrator.workflows.demo.DEMO_DATA``) and backbone (the shipped pre-trained
``DEMO_BACKBONE``, fingerprint-checked), computes one grad2 importance map per dataset (task-specific:
its own train split; task-agnostic for target t: the rank-normalised mean over the OTHER datasets,
i.e. the source corpus and the other targets, never t itself), and trains, per target task and seed:

  full      every weight trainable (AdamW, ``lr_full``; head at ``head_lr``)
  linear    head only
  shpeft    hybrid rank-sum, score = a * N(specific) + (1 - a) * N(agnostic), global top ``density``
  union     hybrid union: round(a * k) top task-specific entries, the rest from the agnostic ranking
  specific  alpha = 1
  agnostic  alpha = 0
  random    a seeded uniform random mask of the same size over the same eligible weights
  shpeft_tensor  the rank-sum hybrid selected per tensor (the same k split over the weight tensors by
            size, top entries within each): the demo's default granularity (DEMO_TRAINING)
  shpeft_row     (not run by default) the rank-sum hybrid per output row (GPS-style; about k entries)

Every method starts from the same warm head (ridge fit on frozen train features; ``--head random``
for the seeded random head) and trains the same epochs; the figures are the last epoch's val and test
macro-F1 (nothing is selected on test). Prints mean +- std over seeds per task and method, per-run
seconds and the total time; the last line is one JSON object (means per task and method); ``--json``
writes every run, with its val curve, to a file.

    python bench/demo_recipe.py                 # the full comparison (3 tasks x 3 seeds x 8 methods)
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
    hybrid_scores,
    mask_size,
    select_mask,
)
from shpeft_core.importance import warm_head  # noqa: E402
from shpeft_core.selection import budget, normalize_scores  # noqa: E402

METHODS = ("full", "linear", "shpeft", "union", "specific", "agnostic", "random", "shpeft_tensor", "shpeft_row")
DEFAULT_METHODS = METHODS[:8]

# filled in the parent before the worker pool forks (workers read it, never write it)
_CTX: dict = {}


def _loader(spec, split, model, *, train, seed=0, batch_size=32, shuffle=None):
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for

    return build_loader(spec, split, transform=transform_for(model, train=train), batch_size=batch_size,
                        shuffle=train if shuffle is None else shuffle, seed=seed)


def union_mask(specific, agnostic, alpha: float, density: float) -> dict[str, torch.Tensor]:
    """round(alpha * k) top task-specific entries, then the best agnostic entries not yet chosen."""
    ns, na = normalize_scores(specific.scores, "rank"), normalize_scores(agnostic.scores, "rank")
    names = sorted(ns)
    sizes = [ns[n].numel() for n in names]
    k = budget(density, sum(sizes))
    fs = torch.cat([ns[n].reshape(-1) for n in names])
    fa = torch.cat([na[n].reshape(-1) for n in names])
    k_s = int(round(alpha * k))
    chosen = torch.zeros(fs.numel(), dtype=torch.bool)
    if k_s:
        chosen[torch.topk(fs, k_s).indices] = True
    if k - k_s:
        chosen[torch.topk(fa.masked_fill(chosen, -1.0), k - k_s).indices] = True
    return _split_flat(chosen, names, sizes)


def random_mask(scores: dict[str, torch.Tensor], density: float, seed: int) -> dict[str, torch.Tensor]:
    """A uniform random set of budget(density) entries over the same eligible weights."""
    names = sorted(scores)
    sizes = [scores[n].numel() for n in names]
    k = budget(density, sum(sizes))
    g = torch.Generator().manual_seed(10_007 + seed)
    chosen = torch.zeros(sum(sizes), dtype=torch.bool)
    chosen[torch.randperm(sum(sizes), generator=g)[:k]] = True
    return _split_flat(chosen, names, sizes)


def _split_flat(chosen, names, sizes):
    out, pos = {}, 0
    for n, s in zip(names, sizes):
        idx = chosen[pos : pos + s].nonzero().reshape(-1)
        if idx.numel():
            out[n] = idx.to(torch.int32)
        pos += s
    return out


def mask_for(method: str, specific, agnostic, alpha: float, density: float, seed: int):
    if method == "shpeft":
        return select_mask(hybrid_scores(specific, agnostic, alpha), density, "global")
    if method == "union":
        return union_mask(specific, agnostic, alpha, density)
    if method == "specific":
        return select_mask(hybrid_scores(specific, agnostic, 1.0), density, "global")
    if method == "agnostic":
        return select_mask(hybrid_scores(specific, agnostic, 0.0), density, "global")
    if method == "random":
        return random_mask(specific.scores, density, seed)
    if method == "shpeft_tensor":
        return select_mask(hybrid_scores(specific, agnostic, alpha), density, "per_tensor")
    if method == "shpeft_row":
        return select_mask(hybrid_scores(specific, agnostic, alpha), density, "per_row")
    raise ValueError(method)


def build_model(spec, head_state=None):
    from orchestrator.workflows.demo import DEMO_BACKBONE

    model = create_backbone(BackboneSpec(DEMO_BACKBONE["name"], _CTX["backbone_uri"], DEMO_BACKBONE["kwargs"]),
                            spec.num_classes)
    if head_state is not None:
        model.get_classifier().load_state_dict(head_state)
    return model


def run_one(job: tuple[int, str, int]) -> dict:
    ti, method, seed = job
    torch.set_num_threads(_CTX["threads"])
    a = _CTX["args"]
    spec = _CTX["targets"][ti]
    model = build_model(spec, _CTX["heads"][ti] if a.head == "warm" else None)
    k = None
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        lr = a.lr_full
    elif method == "linear":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        lr = a.head_lr
    else:
        mask = mask_for(method, _CTX["specific"][ti], _CTX["agnostic"][ti], a.alpha, a.density, seed)
        apply_sparse_training(model, mask)
        k = mask_size(mask)
        lr = a.lr_sparse
    cfg = TrainConfig(epochs=a.epochs, lr=lr, head_lr=a.head_lr, warmup_epochs=a.warmup_epochs,
                      weight_decay=a.weight_decay, seed=seed)
    t0 = time.perf_counter()
    train = _loader(spec, "train", model, train=True, seed=seed, batch_size=a.batch_size)
    val = _loader(spec, "val", model, train=False, batch_size=256)
    hist = fit(model, train, val, cfg, num_classes=spec.num_classes)
    test = evaluate(model, _loader(spec, "test", model, train=False, batch_size=256), num_classes=spec.num_classes)
    return {"task": spec.name, "method": method, "seed": seed, "k": k, "lr": lr,
            "val": hist[-1]["macro_f1"], "test": test["macro_f1"], "val_curve": [round(h["macro_f1"], 3) for h in hist],
            "seconds": time.perf_counter() - t0}


def prepare(args) -> None:
    """Data, backbone, importance maps (specific per dataset, leave-one-out agnostic) and warm heads."""
    from orchestrator.workflows.demo import DEMO_BACKBONE, DEMO_DATA, demo_backbone_uri
    from tasks.fingerprint import dataset_fingerprint
    from tasks.synthetic import write_source_corpus, write_task_family

    torch.set_num_threads(args.threads_prepare)
    t0 = time.perf_counter()
    d = dict(DEMO_DATA)
    if args.smoke_test:
        d.update(source_images=240, images_per_task=90, n_tasks=2)
    root = os.path.join(args.store, "data-smoke" if args.smoke_test else "data")
    corpus = write_source_corpus(root, image_size=d["image_size"], num_images=d["source_images"],
                                 cue_strength=d["source_cue_strength"], lesion_size=d["lesion_size"])
    targets = write_task_family(root, n_tasks=d["n_tasks"], image_size=d["image_size"],
                                images_per_task=d["images_per_task"], num_classes=d["num_classes"],
                                max_imbalance=d["max_imbalance"], cue_strength=d["cue_strength"],
                                lesion_size=d["lesion_size"],
                                formats=("medmnist", "imagefolder", "parquet"))
    t_data = time.perf_counter() - t0
    _CTX["backbone_uri"] = args.backbone or demo_backbone_uri()
    datasets = [corpus, *targets]
    icfg = ImportanceConfig(estimator="grad2", num_batches=args.importance_batches, head_warmup="linear_probe")
    maps = []
    t1 = time.perf_counter()
    for spec in datasets:
        model = build_model(spec)
        loader = _loader(spec, "train", model, train=False, shuffle=True, seed=0, batch_size=32)
        maps.append(compute_importance(model, loader, icfg, num_classes=spec.num_classes,
                                       dataset_fingerprint=dataset_fingerprint(spec)))
    t_imp = time.perf_counter() - t1
    specific = maps[1:]
    agnostic = [combine_importance([m for j, m in enumerate(maps) if j != i + 1]) for i in range(len(targets))]
    heads = []
    t2 = time.perf_counter()
    for spec in targets:
        model = build_model(spec)
        model.eval()
        feats, labels = [], []
        with torch.no_grad():
            for x, y in _loader(spec, "train", model, train=False, batch_size=256):
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
                labels.append(y)
        warm_head(model, torch.cat(feats), torch.cat(labels),
                  ImportanceConfig(head_warmup="ridge", ridge_lambda=args.ridge_lambda), spec.num_classes)
        heads.append({k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()})
    t_head = time.perf_counter() - t2
    sizes = {s.name: {sp: len(_loader(s, sp, model, train=False).dataset) for sp in ("train", "val", "test")}
             for s in datasets}
    _CTX.update(args=args, targets=targets, specific=specific, agnostic=agnostic, heads=heads,
                threads=args.threads, sizes=sizes)
    print(f"backbone {DEMO_BACKBONE['name']} {DEMO_BACKBONE['kwargs']} from {_CTX['backbone_uri']}")
    print(f"data {t_data:.1f}s ({', '.join(f'{n}: {v}' for n, v in sizes.items())})")
    print(f"importance {t_imp:.1f}s ({args.importance_batches} batches x 32 per dataset, {len(datasets)} datasets), "
          f"warm heads {t_head:.1f}s", flush=True)


def _ms(xs):
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def report(runs: list[dict], methods, targets, total: float) -> dict:
    names = [t.name for t in targets]
    print()
    print(f"{'task':<28} {'method':<9} {'k':>6} {'val macro-F1':>15} {'test macro-F1':>15} {'s/run':>6}")
    summary: dict = {}
    for name in names:
        for m in methods:
            rs = [r for r in runs if r["task"] == name and r["method"] == m]
            if not rs:
                continue
            v, t = [r["val"] for r in rs], [r["test"] for r in rs]
            summary.setdefault(m, {})[name] = {"val": statistics.mean(v), "test": statistics.mean(t)}
            k = rs[0]["k"]
            print(f"{name:<28} {m:<9} {k if k is not None else '-':>6} {_ms(v):>15} {_ms(t):>15} "
                  f"{statistics.mean(r['seconds'] for r in rs):6.1f}")
        print()
    print(f"{'mean over tasks':<28} {'method':<9} {'':>6} {'val':>15} {'test':>15}")
    for m in methods:
        if m in summary:
            vals = [summary[m][n]["val"] for n in names if n in summary[m]]
            tests = [summary[m][n]["test"] for n in names if n in summary[m]]
            print(f"{'':<28} {m:<9} {'':>6} {statistics.mean(vals):>15.3f} {statistics.mean(tests):>15.3f}")
    print(f"\n{len(runs)} trainings, total {total:.1f}s")
    return summary


def main(argv=None) -> int:
    from orchestrator.workflows.demo import DEMO_TRAINING

    tr = DEMO_TRAINING
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "shpeft-demo-recipe"))
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--backbone", default=None, help="weights file instead of the shipped demo backbone")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {','.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default=None, help="comma-separated task indices (default: all)")
    ap.add_argument("--epochs", type=int, default=tr["epochs"])
    ap.add_argument("--batch-size", type=int, default=tr["batch_size"])
    ap.add_argument("--lr-full", type=float, default=tr["lr_full"])
    ap.add_argument("--lr-sparse", type=float, default=tr["lr"])
    ap.add_argument("--head-lr", type=float, default=tr["head_lr"])
    ap.add_argument("--warmup-epochs", type=float, default=tr["warmup_epochs"])
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--density", type=float, default=tr["density"])
    ap.add_argument("--alpha", type=float, default=tr["alpha"])
    ap.add_argument("--importance-batches", type=int, default=tr["importance_batches"])
    ap.add_argument("--head", choices=("warm", "random"), default="warm")
    ap.add_argument("--ridge-lambda", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2, help="trainings run in parallel (one thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--threads-prepare", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write every run to this file")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.epochs, args.seeds, args.importance_batches = 1, 1, 1
    t0 = time.perf_counter()
    prepare(args)
    targets = _CTX["targets"]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    tis = [int(i) for i in args.tasks.split(",")] if args.tasks else range(len(targets))
    jobs = [(ti, m, s) for ti in tis for s in range(args.seeds) for m in methods]
    print(f"{len(jobs)} trainings: epochs {args.epochs}, batch {args.batch_size}, lr full {args.lr_full} / sparse "
          f"{args.lr_sparse} / head {args.head_lr}, density {args.density}, alpha {args.alpha}, head {args.head}",
          flush=True)
    runs = []
    if args.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("fork")) as pool:
            for r in pool.map(run_one, jobs):
                runs.append(r)
                print(f"  {r['task']} {r['method']} seed {r['seed']}: val {r['val']:.3f} test {r['test']:.3f} "
                      f"({r['seconds']:.1f}s) {r['val_curve']}", flush=True)
    else:
        for j in jobs:
            r = run_one(j)
            runs.append(r)
            print(f"  {r['task']} {r['method']} seed {r['seed']}: val {r['val']:.3f} test {r['test']:.3f} "
                  f"({r['seconds']:.1f}s) {r['val_curve']}", flush=True)
    total = time.perf_counter() - t0
    summary = report(runs, methods, [targets[i] for i in tis], total)
    doc = {"args": vars(args), "runs": runs, "summary": summary, "total_s": total}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps({"summary": summary, "total_s": round(total, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
