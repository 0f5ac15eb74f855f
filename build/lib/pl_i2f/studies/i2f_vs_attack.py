"""``i2f_vs_attack`` — does I²F predict the real attack? (the paper's central claim, Zhang et al. 2023, §4)

For held-out probe digits of an untrained and a trained ``lenet_zhu``, each digit alone is the private input
x₀ (batch size 1, labels known). Its clean gradient g₀ is released with Gaussian noise, g = g₀ + σ z with
z ~ N(0, I) drawn from a seeded generator (what the ``gaussian`` defense adds), on a log grid of σ. The real
attacks (DLG and Inverting Gradients, explicit iteration budgets) invert **that** g, and their error
‖x̂ − x₀‖ (model input space) is compared with the predictions for **that** δ = σ z:

* ``undamped``          ‖(JJᵀ)⁻¹ J δ‖ (I²F with ε = 0, float64);
* ``monitor``           ‖(JJᵀ + εI)⁻¹ J δ‖ with the leakage monitor's default ε = 0.01 · median λ_max of the
                        model's probes (``relative_damping``);
* ``paper``             the same with the paper's ε = 1;
* ``lower_bound``       ‖J δ‖ / λ_max, the quantity the paper plots;
* ``monitor_expected``  √E‖I²F‖² over the noise at the monitor's ε (what the monitor logs; not per draw).

I²F is linear in δ, so each prediction is σ times the prediction for z: one solve per sample and draw
serves the whole grid. The attack's error at σ = 0 (its own convergence floor) is measured too.

Reported per model and attack: Spearman ρ across σ per sample, ρ across samples at each fixed σ, the median
of actual/predicted, for each predictor; for the across-sample ranking also the baselines a user has without
I²F: the gradient norm ‖g₀‖ and 1/λ_max.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pl_i2f import influence
from pl_i2f.data import build_datamodule
from pl_i2f.gradients import flat_gradient
from pl_i2f.models import build_model
from pl_i2f.studies.common import (
    AttackSpec,
    StudyResult,
    attack_error,
    float64_copy,
    median,
    probe_model,
    run_study_units,
)
from pl_i2f.studies.figures import pyplot, save_figure
from pl_i2f.studies.stats import spearman

NAME = "i2f_vs_attack"
PREDICTORS = ("undamped", "monitor", "paper", "lower_bound", "monitor_expected")
BASELINES = ("grad_norm", "inv_lambda_max")
PREDICTOR_LABELS = {
    "undamped": "I²F, ε = 0",
    "monitor": "I²F, monitor ε = 0.01·median λ_max",
    "paper": "I²F, paper ε = 1",
    "lower_bound": "lower bound ‖Jδ‖/λ_max",
    "monitor_expected": "expected I²F, monitor ε",
    "grad_norm": "baseline ‖g₀‖",
    "inv_lambda_max": "baseline 1/λ_max",
}
RESOLVED_FACTOR = 3.0  # a point is "resolved" when the attack's error is >= 3x its own error at σ = 0


@dataclass
class Config:
    """The study's parameters (``conf/study/i2f_vs_attack.yaml`` holds the same keys)."""

    samples: int = 5  #: probe digits per model (held-out, fixed by the datamodule's seed)
    sigma_min: float = 3e-5  #: smallest σ of the log grid (absolute std per gradient coordinate)
    sigma_max: float = 3e-2
    num_sigmas: int = 8
    draws: int = 1  #: noise draws z per sample (each attacked at every σ)
    floor: bool = True  #: also attack the clean gradient (σ = 0): the attack's own error floor
    #: model variants: name → probe_model kwargs (init, epochs, lr, seed)
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "untrained": {"init": "uniform", "epochs": 0},
        "trained": {"init": "xavier_uniform", "epochs": 10, "lr": 1e-3},
    })
    #: attacks: name → {preset, iterations, other invert overrides} (or just an iteration count)
    attacks: dict[str, Any] = field(default_factory=lambda: {
        "dlg": {"iterations": 300},
        "inverting_gradients": {"iterations": 150},
    })
    relative_damping: float = 0.01  #: the monitor's default (conf/callbacks/default.yaml)
    paper_damping: float = 1.0
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits", "size": 16})
    workers: int = 2  #: processes for the attacks (one torch thread each)
    seed: int = 0


#: What ``smoke=True`` changes: seconds instead of minutes (8x8 digits, tiny budgets, one process).
SMOKE: dict[str, Any] = {
    "samples": 3,
    "num_sigmas": 3,
    "sigma_min": 1e-4,
    "sigma_max": 1e-2,
    "models": {"untrained": {"init": "uniform", "epochs": 0}, "trained": {"init": "xavier_uniform", "epochs": 1}},
    "attacks": {"dlg": {"iterations": 40}, "inverting_gradients": {"iterations": 15}},
    "data": {"name": "digits", "size": 8},
    "workers": 1,
}


def make_config(smoke: bool = False, **params: Any) -> Config:
    """The defaults, then the smoke settings (when ``smoke``), then ``params``."""
    return Config(**{**(SMOKE if smoke else {}), **params})


def sigma_grid(config: Config) -> list[float]:
    lo, hi, n = math.log10(config.sigma_min), math.log10(config.sigma_max), int(config.num_sigmas)
    return [10 ** (lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


# --- the work of one (model, sample) ------------------------------------------------------------------


def _predictions(model64: torch.nn.Module, x0: torch.Tensor, y0: torch.Tensor, draws: list[torch.Tensor],
                 eps_monitor: float, eps_paper: float) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-draw predictions for unit noise z (σ = 1) and the sample's spectrum facts."""
    op = influence.GradientJacobian(model64, x0.double(), y0)
    lam = torch.linalg.eigvalsh(influence.gram_matrix(op))
    lam_max = influence.top_eigenvalue(op)
    facts = {
        "lambda_max": float(lam_max),
        "lambda_min": float(lam[0]),
        "grad_norm": float(op.gradient.norm()),
        "monitor_expected_unit": float(influence.expected_i2f(op, noise_std=1.0, damping=eps_monitor).value),
    }
    per_draw = []
    for z in draws:
        undamped = influence.i2f(op, z)
        per_draw.append({
            "undamped": undamped.norm,
            "undamped_damping_used": undamped.damping,
            "monitor": influence.i2f(op, z, damping=eps_monitor).norm,
            "paper": influence.i2f(op, z, damping=eps_paper).norm,
            "lower_bound": float(influence.i2f_lower_bound(op, z, lambda_max=lam_max)),
        })
    return per_draw, facts


def _unit(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Predictions and attacks for one probe sample of one model (runs in a worker process)."""
    import warnings

    model = build_model(**payload["build"])
    model.load_state_dict(payload["state"])
    model.eval()
    x0, y0 = payload["x0"], payload["y0"]
    gen = torch.Generator().manual_seed(payload["noise_seed"])
    d_theta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    draws = [torch.randn(d_theta, generator=gen, dtype=torch.float64) for _ in range(payload["draws"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", influence.InfluenceWarning)  # the fallback ε is recorded instead
        per_draw, facts = _predictions(float64_copy(model), x0, y0, draws, payload["eps_monitor"],
                                       payload["eps_paper"])
    g0 = flat_gradient(model, x0, y0).detach()
    rows = []
    for attack_name, attack in payload["attacks"].items():
        for draw, (z, pred) in enumerate(zip(draws, per_draw)):
            for sigma in payload["sigmas"]:
                if sigma == 0 and draw > 0:
                    continue  # the floor does not depend on the draw
                released = g0 + sigma * z.to(g0.dtype)
                measured = attack_error(model, released, x0, y0, attack, payload["stats"], seed=payload["attack_seed"])
                row = {
                    **payload["meta"], "attack": attack_name, "draw": draw, "sigma": sigma, **measured,
                    **{f"pred_{p}": sigma * pred[p] for p in ("undamped", "monitor", "paper", "lower_bound")},
                    "pred_monitor_expected": sigma * facts["monitor_expected_unit"],
                    "undamped_damping_used": pred["undamped_damping_used"],
                    "lambda_max": facts["lambda_max"], "lambda_min": facts["lambda_min"],
                    "grad_norm": facts["grad_norm"], "inv_lambda_max": 1.0 / facts["lambda_max"],
                    "eps_monitor": payload["eps_monitor"], "eps_paper": payload["eps_paper"],
                }
                rows.append(row)
    return rows


# --- the study ------------------------------------------------------------------------------------------


def run(out_dir: str | Path, smoke: bool = False, **params: Any) -> StudyResult:
    """Run the study, write ``i2f_vs_attack.{csv,json}`` and its figures into ``out_dir``."""
    start = time.perf_counter()
    config = make_config(smoke, **params)
    out_dir = Path(out_dir)
    dm = build_datamodule(**config.data)
    x, y = dm.probe_batch(config.samples)
    sigmas = ([0.0] if config.floor else []) + sigma_grid(config)
    attacks = {name: AttackSpec.parse(name, spec) for name, spec in config.attacks.items()}
    units, models_info = [], {}
    for m_index, (model_name, spec) in enumerate(config.models.items()):
        spec = {"seed": config.seed, **spec}
        model, info = probe_model(dm, **spec)
        models_info[model_name] = info
        model64 = float64_copy(model)
        lam_max = [float(influence.top_eigenvalue(influence.GradientJacobian(model64, x[i : i + 1].double(),
                                                                              y[i : i + 1])))
                   for i in range(len(y))]
        eps_monitor = config.relative_damping * median(lam_max)  # the monitor's rule: one ε for the probes
        build = {"name": info["model"], "input_shape": dm.input_shape, "num_classes": dm.num_classes,
                 "init": "default"}
        for i in range(len(y)):
            units.append({
                "build": build, "state": {k: v.clone() for k, v in model.state_dict().items()},
                "x0": x[i : i + 1], "y0": y[i : i + 1], "draws": config.draws, "sigmas": sigmas,
                "noise_seed": config.seed * 1_000_003 + m_index * 1_000 + i, "attack_seed": config.seed,
                "eps_monitor": eps_monitor, "eps_paper": config.paper_damping, "attacks": attacks,
                "stats": (dm.mean, dm.std),
                "meta": {"model": model_name, "init": info["init"], "epochs": info["epochs"],
                         "val_acc": info["val_acc"], "sample": i, "label": int(y[i])},
            })
    return run_study_units(NAME, _unit, units, config, smoke, out_dir, start, analyse, plot, models=models_info)


# --- analysis ---------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank correlations and ratios per model, attack and predictor (see the module docstring)."""
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in records:
        by_case[(row["model"], row["attack"])].append(row)
    out: dict[str, Any] = {"cases": {}}
    for (model, attack), rows in sorted(by_case.items()):
        floors = {r["sample"]: r["error"] for r in rows if r["sigma"] == 0}
        noisy = [r for r in rows if r["sigma"] > 0]
        samples = sorted({r["sample"] for r in noisy})
        sigmas = sorted({r["sigma"] for r in noisy})

        def cell(sample: int, sigma: float, key: str, noisy=noisy) -> float:
            return _mean([r[key] for r in noisy if r["sample"] == sample and r["sigma"] == sigma])

        resolved = [r for r in noisy
                    if r["sample"] not in floors or r["error"] >= RESOLVED_FACTOR * floors[r["sample"]]]
        case: dict[str, Any] = {
            "samples": len(samples), "sigmas": sigmas, "points": len(noisy), "resolved_points": len(resolved),
            "floor_error": {str(s): floors[s] for s in sorted(floors)},
            "floor_error_median": median(floors.values()),
            "failed_attacks": sum(bool(r["attack_failed"]) for r in rows),
            "predictors": {},
            "baselines": {},
        }
        for p in PREDICTORS:
            key = f"pred_{p}"
            rho_sigma = {str(s): spearman([cell(s, g, "error") for g in sigmas], [cell(s, g, key) for g in sigmas])
                         for s in samples}
            rho_samples = {str(g): spearman([cell(s, g, "error") for s in samples], [cell(s, g, key) for s in samples])
                           for g in sigmas}
            ratios = [r["error"] / r[key] for r in noisy if r[key] > 0]
            ratios_resolved = [r["error"] / r[key] for r in resolved if r[key] > 0]
            case["predictors"][p] = {
                "rho_sigma_per_sample": rho_sigma,
                "rho_sigma_min": min(rho_sigma.values(), default=math.nan),
                "rho_sigma_median": median(rho_sigma.values()),
                "rho_samples_by_sigma": rho_samples,
                "rho_samples_median": median(rho_samples.values()),
                "median_ratio": median(ratios),
                "median_abs_ratio_minus_1": median(abs(v - 1) for v in ratios),
                "median_ratio_resolved": median(ratios_resolved),
                "median_abs_ratio_minus_1_resolved": median(abs(v - 1) for v in ratios_resolved),
            }
        for b in BASELINES:
            rho_samples = {str(g): spearman([cell(s, g, "error") for s in samples], [cell(s, g, b) for s in samples])
                           for g in sigmas}
            case["baselines"][b] = {"rho_samples_by_sigma": rho_samples,
                                    "rho_samples_median": median(rho_samples.values())}
        scored = {p: v["median_abs_ratio_minus_1"] for p, v in case["predictors"].items()
                  if math.isfinite(v["median_abs_ratio_minus_1"])}
        best = min(scored, key=scored.get) if scored else None
        case["best_predictor"] = best
        if best is not None:
            b = case["predictors"][best]
            case["acceptance"] = {
                "rho_sigma_every_sample_ge_0.9": bool(b["rho_sigma_min"] >= 0.9),
                "median_abs_ratio_minus_1_le_0.3": bool(b["median_abs_ratio_minus_1"] <= 0.3),
            }
        out["cases"][f"{model}/{attack}"] = case
    return out


# --- figures ----------------------------------------------------------------------------------------------


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Three figures: error vs σ (attack and undamped I²F per sample), actual/predicted per predictor vs σ,
    and the across-sample rank correlations of every predictor and baseline."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in records))
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    colours = plt.get_cmap("tab10")
    figures = []

    # 1. error vs σ
    fig, axes = plt.subplots(len(models), len(attacks), figsize=(5.2 * len(attacks), 4.0 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            rows = [r for r in records if r["model"] == model and r["attack"] == attack]
            for k, sample in enumerate(sorted({r["sample"] for r in rows})):
                mine = [r for r in rows if r["sample"] == sample]
                sig = sorted({r["sigma"] for r in mine if r["sigma"] > 0})
                err = [_mean([r["error"] for r in mine if r["sigma"] == s]) for s in sig]
                pred = [_mean([r["pred_undamped"] for r in mine if r["sigma"] == s]) for s in sig]
                colour = colours(k % 10)
                label = f"sample {sample} (digit {mine[0]['label']})"
                ax.plot(sig, err, "o", color=colour, ms=4, label=label)
                ax.plot(sig, pred, "--", color=colour, lw=1)
                floor = [r["error"] for r in mine if r["sigma"] == 0]
                if floor:
                    ax.axhline(floor[0], color=colour, lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("gradient noise σ (std per coordinate)")
            ax.set_ylabel("attack error ‖x̂ − x₀‖ (normalised units)")
            acc = rows[0]["val_acc"] if rows else math.nan
            ax.set_title(f"{model} (val acc {acc:.2f}) — {attack}", fontsize=10)
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            handles += [plt.Line2D([], [], color="k", ls="", marker="o", ms=4),
                        plt.Line2D([], [], color="k", ls="--", lw=1), plt.Line2D([], [], color="k", ls=":", lw=0.6)]
            labels += ["attack (markers)", "undamped I²F prediction", "attack at σ = 0 (floor)"]
            ax.legend(handles, labels, fontsize=6, loc="upper left")
    fig.suptitle("I²F vs the real attack: error against gradient noise, per probe digit")
    figures.append(save_figure(fig, out_dir / f"{NAME}_error_vs_sigma.png"))

    # 2. actual / predicted vs σ, median over samples and draws
    fig, axes = plt.subplots(len(models), len(attacks), figsize=(5.2 * len(attacks), 3.8 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            rows = [r for r in records if r["model"] == model and r["attack"] == attack and r["sigma"] > 0]
            sig = sorted({r["sigma"] for r in rows})
            for k, p in enumerate(PREDICTORS):
                med = [median(r["error"] / r[f"pred_{p}"] for r in rows if r["sigma"] == s and r[f"pred_{p}"] > 0)
                       for s in sig]
                ax.plot(sig, med, "o-", color=colours(k), ms=3, label=PREDICTOR_LABELS[p])
            ax.axhspan(0.7, 1.3, color="green", alpha=0.1, label="|ratio − 1| ≤ 0.3")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("gradient noise σ (std per coordinate)")
            ax.set_ylabel("attack error / predicted error (median)")
            ax.set_title(f"{model} — {attack}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("How far each predictor is from the real attack (1 = exact)")
    figures.append(save_figure(fig, out_dir / f"{NAME}_ratio.png"))

    # 3. across-sample ranking
    keys = [*PREDICTORS, *BASELINES]
    cases = summary.get("cases", {})
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.6), squeeze=False)
    width = 0.8 / max(len(attacks), 1)
    for i, model in enumerate(models):
        ax = axes[0][i]
        for j, attack in enumerate(attacks):
            case = cases.get(f"{model}/{attack}", {})
            values = [(case.get("predictors", {}) | case.get("baselines", {})).get(k, {}).get("rho_samples_median",
                                                                                                math.nan)
                      for k in keys]
            ax.bar([x + j * width for x in range(len(keys))], [0 if v is None else v for v in values], width,
                   label=attack, color=colours(j))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks([x + width * (len(attacks) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels([PREDICTOR_LABELS[k] for k in keys], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("Spearman ρ across samples\n(median over σ)")
        n = cases.get(f"{model}/{attacks[0]}", {}).get("samples", "?") if attacks else "?"
        ax.set_title(f"{model}: which samples leak most? ({n} samples)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("Ranking samples' vulnerability: predictors vs cheap baselines")
    figures.append(save_figure(fig, out_dir / f"{NAME}_rank.png"))
    return figures
