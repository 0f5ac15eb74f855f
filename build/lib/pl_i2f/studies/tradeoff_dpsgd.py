"""``tradeoff_dpsgd``: DP-SGD's noise multiplier → accuracy vs ε vs the expected reconstruction error.

Runs: ``python train.py experiment=tradeoff_dpsgd`` (one job per noise multiplier; the same analysis reads the
older ``hparams_search=noise_grid`` sweeps). Rows (``tradeoff_dpsgd.csv``): ``kind=run`` (final accuracy, ε,
the I2FMonitor's expected reconstruction RMSE on [0, 1] pixels, the audit's RMSE when audited) and
``kind=epoch`` (the same through training, from the TradeoffTracker's per-epoch points). Summary: the rank
correlations of the noise multiplier with ε, leakage and accuracy, and the best accuracy within ε budgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pl_i2f.studies.figures import pyplot, save_figure
from pl_i2f.studies.stats import spearman
from pl_i2f.studies.training import HEADLINE, TrainingRun, finite

NAME = "tradeoff_dpsgd"
EPSILON_BUDGETS = (1.0, 3.0, 8.0)
RMSE_LABEL = "expected reconstruction RMSE, I²F monitor ([0,1] pixels)"


def analyse(runs: list[TrainingRun]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for run in runs:
        z = run.defense.get("noise_multiplier")
        records.append({
            "kind": "run", "run": run.path.name, "defense": run.defense.get("name"), "noise_multiplier": z,
            "val_acc": run.final.get("val/acc"), "test_acc": run.final.get("test/acc"),
            "epsilon": run.final.get("privacy/epsilon"), "i2f_pixel_rmse": run.final.get(f"leakage/{HEADLINE}"),
            "audit_rmse": run.final.get("audit/rmse"), "epochs": run.summary.get("epochs"),
            "steps": run.summary.get("steps"),
        })
        for point in run.points:
            records.append({"kind": "epoch", "run": run.path.name, "noise_multiplier": z,
                            "epoch": point.get("epoch"), "step": point.get("step"), "val_acc": point.get("val_acc"),
                            "epsilon": point.get("epsilon"), "i2f_pixel_rmse": point.get("leakage"),
                            "leakage_step": point.get("leakage_step")})
    records.sort(key=lambda r: (r["kind"] != "run", r["noise_multiplier"] or 0.0, r.get("epoch") or 0))
    return records, summarise(records)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in records if r["kind"] == "run"]
    z = [r["noise_multiplier"] for r in runs]
    budgets = {}
    for budget in EPSILON_BUDGETS:
        within = [r for r in runs if finite(r.get("epsilon")) and r["epsilon"] <= budget and finite(r.get("val_acc"))]
        best = max(within, key=lambda r: r["val_acc"], default=None)
        budgets[f"{budget:g}"] = None if best is None else {
            k: best[k] for k in ("noise_multiplier", "val_acc", "epsilon", "i2f_pixel_rmse")}
    return {
        "per_noise_multiplier": [{k: r[k] for k in ("noise_multiplier", "val_acc", "test_acc", "epsilon",
                                                     "i2f_pixel_rmse", "audit_rmse")} for r in runs],
        "rank_correlation": {
            "noise_multiplier_vs_epsilon": spearman(z, [r["epsilon"] for r in runs]),
            "noise_multiplier_vs_i2f_pixel_rmse": spearman(z, [r["i2f_pixel_rmse"] for r in runs]),
            "noise_multiplier_vs_val_acc": spearman(z, [r["val_acc"] for r in runs]),
        },
        "best_accuracy_within_epsilon": budgets,
    }


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir = Path(out_dir)
    runs = [r for r in records if r["kind"] == "run"]
    multipliers = sorted({r["noise_multiplier"] for r in runs if finite(r.get("noise_multiplier"))})
    cmap = plt.get_cmap("viridis")
    color = {z: cmap(i / max(1, len(multipliers) - 1)) for i, z in enumerate(multipliers)}

    fig, (ax_eps, ax_leak, ax_z) = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key in ((ax_eps, "epsilon"), (ax_leak, "i2f_pixel_rmse")):
        drawn = False
        for z in multipliers:
            path = [r for r in records if r["kind"] == "epoch" and r["noise_multiplier"] == z
                    and finite(r.get(key)) and finite(r.get("val_acc"))]
            if path:
                ax.plot([r[key] for r in path], [r["val_acc"] for r in path], color=color[z], alpha=0.5,
                        linewidth=1)
            final = [r for r in runs if r["noise_multiplier"] == z and finite(r.get(key)) and finite(r.get("val_acc"))]
            for r in final:
                drawn = True
                ax.scatter(r[key], r["val_acc"], color=color[z], s=45, zorder=3, label=f"z = {z:g}")
        if drawn:
            ax.set_xscale("log")
            ax.legend(fontsize=8, title="noise multiplier")
        else:
            ax.text(0.5, 0.5, f"no run has {key}", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("validation accuracy (fraction)")
        ax.grid(alpha=0.3, which="both")
    ax_eps.set_xlabel("ε spent so far (δ = 1e-5; log)")
    ax_eps.set_title("accuracy vs ε (line: through training, dot: end)")
    ax_leak.set_xlabel(RMSE_LABEL)
    ax_leak.set_title("accuracy vs expected reconstruction error")

    rows = sorted((r for r in runs if finite(r.get("noise_multiplier"))), key=lambda r: r["noise_multiplier"])
    eps = [(r["noise_multiplier"], r["epsilon"]) for r in rows if finite(r.get("epsilon"))]
    leak = [(r["noise_multiplier"], r["i2f_pixel_rmse"]) for r in rows if finite(r.get("i2f_pixel_rmse"))]
    handles = []
    if eps:
        handles += ax_z.plot(*zip(*eps), marker="o", color="tab:blue", label="ε (left axis)")
        ax_z.set_yscale("log")
    ax_z.set_ylabel("final ε (log)")
    ax_z.set_xlabel("noise multiplier z (log)")
    ax_z.set_xscale("log")
    if multipliers:  # the grid's own values as ticks: log-axis minor labels would overprint each other
        from matplotlib.ticker import NullFormatter

        ax_z.set_xticks(multipliers, [f"{z:g}" for z in multipliers])
        ax_z.xaxis.set_minor_formatter(NullFormatter())
    twin = ax_z.twinx()
    if leak:
        handles += twin.plot(*zip(*leak), marker="s", color="tab:red", label="expected RMSE (right axis)")
        twin.set_yscale("log")
    twin.set_ylabel(RMSE_LABEL)
    if handles:
        ax_z.legend(handles=handles, fontsize=8, loc="upper center")
    ax_z.set_title("what the noise multiplier buys")
    ax_z.grid(alpha=0.3, which="both")
    fig.suptitle("tradeoff_dpsgd: DP-SGD on digits (tanh lenet_zhu, SGD, batch 256, clipping norm 1)")
    return [save_figure(fig, out_dir / f"{NAME}.png")]
