"""``defense_comparison``: which defense buys the most reconstruction error for the accuracy it costs?

Runs: ``python train.py experiment=defense_comparison`` — none, gaussian, anisotropic, pruning and DP-SGD over
small grids of strengths on the digits, each job audited at its end by a real attack (DLG) on probe digits.

Per job (``defense_comparison.csv``): accuracy, the I2FMonitor's expected reconstruction RMSE at the end (only
for the noisy defenses: ``none`` and ``pruning`` add no noise, so their monitor values are per unit σ and are
not an error an attacker would see), the audit's attack RMSE, ε (DP-SGD), and the spread of the expected error
across the probes (``unfairness_p90_p10``, ``unfairness_cv``) and across classes (last evaluation).

Summary: for accuracy floors, the job with the largest attack RMSE (and the one with the largest expected
RMSE) among the jobs at least that accurate — which defense wins at which accuracy; and the unfairness of each
defense at one matched accuracy (the highest accuracy every noisy defense reaches).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pl_i2f.studies.figures import pyplot, save_figure
from pl_i2f.studies.training import HEADLINE, TrainingRun, finite

NAME = "defense_comparison"
ACCURACY_FLOORS = (0.5, 0.7, 0.8, 0.9)
STRENGTH_KEYS = (("sigma", "σ"), ("noise_multiplier", "z"), ("ratio", "ratio"))
ORDER = ("none", "gaussian", "anisotropic", "pruning", "dpsgd")
RMSE_UNIT = "[0,1] pixels"


def _strength(defense: dict[str, Any]) -> tuple[str | None, float | None]:
    for key, _ in STRENGTH_KEYS:
        if defense.get(key) is not None:
            return key, float(defense[key])
    return None, None


def _label(defense: dict[str, Any]) -> str:
    name = defense.get("name", "none")
    for key, symbol in STRENGTH_KEYS:
        if defense.get(key) is not None:
            return f"{name} {symbol}={float(defense[key]):g}"
    return name


def analyse(runs: list[TrainingRun]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = []
    for run in runs:
        defense = run.defense
        key, value = _strength(defense)
        last = run.last_evaluation()
        per_unit = bool(last.get("per_unit_noise", defense.get("name") in ("none", "pruning")))
        records.append({
            "run": run.path.name, "defense": defense.get("name", "none"), "label": _label(defense),
            "strength_key": key, "strength": value,
            "val_acc": run.final.get("val/acc"), "test_acc": run.final.get("test/acc"),
            "i2f_pixel_rmse": None if per_unit else run.final.get(f"leakage/{HEADLINE}", last.get(HEADLINE)),
            "i2f_per_unit_sigma": run.final.get(f"leakage/{HEADLINE}") if per_unit else None,
            "audit_rmse": run.final.get("audit/rmse"),
            "epsilon": run.final.get("privacy/epsilon"),
            "unfairness_p90_p10": last.get("unfairness_p90_p10"),
            "unfairness_cv": last.get("unfairness_cv"),
            "per_class": last.get("per_class"),
            "epochs": run.summary.get("epochs"), "steps": run.summary.get("steps"),
        })
    records.sort(key=lambda r: (_order(r["defense"]), r["strength"] if finite(r["strength"]) else 0.0))
    return records, summarise(records)


def _order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def _best(rows: list[dict[str, Any]], key: str, floor: float) -> dict[str, Any] | None:
    eligible = [r for r in rows if finite(r.get("val_acc")) and r["val_acc"] >= floor and finite(r.get(key))]
    if not eligible:
        return None
    best = max(eligible, key=lambda r: r[key])
    return {"label": best["label"], "val_acc": best["val_acc"], key: best[key]}


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    winners = {f"{floor:g}": {"by_attack_rmse": _best(records, "audit_rmse", floor),
                              "by_i2f_pixel_rmse": _best(records, "i2f_pixel_rmse", floor)}
               for floor in ACCURACY_FLOORS}
    # matched accuracy: the highest accuracy every noisy defense reaches with one of its settings
    noisy = sorted({r["defense"] for r in records if r["defense"] not in ("none",)}, key=_order)
    tops = [max((r["val_acc"] for r in records if r["defense"] == d and finite(r.get("val_acc"))),
                default=math.nan) for d in noisy]
    matched = min((t for t in tops if finite(t)), default=math.nan)
    at_matched = {}
    for name in [*noisy, "none"]:
        rows = [r for r in records if r["defense"] == name and finite(r.get("val_acc"))]
        if not rows or not finite(matched):
            continue
        row = min(rows, key=lambda r: abs(r["val_acc"] - matched))
        at_matched[name] = {k: row.get(k) for k in ("label", "val_acc", "audit_rmse", "i2f_pixel_rmse",
                                                    "unfairness_p90_p10", "unfairness_cv", "per_class")}
    return {"winners_by_accuracy_floor": winners, "matched_accuracy": matched, "at_matched_accuracy": at_matched,
            "defenses": [d for d in ORDER if any(r["defense"] == d for r in records)]}


def _colors() -> dict[str, Any]:
    cmap = pyplot().get_cmap("tab10")
    return {name: cmap(i) for i, name in enumerate(ORDER)}


def _series(ax: Any, records: list[dict[str, Any]], x: str, y: str, colors: dict[str, Any]) -> bool:
    drawn = False
    for name in sorted({r["defense"] for r in records}, key=_order):
        # joined in order of strength (the grid), not of x: a defense's curve shows what more of it does
        rows = sorted((r for r in records if r["defense"] == name and finite(r.get(x)) and finite(r.get(y))),
                      key=lambda r: (r["strength"] if finite(r.get("strength")) else 0.0, r[x]))
        if not rows:
            continue
        drawn = True
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", color=colors.get(name), label=name)
        for r in rows:
            tag = r["label"].split(" ", 1)[-1] if " " in r["label"] else ""
            if tag:
                ax.annotate(tag, (r[x], r[y]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    return drawn


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir = Path(out_dir)
    colors = _colors()
    figures = []

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (ax_i2f, ax_attack), (ax_calib, ax_eps) = axes
    panels = [
        (ax_i2f, "i2f_pixel_rmse", "val_acc", f"expected reconstruction RMSE, I²F monitor ({RMSE_UNIT})",
         "validation accuracy (fraction)", "accuracy vs predicted error (noisy defenses)", True),
        (ax_attack, "audit_rmse", "val_acc", f"real attack (DLG) reconstruction RMSE ({RMSE_UNIT})",
         "validation accuracy (fraction)", "accuracy vs the real attack's error (all defenses)", False),
        (ax_calib, "i2f_pixel_rmse", "audit_rmse", f"expected reconstruction RMSE, I²F ({RMSE_UNIT})",
         f"real attack (DLG) RMSE ({RMSE_UNIT})", "real attack vs I²F prediction", True),
        (ax_eps, "epsilon", "val_acc", "ε (δ = 1e-5)", "validation accuracy (fraction)",
         "accuracy vs ε (DP-SGD only)", True),
    ]
    for ax, x, y, xlabel, ylabel, title, logx in panels:
        drawn = _series(ax, records, x, y, colors)
        if drawn and logx:
            ax.set_xscale("log")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no job has {x}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    none_acc = [r["val_acc"] for r in records if r["defense"] == "none" and finite(r.get("val_acc"))]
    if none_acc:
        for ax in (ax_i2f, ax_eps):
            ax.axhline(max(none_acc), color=colors["none"], linestyle="--", linewidth=1, label="no defense")
            ax.legend(fontsize=8)
    pairs = [(r["i2f_pixel_rmse"], r["audit_rmse"]) for r in records
             if finite(r.get("i2f_pixel_rmse")) and finite(r.get("audit_rmse"))]
    if pairs:
        low = min(min(p) for p in pairs if min(p) > 0) if any(min(p) > 0 for p in pairs) else 1e-3
        high = max(max(p) for p in pairs)
        ax_calib.plot([low, high], [low, high], color="gray", linestyle=":", label="attack = prediction")
        ax_calib.set_yscale("log")
        floor = [r["audit_rmse"] for r in records if r["defense"] == "none" and finite(r.get("audit_rmse"))]
        if floor:  # what the same attack reaches with no defense at all: its own floor on this model
            ax_calib.axhline(min(floor), color=colors["none"], linestyle="--", linewidth=1,
                             label="attack, no defense")
        ax_calib.legend(fontsize=8)
    fig.suptitle("defense_comparison: lenet_zhu on digits (DP-SGD: its tanh/SGD recipe), final values")
    fig.tight_layout()
    figures.append(save_figure(fig, out_dir / f"{NAME}.png"))

    at = summary.get("at_matched_accuracy", {})
    with_classes = {k: v for k, v in at.items() if isinstance(v.get("per_class"), dict) and v["per_class"]}
    if with_classes:
        fig, ax = plt.subplots(figsize=(14, 4.5))
        classes = sorted({c for v in with_classes.values() for c in v["per_class"]}, key=int)
        width = 0.8 / len(with_classes)
        for i, (name, entry) in enumerate(with_classes.items()):
            values = [entry["per_class"].get(c) for c in classes]
            mean = sum(v for v in values if finite(v)) / max(1, sum(1 for v in values if finite(v)))
            relative = [v / mean if finite(v) and mean > 0 else 0.0 for v in values]
            p9010, cv = entry.get("unfairness_p90_p10"), entry.get("unfairness_cv")
            label = (f"{entry['label']} (acc {entry['val_acc']:.2f}; p90/p10 "
                     f"{p9010:.2f}, cv {cv:.2f})" if finite(p9010) and finite(cv) else entry["label"])
            ax.bar([int(c) + (i - (len(with_classes) - 1) / 2) * width for c in classes], relative, width=width,
                   color=colors.get(name), label=label)
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_xticks([int(c) for c in classes])
        ax.set_xlabel("digit class (probe samples of that class)")
        ax.set_ylabel("expected reconstruction RMSE of the class\n/ mean over all probes (ratio)")
        ax.set_title(f"unfairness across classes at matched accuracy ≈ {summary['matched_accuracy']:.2f} "
                     "(below 1: that class leaks more)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        figures.append(save_figure(fig, out_dir / f"{NAME}_unfairness.png"))
    return figures
