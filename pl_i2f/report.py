"""Utility-privacy trade-off reports from the ``summary.json`` files runs write.

    python -m pl_i2f.report logs/noise_grid/multiruns/<date>_<time>      # → tradeoff.png, tradeoff.md there

One point per run: final validation accuracy against the I²F leakage estimate (expected reconstruction RMSE
on the [0, 1] pixel scale; lower = leaks more) and against ε where the run was DP. Runs are grouped by
defense so defenses compare on one figure.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


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
    for path in sorted(Path(root).rglob(SUMMARY_FILE)):
        summary = json.loads(path.read_text())
        final, defense = summary.get("final", {}), summary.get("defense", {})
        points.append(RunPoint(
            path=path.parent,
            defense=defense.get("name", "none"),
            label=_label(defense),
            val_acc=final.get("val/acc"),
            test_acc=final.get("test/acc"),
            leakage=final.get("leakage/expected_i2f_pixel_rmse"),
            epsilon=final.get("privacy/epsilon"),
            audit_rmse=final.get("audit/rmse"),
        ))
    return sorted(points, key=lambda p: (p.defense, str(p.path)))


def markdown_table(points: list[RunPoint]) -> str:
    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.4g}"

    lines = ["| run | defense | val acc | test acc | I²F pixel RMSE | ε | audit RMSE |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p.path.name} | {p.label} | {fmt(p.val_acc)} | {fmt(p.test_acc)} | {fmt(p.leakage)} | "
              f"{fmt(p.epsilon)} | {fmt(p.audit_rmse)} |" for p in points]
    return "\n".join(lines)


def plot_tradeoff(points: list[RunPoint], path: Path) -> Path:
    """Accuracy vs leakage (and vs ε when any run is DP), one series per defense, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_eps = any(p.epsilon is not None for p in points)
    fig, axes = plt.subplots(1, 2 if with_eps else 1, figsize=(11 if with_eps else 5.5, 4), squeeze=False)
    panels = [("leakage", "expected reconstruction RMSE (I²F, [0,1] pixels)")]
    if with_eps:
        panels.append(("epsilon", "ε"))
    for ax, (attr, xlabel) in zip(axes[0], panels):
        for defense in sorted({p.defense for p in points}):
            series = sorted((getattr(p, attr), p.val_acc, p.label) for p in points
                            if p.defense == defense and getattr(p, attr) is not None and p.val_acc is not None)
            if not series:
                continue
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a run or multirun directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: root)")
    args = parser.parse_args(argv)
    points = load_runs(args.root)
    from pl_i2f.studies.report import redraw_studies  # study runs (python study.py ...): their own figures
    if redraw_studies(args.root, args.out) and not points:
        return
    if not points:
        parser.exit(2, f"error: no {SUMMARY_FILE} below {args.root} (runs need the TradeoffTracker callback)\n")
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(points)
    (out / "tradeoff.md").write_text(table + "\n")
    figure = plot_tradeoff(points, out / "tradeoff.png")
    print(table)
    print(f"\nwrote {figure} and {out / 'tradeoff.md'}")


if __name__ == "__main__":
    main()
