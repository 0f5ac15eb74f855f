"""``init_study``: how the weight initialisation shapes leakage at initialisation and through training, and
which inits leak less at equal accuracy (the paper's §5.3).

Runs: ``python train.py experiment=init_study`` (six ``model.init`` schemes × 3 seeds, no defense). Without a
defense the released gradient determines each probe to first order (the expected error is 0), so inits are
compared by the noise it would take to protect them: ``leakage/sigma_for_target``, the Gaussian σ on the mean
gradient of a batch that holds the prior-aware attacker at the target pixel RMSE (:mod:`pl_i2f.calibrated`).
Higher = the init leaks more (it needs more noise).

Rows (``init_study.csv``): ``kind=run`` (one per job: init, seed, final accuracy, that σ at step 0 and at the
end) and ``kind=evaluation`` (one per job and monitor evaluation: the curve). Summary: per init the mean and
spread over seeds, and the "privacy-preferred" inits — those within ``ACCURACY_TOLERANCE`` of the best mean
accuracy, ordered by the σ they need at the end (least first).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pl_i2f.studies.figures import pyplot, save_figure
from pl_i2f.studies.stats import spearman
from pl_i2f.studies.training import TrainingRun, finite, mean_and_spread, std

NAME = "init_study"
#: inits whose mean final validation accuracy is within this of the best count as "equal accuracy"
ACCURACY_TOLERANCE = 0.02
#: what the study compares: the noise each init needs (the expected error itself is 0 without a defense)
KEY = "sigma_for_target"
LEAKAGE_LABEL = "Gaussian σ on the mean gradient for the target RMSE\n(the noise it needs; higher = leaks more)"


def _init_name(run: TrainingRun) -> str:
    return str(run.setting("model", "init") or "default")


def analyse(runs: list[TrainingRun]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for run in runs:
        init, seed = _init_name(run), run.setting("seed")
        first = run.first(KEY)
        curve = run.curve(KEY)
        last_eval = run.last_evaluation()
        records.append({
            "kind": "run", "init": init, "seed": seed, "run": run.path.name,
            "val_acc": run.final.get("val/acc"), "test_acc": run.final.get("test/acc"),
            "leakage_init": first[1] if first and first[0] == 0 else None,
            "leakage_first_step": first[0] if first else None,
            "leakage_end": curve[-1][1] if curve else run.final.get(f"leakage/{KEY}"),
            "leakage_end_step": curve[-1][0] if curve else None,
            "lambda_max_init": run.at_step(0, "lambda_max"),
            "lambda_max_end": last_eval.get("lambda_max"),
            "unfairness_cv_end": last_eval.get("unfairness_cv"),
            "steps": run.summary.get("steps"),
        })
        accuracy = {int(p["step"]): p.get("val_acc") for p in run.points}
        for step, value in curve:
            records.append({"kind": "evaluation", "init": init, "seed": seed, "run": run.path.name, "step": step,
                            "leakage": value, "val_acc": accuracy.get(step)})
        for step, acc in sorted(accuracy.items()):
            records.append({"kind": "epoch", "init": init, "seed": seed, "run": run.path.name, "step": step,
                            "val_acc": acc})
    return records, summarise(records)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in records if r["kind"] == "run"]
    per_init: dict[str, dict[str, Any]] = {}
    for init in sorted({r["init"] for r in runs}):
        rows = [r for r in runs if r["init"] == init]
        entry: dict[str, Any] = {"seeds": len(rows)}
        for key in ("val_acc", "test_acc", "leakage_init", "leakage_end"):
            values = [r[key] for r in rows if finite(r.get(key))]
            mean, low, high = mean_and_spread(values)
            entry[key] = {"mean": mean, "std": std(values), "min": low, "max": high}
        per_init[init] = entry
    accurate = {k: v for k, v in per_init.items() if finite(v["val_acc"]["mean"])}
    best = max((v["val_acc"]["mean"] for v in accurate.values()), default=math.nan)
    equal = [k for k, v in accurate.items() if v["val_acc"]["mean"] >= best - ACCURACY_TOLERANCE]
    preferred = sorted(equal, key=lambda k: (per_init[k]["leakage_end"]["mean"]
                                             if finite(per_init[k]["leakage_end"]["mean"]) else math.inf))
    least, most = (per_init[preferred[0]]["leakage_end"]["mean"], per_init[preferred[-1]]["leakage_end"]["mean"]) \
        if preferred else (math.nan, math.nan)
    return {
        "per_init": per_init,
        "best_val_acc": best,
        "accuracy_tolerance": ACCURACY_TOLERANCE,
        "privacy_preferred": preferred,  # equal accuracy, least noise needed (least leakage) first
        "ratio_end_worst_to_best_at_equal_accuracy": (
            most / least if len(preferred) > 1 and finite(most) and finite(least) and least > 0 else None),
        "rank_correlation_init_vs_end": spearman(
            [per_init[k]["leakage_init"]["mean"] for k in per_init],
            [per_init[k]["leakage_end"]["mean"] for k in per_init]),
    }


def _colors(inits: list[str]) -> dict[str, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {init: cmap(i % 10) for i, init in enumerate(inits)}


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir = Path(out_dir)
    inits = sorted({r["init"] for r in records if r["kind"] == "run"})
    colors = _colors(inits)
    figures = []

    # 1. leakage and accuracy through training: mean over seeds, band = min..max over seeds
    fig, (ax_leak, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for init in inits:
        for kind, ax, key in (("evaluation", ax_leak, "leakage"), ("epoch", ax_acc, "val_acc")):
            by_step: dict[int, list[float]] = {}
            for r in records:
                if r["kind"] == kind and r["init"] == init and finite(r.get(key)):
                    by_step.setdefault(int(r["step"]), []).append(float(r[key]))
            if not by_step:
                continue
            steps = sorted(by_step)
            stats = [mean_and_spread(by_step[s]) for s in steps]
            seeds = max(len(v) for v in by_step.values())
            ax.plot(steps, [s[0] for s in stats], marker="o", markersize=3, color=colors[init],
                    label=f"{init} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.fill_between(steps, [s[1] for s in stats], [s[2] for s in stats], color=colors[init], alpha=0.15)
    ax_leak.set_xscale("symlog", linthresh=10)
    last = max((int(r["step"]) for r in records if r["kind"] == "evaluation"), default=10)
    ticks = [0] + [10 ** k for k in range(1, max(1, math.ceil(math.log10(max(last, 10)))) + 1)]
    ax_leak.set_xticks(ticks, [str(t) for t in ticks])
    ax_leak.set_yscale("log")
    ax_leak.set_xlabel("training step (symlog; 0 = at initialisation)")
    ax_leak.set_ylabel(LEAKAGE_LABEL)
    ax_leak.set_title("leakage through training (mean, band = min–max over seeds)")
    ax_acc.set_xlabel("training step (end of each epoch)")
    ax_acc.set_ylabel("validation accuracy (fraction)")
    ax_acc.set_title("accuracy through training")
    for ax in (ax_leak, ax_acc):
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("init_study: lenet_zhu on digits, no defense")
    fig.tight_layout()
    figures.append(save_figure(fig, out_dir / f"{NAME}_curves.png"))

    # 2. final accuracy against the leakage at initialisation and at the end
    runs = [r for r in records if r["kind"] == "run"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "leakage_init", "at initialisation (step 0)"),
                           (axes[1], "leakage_end", "at the end of training")):
        drawn = False
        for init in inits:
            rows = [r for r in runs if r["init"] == init and finite(r.get(key)) and finite(r.get("val_acc"))]
            if not rows:
                continue
            drawn = True
            xs, ys = [r[key] for r in rows], [r["val_acc"] for r in rows]
            ax.scatter(xs, ys, color=colors[init], alpha=0.45, s=18)
            entry = summary["per_init"][init]
            ax.errorbar(entry[key]["mean"], entry["val_acc"]["mean"], xerr=entry[key]["std"] or None,
                        yerr=entry["val_acc"]["std"] or None, fmt="o", markersize=8, color=colors[init],
                        capsize=3, label=init)
        if drawn:
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel(LEAKAGE_LABEL)
        ax.set_title(f"final accuracy vs leakage {title}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("final validation accuracy (fraction)")
    fig.suptitle("init_study: each small dot a seed, large = mean ± std over seeds")
    fig.tight_layout()
    figures.append(save_figure(fig, out_dir / f"{NAME}_accuracy_vs_leakage.png"))
    return figures
