"""The schedule search's figure (:func:`plot_search`): accuracy against the end/start noise ratio of every trial, and
ε and accuracy per epoch of the best constant against the best non-constant schedule."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pl_i2f.runs import read_summary

if TYPE_CHECKING:
    from pl_i2f.studies.schedule_search import TrialResult


def _curve(row: TrialResult, key: str) -> tuple[list[int], list[float]]:
    points = (read_summary(Path(row.path)) or {}).get("points", [])
    pairs = [(p["epoch"] + 1, p[key]) for p in points if p.get(key) is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


SHAPE_COLORS = {"constant": "black", "linear": "tab:blue", "cosine": "tab:orange", "exponential": "tab:green",
                "step": "tab:purple"}
LR_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_search(rows: list[TrialResult], best: TrialResult | None, constant: TrialResult | None,
                challenger: TrialResult | None, summary: dict[str, Any], path: Path) -> Path:
    """(1) validation accuracy of every trial against its end/start noise ratio, one colour per shape, one marker
    per learning rate (infeasible trials as crosses, the best one ringed, the best constant as a line);
    (2) ε spent per epoch and (3) validation accuracy per epoch of the best constant vs the best non-constant
    schedule; (4) with seed reruns, both on fresh seeds (mean ± std)."""
    from pl_i2f.studies.figures import pyplot

    plt = pyplot()

    seeds = summary.get("seeds") or {}
    with_seeds = bool(seeds.get("constant") and seeds.get("best_non_constant"))
    fig, axes = plt.subplots(1, 4 if with_seeds else 3, figsize=(21 if with_seeds else 16, 4.6))
    ax = axes[0]
    rates = sorted({r.lr for r in rows if r.lr is not None})
    markers = {lr: LR_MARKERS[i % len(LR_MARKERS)] for i, lr in enumerate(rates)}
    for r in rows:
        if r.status != "ok" or r.val_acc is None or r.end_ratio is None:
            continue
        color = SHAPE_COLORS.get(r.schedule, "gray")
        if r.feasible:
            ax.scatter(r.end_ratio, 100 * r.val_acc, color=color, marker=markers.get(r.lr, "o"), s=40, alpha=0.85)
        else:
            ax.scatter(r.end_ratio, 100 * r.val_acc, color=color, marker="x", s=50)
    if best is not None and best.end_ratio is not None:
        ax.scatter(best.end_ratio, 100 * best.val_acc, facecolors="none", edgecolors="red", s=180, linewidths=1.5,
                   label="best feasible")
    if constant is not None:
        ax.axhline(100 * constant.val_acc, color="gray", ls="--", lw=1,
                   label=f"best constant ({100 * constant.val_acc:.1f}%)")
    for shape in SHAPE_COLORS:  # the shapes, in SHAPES order
        if any(r.schedule == shape for r in rows):
            ax.scatter([], [], color=SHAPE_COLORS[shape], marker="o", label=shape)
    for lr in rates:
        ax.scatter([], [], color="gray", marker=markers[lr], label=f"lr {lr:g}")
    if any(r.status == "ok" and not r.feasible for r in rows):
        ax.scatter([], [], color="gray", marker="x", label="infeasible (ε > target)")
    ax.set_xscale("log")
    ratios = [r.end_ratio for r in rows if r.end_ratio] or [1.0]
    ticks = [t for t in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0) if min(ratios) / 1.5 <= t <= max(ratios) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("end/start noise ratio r = σ_last / σ_first (log; < 1: annealed)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{len(rows)} trials, every one at ε = {summary['target_epsilon']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    pairs = [(r, name, style) for r, name, style in ((challenger, "best non-constant", "-"),
                                                     (constant, "best constant", "--")) if r is not None]
    for ax, key, ylabel in ((axes[1], "epsilon", "ε spent so far (δ = 1e-5)"),
                            (axes[2], "val_acc", "validation accuracy (%)")):
        for r, name, style in pairs:
            epochs, values = _curve(r, key)
            scale = 100 if key == "val_acc" else 1
            label = f"{name}: {r.label}" + (f", lr {r.lr:g}" if r.lr is not None else "")
            ax.plot(epochs, [scale * v for v in values], style, marker="o", ms=3, label=label)
        if key == "epsilon" and isinstance(summary["target_epsilon"], float):
            ax.axhline(summary["target_epsilon"], color="red", lw=0.8, ls=":", label="target ε")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_title("privacy spent: same budget, different timing")
    axes[2].set_title("training at the same ε (search seed)")
    if with_seeds:
        ax = axes[3]
        for i, key in enumerate(("constant", "best_non_constant")):
            stats = seeds[key]
            for j, metric in enumerate(("val_acc", "test_acc")):
                mean, std = stats[metric]["mean"], stats[metric]["std"] or 0.0
                ax.bar(i + 0.38 * (j - 0.5), 100 * mean, width=0.36, yerr=100 * std, capsize=4,
                       color=("tab:gray", "tab:blue")[j], label=("validation", "test")[j] if i == 0 else None)
        names = [f"{r.label}, lr {r.lr:g}" if r.lr is not None else r.label for r in (constant, challenger)]
        ax.set_xticks([0, 1], [f"best constant\n{names[0]}", f"best non-constant\n{names[1]}"])
        low = min(100 * seeds[k][m]["mean"] for k in ("constant", "best_non_constant") for m in ("val_acc", "test_acc"))
        ax.set_ylim(max(0.0, low - 10), 100)
        ax.set_ylabel("accuracy (%), mean ± std")
        ax.set_title(f"fresh seeds {seeds['constant']['seeds']}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"DP-SGD noise schedules at a fixed privacy budget ({summary['epochs']} epochs, σ₀ calibrated "
                 "per trial)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
