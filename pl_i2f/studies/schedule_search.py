"""Constrained noise-schedule search for DP-SGD: the best validation accuracy *at a fixed ε*.

    python train.py hparams_search=schedule_search                                     # the Optuna search
    python -m pl_i2f.studies.schedule_search logs/schedule_search/multiruns/<run>      # table + figure
    python -m pl_i2f.report logs/schedule_search/multiruns/<run>                       # the same, and more

**Constraint.** Every trial spends the same privacy budget, ``defense.target_epsilon`` at δ = ``defense.delta``:
σ₀ is calibrated per trial to that ε for the trial's schedule (``calibrate_noise_multiplier``, a bisection
over Opacus' accountant replaying σ_t = σ₀ f(t)), so a schedule can only move noise between the start and
the end of training, never spend more privacy. ε is the constraint because it is the guarantee a DP-SGD user
is held to (and reports); a floor on the I²F leakage estimate would be an alternative for heuristic
defenses (``gaussian``), but it is an estimate of one attack family on probe samples, not a guarantee, and a
search would exploit its error. The analysis does not trust the construction: a trial whose final logged ε
exceeds ``target·(1 + schedule_search.epsilon_tolerance)`` is reported as infeasible and never chosen as best;
a trial without a ``summary.json`` is reported as failed.

**Search space** (:func:`search_space`, the Optuna sweeper's ``custom_search_space`` hook): the shape and the
learning rate from the sweeper's ``params``; then the end/start noise ratio r = f(last epoch) / f(0),
log-uniform in ``schedule_search.end_ratio``, expressed in each shape's own option so that all shapes cover the
same ratios: ``final`` for linear and cosine (horizon = the last epoch), ``gamma = r^(1/(E-1))`` for
exponential, ``gamma = r^(1/drops)`` for step (step_size ⌈E/3⌉). The constant schedule at every learning rate of
the grid is enqueued as extra trials: the baseline gets at least the learning-rate search the others get.

**Analysis** (:func:`analyze`): every job's ``summary.json`` and Optuna's ``optimization_results.yaml`` →
``schedule_search_trials.csv`` / ``.json`` and ``schedule_search.png`` in the run directory: the best feasible
schedule against the best constant schedule at the same ε (and, with ``--seeds``, both rerun on fresh seeds).

No Hydra import: the hook receives the sweeper's config and trial; the analysis reads YAML/JSON files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pl_i2f.defenses.schedules import NoiseSchedule
from pl_i2f.report import SUMMARY_FILE
from pl_i2f.studies.stats import finite_number

NAME = "schedule_search"
SHAPES = ("constant", "linear", "cosine", "exponential", "step")
OPTUNA_RESULTS = "optimization_results.yaml"
DEFAULT_END_RATIO = (0.25, 2.0)
DEFAULT_EPSILON_TOLERANCE = 1e-3


# --- the search space (called by hydra-optuna-sweeper for every trial) --------------------------------------


def _options(cfg: Any) -> dict[str, Any]:
    options = cfg.get("schedule_search") if hasattr(cfg, "get") else None
    return dict(options or {})


def step_size_for(epochs: int) -> int:
    """The step schedule's step (in epochs): two drops over the run."""
    return max(1, math.ceil(epochs / 3))


def _enqueue_constant_baselines(cfg: Any, trial: Any) -> None:
    """Queue the constant schedule at every learning rate the search may pick (a categorical ``optim.lr``),
    or at the configured ``optim.lr`` for a continuous one; skip what trial 0 already is."""
    from optuna.distributions import CategoricalDistribution
    from optuna.exceptions import ExperimentalWarning

    distribution = trial.distributions.get("optim.lr")
    if isinstance(distribution, CategoricalDistribution):
        rates = list(distribution.choices)
    else:
        rates = [float(cfg["optim"]["lr"])]
    for lr in rates:
        if trial.params.get("noise_schedule") == "constant" and trial.params.get("optim.lr") == lr:
            continue
        params = {"noise_schedule": "constant"}
        if distribution is not None:
            params["optim.lr"] = lr
        with warnings.catch_warnings():  # Optuna 2.x marks enqueue_trial experimental; it is what we need
            warnings.simplefilter("ignore", ExperimentalWarning)
            trial.study.enqueue_trial(params)


def search_space(cfg: Any, trial: Any) -> None:
    """Optuna sweeper hook (``hydra.sweeper.custom_search_space``): after the sweeper drew ``noise_schedule``
    and ``optim.lr``, draw the end/start noise ratio in the chosen shape's own option. On trial 0, enqueue the
    constant baselines (``schedule_search.constant_baselines``)."""
    options = _options(cfg)
    low, high = (float(v) for v in options.get("end_ratio", DEFAULT_END_RATIO))
    if not 0 < low <= high:
        raise ValueError(f"schedule_search.end_ratio must be 0 < low <= high, got {[low, high]}")
    epochs = int(cfg["trainer"]["max_epochs"])
    by_epoch = cfg["noise_schedule"].get("by", "step") == "epoch"
    if trial.number == 0 and options.get("constant_baselines", True):
        _enqueue_constant_baselines(cfg, trial)
    shape = trial.params.get("noise_schedule")
    last = max(epochs - 1, 1)  # τ of the last epoch: the ratio is reached there
    if shape in ("linear", "cosine"):
        if by_epoch:
            trial.suggest_categorical("noise_schedule.horizon", [last])
        trial.suggest_float("noise_schedule.final", low, high, log=True)
    elif shape == "exponential":  # by epoch: γ^(E-1) = r (by step the same γ range is a ratio of γ^(steps-1))
        trial.suggest_float("noise_schedule.gamma", low ** (1 / last), high ** (1 / last), log=True)
    elif shape == "step":
        step_size = step_size_for(epochs)
        drops = max(last // step_size, 1)
        trial.suggest_categorical("noise_schedule.step_size", [step_size])
        trial.suggest_float("noise_schedule.gamma", low ** (1 / drops), high ** (1 / drops), log=True)


# --- analysis -----------------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    """One job of the search (or of a seed rerun)."""

    number: int
    path: str
    status: str                  # ok | failed (no summary.json)
    schedule: str
    label: str                   # e.g. "cosine r=0.41"
    lr: float | None
    seed: int | None
    end_ratio: float | None      # σ at the last step / σ at the first
    val_acc: float | None
    test_acc: float | None
    epsilon: float | None
    target_epsilon: float | None
    feasible: bool
    leakage: float | None        # I²F expected pixel RMSE at the end (None without the monitor)
    epochs: int | None
    final: float | None = None
    gamma: float | None = None
    step_size: int | None = None


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def _job_config(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _end_ratio(schedule: dict[str, Any], steps: int | None) -> float | None:
    if not steps:
        return None
    known = {"name", "by", "final", "gamma", "step_size", "horizon", "steps_per_epoch"}
    try:
        bound = NoiseSchedule.from_config({k: v for k, v in schedule.items() if k in known})
        return bound.factor(steps - 1) / bound.factor(0)
    except Exception:  # an old summary without the bound horizon: no ratio, the rest of the row stands
        return None


def _label(schedule: str, ratio: float | None) -> str:
    return schedule if schedule == "constant" or ratio is None else f"{schedule} r={ratio:.2g}"


def load_trial(job: Path, tolerance: float = DEFAULT_EPSILON_TOLERANCE) -> TrialResult:
    """One job directory → its row. Feasible: a final ε no larger than the target·(1 + tolerance)."""
    number = int(job.name) if job.name.isdigit() else -1
    summary_path = job / SUMMARY_FILE
    if not summary_path.exists():
        overrides, config = _overrides(job), _job_config(job)
        schedule = overrides.get("noise_schedule", (config.get("noise_schedule") or {}).get("name", "constant"))
        return TrialResult(number, str(job), "failed", schedule, schedule, finite_number(overrides.get("optim.lr")),
                           config.get("seed"), None, None, None, None,
                           finite_number((config.get("defense") or {}).get("target_epsilon")), False, None, None)
    summary = json.loads(summary_path.read_text())
    final, defense = summary.get("final", {}), summary.get("defense", {})
    schedule = dict(defense.get("schedule") or {"name": "constant"})
    run_config = summary.get("run_config", {})
    ratio = _end_ratio(schedule, summary.get("steps"))
    epsilon, target = finite_number(final.get("privacy/epsilon")), finite_number(defense.get("target_epsilon"))
    feasible = epsilon is not None and target is not None and epsilon <= target * (1 + tolerance)
    name = schedule.get("name", "constant")
    return TrialResult(
        number=number, path=str(job), status="ok", schedule=name, label=_label(name, ratio),
        lr=finite_number(run_config.get("lr")), seed=run_config.get("seed"), end_ratio=ratio,
        val_acc=finite_number(final.get("val/acc")), test_acc=finite_number(final.get("test/acc")), epsilon=epsilon,
        target_epsilon=target, feasible=feasible, leakage=finite_number(final.get("leakage/expected_pixel_rmse")),
        epochs=summary.get("epochs"),
        final=finite_number(schedule.get("final")) if name in ("linear", "cosine") else None,
        gamma=finite_number(schedule.get("gamma")) if name in ("exponential", "step") else None,
        step_size=schedule.get("step_size") if name == "step" else None,
    )


def job_dirs(run_dir: Path) -> list[Path]:
    """The multirun's job folders (those Hydra made: a ``.hydra`` folder or a summary), by job number."""
    run_dir = Path(run_dir)
    jobs = {p.parent for p in run_dir.glob("*/.hydra")} | {p.parent for p in run_dir.glob(f"*/{SUMMARY_FILE}")}
    if (run_dir / SUMMARY_FILE).exists():
        jobs.add(run_dir)
    return sorted(jobs, key=lambda p: (int(p.name) if p.name.isdigit() else 10**9, str(p)))


def is_schedule_search(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a schedule_search multirun (its jobs' task_name starts with schedule_search)."""
    run_dir = Path(run_dir)
    multirun = run_dir / "multirun.yaml"
    configs = [multirun] if multirun.exists() else []
    configs += [job / ".hydra" / "config.yaml" for job in job_dirs(run_dir)[:1]]
    for path in configs:
        if path.exists() and str((yaml.safe_load(path.read_text()) or {}).get("task_name", "")).startswith(NAME):
            return True
    return False


def _best(rows: list[TrialResult]) -> TrialResult | None:
    """The feasible row with the highest validation accuracy (ties: the earlier trial)."""
    candidates = [r for r in rows if r.status == "ok" and r.feasible and r.val_acc is not None]
    return max(candidates, key=lambda r: (r.val_acc, -r.number)) if candidates else None


def _optuna(run_dir: Path, rows: list[TrialResult]) -> dict[str, Any] | None:
    """Optuna's own pick (optimization_results.yaml) and whether it met the constraint."""
    path = Path(run_dir) / OPTUNA_RESULTS
    if not path.exists():
        return None
    results = yaml.safe_load(path.read_text()) or {}
    params, value = results.get("best_params", {}), finite_number(results.get("best_value"))
    matches = [r for r in rows if r.val_acc is not None and value is not None and abs(r.val_acc - value) < 1e-9
               and r.schedule == params.get("noise_schedule", r.schedule)]
    return {"best_params": params, "best_value": value,
            "best_trial_feasible": all(r.feasible for r in matches) if matches else None}


def _rerun_command(row: TrialResult, target: float | None, epochs: int | None) -> str:
    options = [f"noise_schedule={row.schedule}"]
    if row.final is not None:
        options += [f"noise_schedule.final={row.final:.10g}", f"noise_schedule.horizon={max((epochs or 2) - 1, 1)}"]
    if row.gamma is not None:
        options.append(f"noise_schedule.gamma={row.gamma:.10g}")
    if row.step_size is not None:
        options.append(f"noise_schedule.step_size={row.step_size}")
    if row.lr is not None:
        options.append(f"optim.lr={row.lr:g}")
    extra = [f"defense.target_epsilon={target:g}"] if target is not None else []
    extra += [f"trainer.max_epochs={epochs}"] if epochs else []
    return " ".join(["python train.py hparams_search=schedule_search_seeds", *options, *extra])


def _config_key(row: TrialResult) -> tuple:
    return (row.schedule, None if row.end_ratio is None else round(row.end_ratio, 4), row.lr)


def seed_statistics(rows: list[TrialResult], reference: TrialResult) -> dict[str, Any] | None:
    """Mean and spread over the seed reruns of the configuration of ``reference`` (same shape, ratio, lr)."""
    same = [r for r in rows if r.status == "ok" and _config_key(r) == _config_key(reference)]
    if not same:
        return None

    def stats(values: list[float]) -> dict[str, float | None]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}

    return {"seeds": [r.seed for r in same], "val_acc": stats([r.val_acc for r in same]),
            "test_acc": stats([r.test_acc for r in same]), "all_feasible": all(r.feasible for r in same),
            "max_epsilon": max(r.epsilon for r in same if r.epsilon is not None)}


def _difference(best: dict | None, constant: dict | None, key: str) -> float | None:
    if not best or not constant:
        return None
    return best[key]["mean"] - constant[key]["mean"]


def _paired(rows: list[TrialResult], a: TrialResult, b: TrialResult) -> dict[str, Any] | None:
    """Per-seed differences a − b over the seeds both configurations ran (mean, std, the differences)."""
    by_seed = {key: {r.seed: r for r in rows if r.status == "ok" and _config_key(r) == _config_key(ref)}
               for key, ref in (("a", a), ("b", b))}
    seeds = sorted(set(by_seed["a"]) & set(by_seed["b"]))
    if len(seeds) < 2:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for metric in ("val_acc", "test_acc"):
        diffs = [getattr(by_seed["a"][s], metric) - getattr(by_seed["b"][s], metric) for s in seeds]
        out[metric] = {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs), "differences": diffs}
    return out


def _gain(a: TrialResult | None, b: TrialResult | None, key: str) -> float | None:
    values = (getattr(a, key, None), getattr(b, key, None))
    return values[0] - values[1] if None not in values else None


def analyze(run_dir: str | Path, out_dir: str | Path | None = None, seed_runs: list[str | Path] | None = None,
            tolerance: float | None = None, plot: bool = True) -> dict[str, Any]:
    """Read a finished (or partial) schedule_search multirun, write ``schedule_search_trials.csv``/``.json``,
    ``schedule_search.json`` and ``schedule_search.png`` into ``out_dir`` (default: the run directory), and
    return the summary: the best feasible trial, the best constant and the best non-constant one, their
    differences in accuracy, the infeasible and failed trials, Optuna's own pick, and with ``seed_runs``
    (multiruns of ``hparams_search=schedule_search_seeds``) the constant and the best non-constant schedule
    over fresh seeds."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    jobs = job_dirs(run_dir)
    if not jobs:
        raise FileNotFoundError(f"no job folders (with .hydra/ or {SUMMARY_FILE}) below {run_dir}")
    if tolerance is None:
        first = _job_config(jobs[0])
        tolerance = float((first.get("schedule_search") or {}).get("epsilon_tolerance", DEFAULT_EPSILON_TOLERANCE))
    rows = [load_trial(job, tolerance) for job in jobs]
    best = _best(rows)
    constant = _best([r for r in rows if r.schedule == "constant"])
    challenger = _best([r for r in rows if r.schedule != "constant"])  # the best schedule that is not constant
    targets = sorted({r.target_epsilon for r in rows if r.target_epsilon is not None})
    target = targets[0] if len(targets) == 1 else None
    epochs = max((r.epochs for r in rows if r.epochs), default=None)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "constraint": f"final ε <= target·(1 + {tolerance:g}) at δ of the run (DP-SGD, σ₀ calibrated per trial)",
        "target_epsilon": target if target is not None else targets,
        "epochs": epochs,
        "trials": len(rows),
        "distinct_configurations": len({_config_key(r) for r in rows}),
        "failed": [r.number for r in rows if r.status == "failed"],
        "infeasible": [r.number for r in rows if r.status == "ok" and not r.feasible],
        "max_epsilon": max((r.epsilon for r in rows if r.epsilon is not None), default=None),
        "best": asdict(best) if best else None,
        "best_constant": asdict(constant) if constant else None,
        "best_non_constant": asdict(challenger) if challenger else None,
        "best_is_constant": bool(best and best.schedule == "constant"),
        "val_acc_gain_over_constant": _gain(best, constant, "val_acc"),
        "test_acc_gain_over_constant": _gain(best, constant, "test_acc"),
        "non_constant_val_acc_gain": _gain(challenger, constant, "val_acc"),
        "non_constant_test_acc_gain": _gain(challenger, constant, "test_acc"),
        "best_per_shape": {shape: asdict(b) for shape in SHAPES
                           if (b := _best([r for r in rows if r.schedule == shape])) is not None},
        "optuna": _optuna(run_dir, rows),
        "rerun_commands": {key: _rerun_command(r, target, epochs)
                           for key, r in (("best_non_constant", challenger), ("constant", constant)) if r is not None},
    }
    if seed_runs:
        seed_rows = [load_trial(job, tolerance) for directory in seed_runs for job in job_dirs(Path(directory))]
        seeds_challenger = seed_statistics(seed_rows, challenger) if challenger else None
        seeds_constant = seed_statistics(seed_rows, constant) if constant else None
        summary["seeds"] = {"runs": [str(d) for d in seed_runs], "best_non_constant": seeds_challenger,
                            "constant": seeds_constant,
                            "val_acc_gain": _difference(seeds_challenger, seeds_constant, "val_acc"),
                            "test_acc_gain": _difference(seeds_challenger, seeds_constant, "test_acc"),
                            "paired": _paired(seed_rows, challenger, constant) if challenger and constant else None,
                            "rows": [asdict(r) for r in seed_rows]}
    out.mkdir(parents=True, exist_ok=True)
    write_trials(rows, out)
    (out / f"{NAME}.json").write_text(json.dumps(summary, indent=2, default=str))
    if plot:
        summary["figure"] = str(plot_search(rows, best, constant, challenger, summary, out / f"{NAME}.png"))
        (out / f"{NAME}.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def write_trials(rows: list[TrialResult], out: Path) -> Path:
    path = out / f"{NAME}_trials.csv"
    fields = list(asdict(rows[0]))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out / f"{NAME}_trials.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    return path


def _curve(row: TrialResult, key: str) -> tuple[list[int], list[float]]:
    points = json.loads((Path(row.path) / SUMMARY_FILE).read_text()).get("points", [])
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
    for shape in SHAPES:
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


def _print(summary: dict[str, Any]) -> None:
    def describe(row: dict | None) -> str:
        if not row:
            return "—"
        return (f"trial {row['number']} {row['label']} lr {row['lr']:g}: val acc {row['val_acc']:.4f}, "
                f"test acc {row['test_acc']:.4f}, ε {row['epsilon']:.4g}")

    print(f"{summary['trials']} trials ({summary['distinct_configurations']} distinct) at target ε "
          f"{summary['target_epsilon']}; failed {summary['failed']}, infeasible {summary['infeasible']}, "
          f"max ε {summary['max_epsilon']}")
    print(f"best feasible:      {describe(summary['best'])}")
    print(f"best constant:      {describe(summary['best_constant'])}")
    print(f"best non-constant:  {describe(summary['best_non_constant'])}")
    if summary["val_acc_gain_over_constant"] is not None:
        print(f"best over constant at the same ε: val acc {summary['val_acc_gain_over_constant']:+.4f}, "
              f"test acc {summary['test_acc_gain_over_constant']:+.4f} (search seed)")
    if summary["non_constant_val_acc_gain"] is not None:
        print(f"best non-constant over constant: val acc {summary['non_constant_val_acc_gain']:+.4f}, "
              f"test acc {summary['non_constant_test_acc_gain']:+.4f} (search seed)")
    seeds = summary.get("seeds")
    if seeds and seeds.get("best_non_constant") and seeds.get("constant"):
        for key in ("best_non_constant", "constant"):
            s = seeds[key]
            print(f"seeds {s['seeds']} {key}: val acc {s['val_acc']['mean']:.4f} ± {s['val_acc']['std'] or 0:.4f}, "
                  f"test acc {s['test_acc']['mean']:.4f} ± {s['test_acc']['std'] or 0:.4f}, "
                  f"max ε {s['max_epsilon']:.4g}")
        print(f"non-constant over constant, mean over seeds: val {seeds['val_acc_gain']:+.4f}, "
              f"test {seeds['test_acc_gain']:+.4f}")
        paired = seeds.get("paired")
        if paired:
            print(f"paired by seed (mean ± std of the differences): val {paired['val_acc']['mean']:+.4f} ± "
                  f"{paired['val_acc']['std']:.4f}, test {paired['test_acc']['mean']:+.4f} ± "
                  f"{paired['test_acc']['std']:.4f}")
    for key, command in summary["rerun_commands"].items():
        print(f"rerun {key} on fresh seeds: {command}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a schedule_search multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: run_dir)")
    parser.add_argument("--seeds", type=Path, nargs="*", default=None,
                        help="multirun directories of hparams_search=schedule_search_seeds (best and constant)")
    args = parser.parse_args(argv)
    summary = analyze(args.run_dir, args.out, args.seeds)
    _print(summary)
    print(f"wrote {summary.get('figure')} and {NAME}_trials.csv, {NAME}.json")


if __name__ == "__main__":
    main()
