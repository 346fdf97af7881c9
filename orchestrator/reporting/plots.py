"""PNG plots written into the store: density vs metric (Pareto front), alpha vs metric, importance per layer."""

from __future__ import annotations

import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shpeft_core.options import DEFAULT_METRIC  # noqa: E402
from shpeft_core.io import atomic_write_bytes, exists, join_uri  # noqa: E402

from orchestrator.store.layout import plots_dir, read_sweep_summary, sweep_root  # noqa: E402

__all__ = ["write_plots", "save_png", "pareto_front", "layer_of", "importance_mass_per_layer", "selection_location",
           "plot_selection_location", "plot_roc_curves"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(density, metric) points not dominated by one with lower-or-equal density and higher metric."""
    front, best = [], float("-inf")
    for d, m in sorted(points, key=lambda p: (p[0], -p[1])):
        if m > best:
            front.append((d, m))
            best = m
    return front


def layer_of(param_name: str) -> str:
    """Group parameter names into layers: 'blocks.3.attn.qkv.weight' -> 'blocks.3'; 'stages.1.blocks.0...' kept."""
    m = re.match(r"((?:[A-Za-z_]+\.\d+\.)*(?:[A-Za-z_]+\.\d+))", param_name)
    return m.group(1) if m else param_name.split(".")[0]


def importance_mass_per_layer(scores: dict[str, Any]) -> dict[str, float]:
    """Share of the total importance held by each layer (sums to 1)."""
    mass: dict[str, float] = {}
    for name, t in scores.items():
        mass[layer_of(name)] = mass.get(layer_of(name), 0.0) + float(t.double().abs().sum())
    total = sum(mass.values()) or 1.0
    return {k: v / total for k, v in mass.items()}


def save_png(fig, uri: str, dpi: int = 110) -> str:
    """Write a matplotlib figure as a PNG at ``uri`` (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(uri, buf.getvalue())
    return uri


def log_density_axis(ax) -> None:
    """A log x axis labelled with plain numbers at 1, 2 and 5 x 10^k: a sweep's densities often span under a
    decade, where matplotlib's default log labels (minor ticks included) overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _trial_points(store: str, row: dict) -> list[dict]:
    if row.get("status") != "ok":
        return []
    summary = read_sweep_summary(sweep_root(store, row["task"], row.get("config_hash")))
    if summary is not None:  # else (no sweep, or a damaged summary) the row's own point
        return [t for t in summary["trials"] if t.get("val_metric") is not None]
    m = row.get("metric") or DEFAULT_METRIC
    if row.get(f"val_{m}") is None:
        return []
    return [{"density": row["density"], "alpha": row["alpha"], "val_metric": row[f"val_{m}"]}]


def _layer_order(layer: str) -> tuple:
    """Layers in network order: stems and embeddings (no index) first, then 'blocks.9' before 'blocks.10'."""
    parts = layer.split(".")
    has_index = any(p.isdigit() for p in parts)
    return (int(has_index), *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def write_plots(store: str, job_id: str, rows: list[dict], dataset_maps: dict[str, str],
                agnostic_maps: dict[str, str]) -> list[str]:
    """Writes the three PNGs under <store>/plots/<job_id>/ and returns their URIs.

    ``dataset_maps``: dataset name -> its importance map; ``agnostic_maps``: target task -> its
    task-agnostic map (leave-one-out pools differ per task).
    """
    from shpeft_core.importance import ImportanceMap

    root = plots_dir(store, job_id)
    out = []
    per_task = {r["task"]: _trial_points(store, r) for r in rows}
    per_task = {k: v for k, v in per_task.items() if v}
    if per_task:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (task, pts) in enumerate(sorted(per_task.items())):
            color = f"C{i % 10}"
            ax.scatter([p["density"] for p in pts], [p["val_metric"] for p in pts], color=color, alpha=0.6, label=task)
            front = pareto_front([(p["density"], p["val_metric"]) for p in pts])
            ax.plot([d for d, _ in front], [m for _, m in front], color=color, drawstyle="steps-post")
        log_density_axis(ax)
        ax.set_xlabel("density (fraction of eligible weights)")
        ax.set_ylabel("validation metric")
        ax.set_title("density vs metric (line: Pareto front)")
        ax.legend(fontsize=7)
        out.append(save_png(fig, join_uri(root, "density_vs_metric.png")))

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (task, pts) in enumerate(sorted(per_task.items())):
            ax.scatter([p["alpha"] for p in pts], [p["val_metric"] for p in pts], color=f"C{i % 10}", label=task)
        ax.set_xlabel("alpha (1 = task-specific, 0 = task-agnostic)")
        ax.set_ylabel("validation metric")
        ax.set_title("alpha vs metric")
        ax.legend(fontsize=7)
        out.append(save_png(fig, join_uri(root, "alpha_vs_metric.png")))

    maps = {}
    for task, uri in sorted(agnostic_maps.items()):
        if uri and exists(uri):
            maps[f"task-agnostic for {task}"] = ImportanceMap.load(uri)
    for name, uri in sorted(dataset_maps.items()):
        if uri and exists(uri):
            maps[name] = ImportanceMap.load(uri)
    if maps:
        fig, ax = plt.subplots(figsize=(7, 4))
        layers: list[str] = []
        masses = {}
        for label, m in maps.items():
            masses[label] = importance_mass_per_layer(m.scores)
            for layer in masses[label]:
                if layer not in layers:
                    layers.append(layer)
        layers.sort(key=_layer_order)
        for label, mass in masses.items():
            ax.plot(range(len(layers)), [mass.get(layer, 0.0) for layer in layers], marker="o", label=label,
                    linewidth=2.5 if label.startswith("task-agnostic") else 1,
                    linestyle="--" if label.startswith("task-agnostic") else "-")
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7)
        ax.set_xlabel("layer (network order)")
        ax.set_ylabel("share of importance mass")
        ax.set_title("importance mass per layer")
        ax.legend(fontsize=7)
        out.append(save_png(fig, join_uri(root, "importance_mass_per_layer.png")))
    return out


_MODULE_TYPES = (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"),
                 ("patch_embed", "patch_embed"), ("stem", "stem"))


def _block_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _type_of(name: str) -> str:
    return next((label for key, label in _MODULE_TYPES if key in name), "other")


def selection_location(indices: dict[str, Any]) -> tuple[dict[int, int], dict[str, int]]:
    """Selected entries per transformer block (numeric order) and per module type."""
    per_block: dict[int, int] = {}
    per_type: dict[str, int] = {}
    for name, idx in indices.items():
        n = int(idx.numel())
        b = _block_of(name)
        if b is not None:
            per_block[b] = per_block.get(b, 0) + n
        per_type[_type_of(name)] = per_type.get(_type_of(name), 0) + n
    return dict(sorted(per_block.items())), per_type


def plot_selection_location(masks: dict[str, dict[str, Any]], uri: str,
                            title: str = "where SH-PEFT's selected weights sit: per block") -> str | None:
    """Two panels: share of each mask's selected weights per transformer block and per module type.

    ``masks``: legend label (a task or dataset name) -> {parameter name: selected flat indices}.
    """
    if not masks:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    present = {_type_of(n) for idx in masks.values() for n in idx}
    types = [label for _, label in (*_MODULE_TYPES, ("", "other")) if label in present]
    width = 0.8 / len(masks)
    all_blocks: set[int] = set()
    for i, (t, idx) in enumerate(masks.items()):
        per_block, per_type = selection_location(idx)
        total = sum(int(v.numel()) for v in idx.values()) or 1
        blocks = sorted(per_block)
        all_blocks.update(blocks)
        ax1.plot(blocks, [per_block[b] / total for b in blocks], marker="o", label=t, color=f"C{i % 10}")
        ax2.bar([j + i * width for j in range(len(types))], [per_type.get(ty, 0) / total for ty in types],
                width=width, label=t, color=f"C{i % 10}")
    ax1.set_ylim(bottom=0)
    if all_blocks:
        ax1.set_xticks(sorted(all_blocks))  # whole block numbers only
    ax1.set_xlabel("transformer block")
    ax1.set_ylabel("share of selected weights")
    ax1.set_title(title)
    ax1.legend(fontsize=7)
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=20)
    ax2.set_xlabel("module type")
    ax2.set_ylabel("share of selected weights")
    ax2.set_title("per module type")
    return save_png(fig, uri)


def plot_roc_curves(curves: dict[str, dict[str, dict]], uri: str, title: str) -> str | None:
    """ROC curves, one panel per finding: ``curves`` maps a legend label (a method, or the task) to
    {finding: {"fpr": [...], "tpr": [...]}} as the evaluation files keep them."""
    import math

    findings = list(dict.fromkeys(f for per in curves.values() for f in per))
    if not findings:
        return None
    cols = min(4, len(findings))
    rows = math.ceil(len(findings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for k, finding in enumerate(findings):
        ax = axes[k // cols][k % cols]
        for i, (label, per) in enumerate(curves.items()):
            c = per.get(finding)
            if c:
                ax.plot(c["fpr"], c["tpr"], color=f"C{i % 10}", label=label, linewidth=1.4)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(finding, fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        if k == 0 and len(curves) > 1:
            ax.legend(fontsize=7, loc="lower right")
    for k in range(len(findings), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, uri)
