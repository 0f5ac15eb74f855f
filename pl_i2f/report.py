"""Utility-privacy trade-off reports from the ``summary.json`` files runs write.

    python -m pl_i2f.report logs/noise_grid/multiruns/<date>_<time>      # → tradeoff.png, tradeoff.md there
    python -m pl_i2f.report logs/init_study/multiruns/<date>_<time> --wandb off

One point per run: final validation accuracy against the I²F leakage estimate (expected reconstruction RMSE
on the [0, 1] pixel scale; lower = leaks more) and against ε where the run was DP. Runs are grouped by
defense so defenses compare on one figure.

Studies found below the directory get their own figures and numbers too: training studies (jobs whose
``task_name`` is registered in :data:`pl_i2f.studies.training.TRAINING_STUDIES`: ``init_study``,
``defense_comparison``, ``tradeoff_dpsgd``/``noise_grid`` …) and analysis studies (``python study.py``: their
``<study>.json``). With W&B on (``--wandb auto``: when the jobs logged to W&B), everything written goes to one
combined W&B run (offline unless the jobs were online): the tables, the figures, the studies' summaries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pl_i2f.runs import SUMMARY_FILE
from pl_i2f.runs import load_runs as load_run_folders
from pl_i2f.studies.report import redraw_studies
from pl_i2f.studies.training import report_multirun_studies, report_training_studies


def format_number(value: float | int | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, in the notation its magnitude calls for.

    Plain decimals between 1e-3 and 1e5 (trailing zeros dropped: ``0.9783``, ``0.01``, ``20``), scientific
    notation outside (``2.602e+06``, ``1e+10``, ``3.4e-09``), so that a 1e-9 eigenvalue does not print as
    ``0.0000`` beside a 1e6 condition number. ``None`` → ``—``; NaN and ±inf as ``nan``, ``inf``, ``-inf``.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if value is None:
        return "—"
    number = float(value)
    if not math.isfinite(number):
        return str(number)
    if number == 0:
        return "0"
    magnitude = abs(number)
    if 1e-3 <= magnitude < 1e5:
        decimals = max(digits - 1 - math.floor(math.log10(magnitude)), 0)
        text = f"{number:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{number:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


@dataclass
class RunPoint:
    path: Path
    defense: str
    label: str
    val_acc: float | None
    test_acc: float | None
    leakage: float | None
    epsilon: float | None
    audit_rmse: float | None


def _label(defense: dict[str, Any]) -> str:
    """A short description of the defense's noise level, e.g. ``dpsgd σ=1.0``."""
    name = defense.get("name", "none")
    for key, symbol in (("noise_multiplier", "σ"), ("sigma", "σ"), ("ratio", "ratio")):
        if defense.get(key) is not None:
            return f"{name} {symbol}={defense[key]:g}"
    return name


def load_runs(root: Path) -> list[RunPoint]:
    """Every run below ``root`` that wrote a ``summary.json``, sorted by defense and path."""
    points = []
    for run in load_run_folders(root):
        final, defense = run.summary.get("final", {}), run.summary.get("defense", {})
        points.append(RunPoint(
            path=run.path,
            defense=defense.get("name", "none"),
            label=_label(defense),
            val_acc=final.get("val/acc"),
            test_acc=final.get("test/acc"),
            leakage=final.get("leakage/expected_pixel_rmse"),
            epsilon=final.get("privacy/epsilon"),
            audit_rmse=final.get("audit/rmse"),
        ))
    return sorted(points, key=lambda p: (p.defense, str(p.path)))


def markdown_table(points: list[RunPoint]) -> str:
    lines = ["| run | defense | val acc | test acc | expected attack RMSE ([0,1] pixels) | ε "
             "| audit RMSE ([0,1] pixels) |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        values = [format_number(v) for v in (p.val_acc, p.test_acc, p.leakage, p.epsilon, p.audit_rmse)]
        if p.leakage == 0:
            values[2] += " (no noise: the gradient gives the input away)"
        lines.append(f"| {p.path.name} | {p.label} | {' | '.join(values)} |")
    return "\n".join(lines)


#: The x axes of the trade-off figure: (RunPoint attribute, axis label, what a run needs to have it).
PANELS = (
    ("leakage", "expected reconstruction RMSE of a prior-aware attacker ([0,1] pixels)\n"
                "at the run's noise (runs without noise: 0, not drawn)",
     "leakage/expected_pixel_rmse: the I2FMonitor evaluated no probe (callbacks=default; see its skip warning)"),
    ("epsilon", "ε", "privacy/epsilon: only DP-SGD runs (defense=dpsgd) have one"),
)


def _plottable(points: list[RunPoint], attr: str) -> list[RunPoint]:
    # a run without noise has leakage 0 (exact recovery): nothing to draw on a log axis
    return [p for p in points if getattr(p, attr) is not None and p.val_acc is not None
            and not (attr == "leakage" and p.leakage <= 0)]


def missing(points: list[RunPoint]) -> list[str]:
    """One line for each trade-off axis that no run can be drawn on, saying what the runs lack."""
    return [f"no run has {need}" for attr, _, need in PANELS if not _plottable(points, attr)]


def plot_tradeoff(points: list[RunPoint], path: Path) -> Path | None:
    """Accuracy vs leakage and vs ε, one series per defense, saved as a PNG. An axis no run has a value for
    (no leakage estimate, no DP run) is left out; with neither, no figure is drawn and ``None`` returned."""
    panels = [(attr, label) for attr, label, _ in PANELS if _plottable(points, attr)]
    if not panels:
        return None
    from pl_i2f.studies.figures import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (attr, xlabel) in zip(axes[0], panels):
        drawable = _plottable(points, attr)
        for defense in sorted({p.defense for p in drawable}):
            series = sorted((getattr(p, attr), p.val_acc, p.label) for p in drawable if p.defense == defense)
            xs, ys, _ = zip(*series)
            ax.plot(xs, ys, marker="o", label=defense)
            for x, y, label in series:
                ax.annotate(label.split(" ", 1)[-1], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("utility-privacy trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _flat(prefix: str, value: Any, out: dict[str, float]) -> dict[str, float]:
    """Scalars of a nested summary as ``prefix/key/...`` → float (for W&B's summary)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}", v, out)
    elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
        out[prefix] = float(value)
    return out


def wandb_mode(root: Path, choice: str) -> str | None:
    """``offline``/``online`` for the combined W&B run, or ``None`` (off). ``auto``: on when the jobs below
    ``root`` logged to W&B (their config has ``logger.wandb``), online only if they were, never when
    ``WANDB_MODE=disabled``."""
    if choice == "off" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if choice != "auto":
        return choice
    settings = [r.config.get("logger", {}).get("wandb") for r in load_run_folders(root)
                if isinstance(r.config.get("logger"), dict)]
    settings = [s for s in settings if isinstance(s, dict) and "_target_" in s]  # a logger train.py built
    if not settings:
        return None
    return "online" if any(s.get("offline") is False for s in settings) else "offline"


def log_combined_wandb(root: Path, out: Path, mode: str, points: list[RunPoint], studies: list[Any],
                       figures: list[Path]) -> Path:
    """One W&B run for the whole directory: the runs' trade-off table, each study's rows as a table and its
    summary's scalars, every figure as an image. Returns the run's folder."""
    import wandb

    group = studies[0].name if len(studies) == 1 else root.name
    run = wandb.init(project="pl_i2f", job_type="report", group=group, name=f"report {root.name}",
                     dir=str(out), mode=mode, config={"root": str(root)})
    payload: dict[str, Any] = {}
    if points:
        columns = ["run", "defense", "label", "val_acc", "test_acc", "leakage", "epsilon", "audit_rmse"]
        payload["report/runs"] = wandb.Table(columns=columns, data=[
            [str(p.path.relative_to(root)) if p.path.is_relative_to(root) else str(p.path), p.defense, p.label,
             p.val_acc, p.test_acc, p.leakage, p.epsilon, p.audit_rmse] for p in points])
    for study in studies:
        columns = list(dict.fromkeys(k for row in study.records for k in row))
        payload[f"{study.name}/records"] = wandb.Table(
            columns=columns, data=[[json.dumps(row[c]) if isinstance(row.get(c), (dict, list)) else row.get(c)
                                    for c in columns] for row in study.records])
        run.summary.update(_flat(study.name, study.summary, {}))
    for figure in figures:
        payload[f"figures/{figure.stem}"] = wandb.Image(str(figure))
    run.log(payload)
    run_dir = Path(run.dir).parent
    wandb.finish()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a run or multirun directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: root)")
    parser.add_argument("--wandb", choices=("auto", "off", "offline", "online"), default="auto",
                        help="one combined W&B run of everything drawn (auto: when the jobs logged to W&B)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.exit(2, f"error: no such folder: {args.root}\n" if not args.root.exists()
                    else f"error: {args.root} is a file; give a run or multirun folder\n")
    points = load_runs(args.root)
    figures = list(redraw_studies(args.root, args.out))  # study runs (python study.py ...): their own figures
    studies = report_training_studies(args.root, args.out)  # training studies (python train.py ...)
    for study in studies:
        for path in [*study.files, *study.figures]:
            print(f"wrote {path}")
        figures += study.figures
    figures += report_multirun_studies(args.root, args.out)  # e.g. hparams_search=schedule_search
    if not points and not figures:
        parser.exit(2, f"error: no {SUMMARY_FILE} below {args.root} (runs need the TradeoffTracker callback)\n")
    out = args.out or args.root
    if points:
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(points)
        (out / "tradeoff.md").write_text(table + "\n")
        figure = plot_tradeoff(points, out / "tradeoff.png")
        print(table)
        for line in missing(points):
            print(f"note: {line}; that plot is left out")
        written = [str(f) for f in (figure, out / "tradeoff.md") if f is not None]
        print(f"\nwrote {' and '.join(written)}")
        figures += [figure] if figure is not None else []
    mode = wandb_mode(args.root, args.wandb)
    if mode is not None:
        run_dir = log_combined_wandb(args.root, out, mode, points, studies, figures)
        print(f"combined W&B run ({mode}): {run_dir}")


if __name__ == "__main__":
    main()
