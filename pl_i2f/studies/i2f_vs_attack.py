"""``i2f_vs_attack`` — does the headline leakage number predict a real attack, at every noise level?

For held-out probe digits of an untrained and a trained ``lenet_zhu``, each digit alone is the private input x
(labels known) and its gradient is released under the shared threat model (:mod:`pl_i2f.threat`), for two kinds
of noise on a log grid of σ:

* ``gaussian``  g(x) + N(0, σ²I): isotropic noise σ on the sample's own gradient;
* ``dpsgd``     clip_C(g(x)) + N(0, σ²C²I): DP-SGD with noise multiplier σ, C = ``clip_fraction`` × the
                median gradient norm of the model's probes (so that clipping binds).

One noise draw z ~ N(0, I) per sample (seeded) serves every σ of the grid. Compared, per (weights, noise, σ):

* ``headline``     the predicted PSNR of :func:`pl_i2f.calibrated.exact_posteriors` — the expected error of an
                   attacker with the data's Gaussian prior (the monitor's ``leakage/expected_attack_psnr``);
* ``map``          the prior-aware MAP attack (preset ``map``: the same prior and noise, from the data mean);
* ``dlg``, ``inverting_gradients``  the prior-free attacks, started from random noise;
* ``undamped``, ``damped``, ``lower_bound``  the paper's quantities as baselines, expected over the noise for
  the unbiased (no-prior) attacker, from the same (clipped) Gram G = JᵀJ: σ² tr(D G⁻¹ D), the damped
  σ² Σ wₖ λₖ/(λₖ + ε)² (the paper's ε = 1) and the lower bound σ² tr G / λ_max² (E‖Jδ‖²/λ_max²).

PSNRs are pooled over the samples of a setting: 20·log10(1/RMSE) of the mean over samples of the per-sample
[0, 1]-pixel MSE, unclamped (the quantity the estimator predicts); the attacks' clamped PSNR is recorded too and
is the one reported for DLG and Inverting Gradients.
The gap is headline − MAP in dB. Acceptance (per weights): median |gap| ≤ 2 dB and ≥ 80% of settings within 3 dB.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pl_i2f.attacks import invert
from pl_i2f.calibrated import exact_posteriors
from pl_i2f.data import build_datamodule
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.influence.jacobian import per_sample_grams
from pl_i2f.models import build_model
from pl_i2f.prior import DTYPE, GaussianPrior, value_scale
from pl_i2f.studies.common import StudyResult, float64_copy, median, probe_model, run_study_units
from pl_i2f.studies.figures import pyplot, save_figure
from pl_i2f.threat import SampleNoise

NAME = "i2f_vs_attack"
NOISE_KINDS = ("gaussian", "dpsgd")
ATTACKS = ("map", "dlg", "inverting_gradients")
BASELINES = ("undamped", "damped", "lower_bound")
LABELS = {
    "headline": "headline (Gaussian-prior attacker)",
    "map": "prior-aware MAP attack",
    "dlg": "DLG from noise",
    "inverting_gradients": "Inverting Gradients from noise",
    "undamped": "paper: undamped I²F",
    "damped": "paper: damped I²F (ε = 1)",
    "lower_bound": "paper: lower bound ‖Jδ‖/λ_max",
    "prior": "prior (guess the mean)",
}
MEDIAN_GAP_DB = 2.0  #: acceptance: median |headline − MAP| per weights
WITHIN_DB, WITHIN_SHARE = 3.0, 0.8  #: acceptance: this share of settings within this many dB


@dataclass
class Config:
    """The study's parameters (``conf/study/i2f_vs_attack.yaml`` holds the same keys)."""

    samples: int = 4  #: probe digits per model (held-out, fixed by the datamodule's seed)
    sigmas: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    noise: list[str] = field(default_factory=lambda: list(NOISE_KINDS))
    clip_fraction: float = 0.5  #: DP-SGD's C as a fraction of the median probe gradient norm
    #: model variants: name → probe_model kwargs (init, epochs, lr, seed)
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "untrained": {"init": "uniform", "epochs": 0},
        "trained": {"init": "xavier_uniform", "epochs": 10, "lr": 1e-3},
    })
    #: attacks: name → invert overrides (``map`` gets the prior and the noise; the others start from noise)
    attacks: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "map": {"iterations": 60},
        "dlg": {"iterations": 100, "max_evaluations": 1000},
        "inverting_gradients": {"iterations": 300},
    })
    paper_damping: float = 1.0  #: the paper's ε
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits", "size": 16})
    workers: int = 2  #: processes for the attacks (one torch thread each)
    seed: int = 0


#: What ``smoke=True`` changes: seconds instead of minutes (8x8 digits, 2 samples, 2 σ, tiny budgets).
SMOKE: dict[str, Any] = {
    "samples": 2,
    "sigmas": [1e-3, 1e-1],
    "models": {"untrained": {"init": "uniform", "epochs": 0}, "trained": {"init": "xavier_uniform", "epochs": 1}},
    "attacks": {"map": {"iterations": 20}, "dlg": {"iterations": 10, "max_evaluations": 100},
                "inverting_gradients": {"iterations": 20}},
    "data": {"name": "digits", "size": 8},
    "workers": 1,
}


def make_config(smoke: bool = False, **params: Any) -> Config:
    """The defaults, then the smoke settings (when ``smoke``), then ``params``."""
    return Config(**{**(SMOKE if smoke else {}), **params})


def sample_noise(kind: str, sigma: float, clip: float) -> SampleNoise:
    """The noise on one sample's own gradient for a setting (the shared threat model)."""
    if kind == "gaussian":
        return SampleNoise(std=sigma, source="gaussian")
    if kind == "dpsgd":
        return SampleNoise(std=sigma * clip, clip_norm=clip, source="dpsgd")
    raise ConfigError(f"unknown noise kind {kind!r} (one of {', '.join(NOISE_KINDS)})")


def psnr_of_mse(mse: float) -> float:
    """20·log10(1/RMSE) of a [0, 1]-pixel mean squared error."""
    return -10 * math.log10(mse) if mse > 0 else math.inf


# --- the paper's quantities: expected over the noise, for the unbiased attacker ---------------------------


def paper_mses(gram: torch.Tensor, scale: torch.Tensor, std: float, damping: float) -> dict[str, float]:
    """Per-value pixel MSE of the undamped I²F, the damped I²F (ε = ``damping``) and the lower bound under
    isotropic noise ``std`` on the (clipped) gradient whose x-side Gram is ``gram`` (d, d)."""
    lam, u = torch.linalg.eigh(gram.to(DTYPE))
    lam = lam.clamp_min(0)
    w = (scale.to(DTYPE)[:, None] * u).pow(2).sum(0)  # ‖D uₖ‖²
    d, s2 = gram.shape[-1], std ** 2
    undamped = float((w / lam).sum()) if bool((lam > 0).all()) else math.inf
    damped = float((w * lam / (lam + damping) ** 2).sum())
    lower = float(lam.sum() / lam.max() ** 2) * float(scale.to(DTYPE).pow(2).mean())
    return {"undamped": s2 * undamped / d, "damped": s2 * damped / d, "lower_bound": s2 * lower / d}


# --- the work of one (model, noise kind, sample) ----------------------------------------------------------


def _unit(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Predictions and attacks at every σ for one probe sample of one model under one kind of noise."""
    model = build_model(**payload["build"])
    model.load_state_dict(payload["state"])
    model.eval()
    model64 = float64_copy(model)
    x0, y0, kind, clip = payload["x0"], payload["y0"], payload["noise"], payload["clip"]
    prior: GaussianPrior = payload["prior"]
    scale: torch.Tensor = payload["value_scale"]
    shape = tuple(x0.shape[1:])
    gen = torch.Generator().manual_seed(payload["noise_seed"])
    g64 = flat_gradient(model64, x0.double(), y0).detach()
    z = torch.randn(g64.numel(), generator=gen, dtype=DTYPE)
    clipped = g64 * min(1.0, clip / float(g64.norm())) if kind == "dpsgd" else g64
    gram = per_sample_grams(model64, x0.double(), y0, clipping_norm=clip if kind == "dpsgd" else None).grams[0]
    rows = []
    for sigma in payload["sigmas"]:
        noise = sample_noise(kind, sigma, clip)
        released = clipped + noise.std * z
        spectrum = exact_posteriors(model64, x0.double(), y0, noise, prior, value_scale=scale)
        row: dict[str, Any] = {
            **payload["meta"], "noise": kind, "sigma": sigma, "noise_std": noise.std, "clip_norm": clip,
            "grad_norm": float(g64.norm()), "mse_headline": float(spectrum.mse()[0]),
            "mse_prior": float(spectrum.prior_error()[0]) / spectrum.dim,
            **{f"mse_{k}": v for k, v in paper_mses(gram, scale, noise.std, payload["paper_damping"]).items()},
        }
        for name, overrides in payload["attacks"].items():
            if name == "map":
                result = invert(model64, released, y0, shape, preset="map", prior=prior, noise=noise, **overrides)
            else:
                result = invert(model, released.float(), y0, shape, preset=name, seed=payload["attack_seed"],
                                bounds=payload["bounds"], progress=False, **overrides)
            err = (result.x.to(DTYPE) - x0.to(DTYPE)).reshape(-1) * scale
            pixels = payload["mean"] + result.x.to(DTYPE).reshape(-1) * scale
            truth = payload["mean"] + x0.to(DTYPE).reshape(-1) * scale
            row[f"mse_{name}"] = float(err.pow(2).mean())
            row[f"mse_clamped_{name}"] = float((pixels.clamp(0, 1) - truth.clamp(0, 1)).pow(2).mean())
            row[f"converged_{name}"] = bool(result.converged)
            row[f"evaluations_{name}"] = int(result.evaluations)
            row[f"failed_{name}"] = bool(result.failed)
        rows.append(row)
    return rows


# --- the study ------------------------------------------------------------------------------------------


def run(out_dir: str | Path, smoke: bool = False, **params: Any) -> StudyResult:
    """Run the study, write ``i2f_vs_attack.{csv,json}`` and its figures into ``out_dir``."""
    start = time.perf_counter()
    config = make_config(smoke, **params)
    for kind in config.noise:
        sample_noise(kind, 1.0, 1.0)  # an unknown kind: one line before any work
    out_dir = Path(out_dir)
    dm = build_datamodule(**config.data)
    prior = dm.data_prior()
    scale = value_scale(dm.std, dm.input_shape)
    mean = value_scale(dm.mean, dm.input_shape)  # the per-value mean: normalised inputs back to pixels
    x, y = dm.probe_batch(config.samples)
    units, models_info = [], {}
    for m_index, (model_name, spec) in enumerate(config.models.items()):
        model, info = probe_model(dm, **{"seed": config.seed, **spec})
        norms = [float(flat_gradient(model, x[i: i + 1], y[i: i + 1]).norm()) for i in range(len(y))]
        clip = config.clip_fraction * median(norms)
        models_info[model_name] = {**info, "clip_norm": clip, "median_grad_norm": median(norms)}
        build = {"name": info["model"], "input_shape": dm.input_shape, "num_classes": dm.num_classes,
                 "init": "default"}
        for kind in config.noise:
            for i in range(len(y)):
                units.append({
                    "build": build, "state": {k: v.clone() for k, v in model.state_dict().items()},
                    "x0": x[i: i + 1], "y0": y[i: i + 1], "noise": kind, "clip": clip, "sigmas": list(config.sigmas),
                    "noise_seed": config.seed * 1_000_003 + m_index * 1_000 + i, "attack_seed": config.seed,
                    "prior": prior, "value_scale": scale, "mean": mean, "bounds": dm.pixel_bounds(),
                    "attacks": config.attacks, "paper_damping": config.paper_damping,
                    "meta": {"model": model_name, "init": info["init"], "epochs": info["epochs"],
                             "val_acc": info["val_acc"], "sample": i, "label": int(y[i])},
                })
    return run_study_units(NAME, _unit, units, config, smoke, out_dir, start, analyse, plot, models=models_info)


# --- analysis ---------------------------------------------------------------------------------------------


def settings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, noise, σ): pooled PSNRs (mean MSE over the samples) of every predictor and attack,
    the gap headline − MAP and how many MAP attacks converged."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in records:
        groups.setdefault((row["model"], row["noise"], float(row["sigma"])), []).append(row)
    out = []
    for (model, noise, sigma), rows in groups.items():
        setting: dict[str, Any] = {"model": model, "noise": noise, "sigma": sigma, "samples": len(rows),
                                   "noise_std": rows[0]["noise_std"]}
        for key in ("headline", "prior", *BASELINES, *ATTACKS):
            if f"mse_{key}" in rows[0]:
                setting[f"psnr_{key}"] = psnr_of_mse(sum(r[f"mse_{key}"] for r in rows) / len(rows))
        for key in ATTACKS:
            if f"mse_clamped_{key}" in rows[0]:
                setting[f"psnr_clamped_{key}"] = psnr_of_mse(sum(r[f"mse_clamped_{key}"] for r in rows) / len(rows))
                setting[f"converged_{key}"] = sum(bool(r[f"converged_{key}"]) for r in rows)
        if "psnr_map" in setting:
            setting["gap_db"] = setting["psnr_headline"] - setting["psnr_map"]
        out.append(setting)
    return out


def _psnr_key(name: str) -> str:
    """The PSNR a quantity is reported with: clamped to [0, 1] pixels for the prior-free attacks (as an auditor
    would show them: unclamped, DLG's off-image excursions dominate), unclamped for the rest (the estimator's)."""
    return f"psnr_clamped_{name}" if name in ("dlg", "inverting_gradients") else f"psnr_{name}"


def _verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [abs(r["gap_db"]) for r in rows if "gap_db" in r and math.isfinite(r["gap_db"])]
    if not gaps:
        return {"settings": 0}
    within = sum(g <= WITHIN_DB for g in gaps) / len(gaps)
    medians = {k: median(r[_psnr_key(k)] - r["psnr_map"] for r in rows if _psnr_key(k) in r)
               for k in ("headline", *BASELINES, "dlg", "inverting_gradients")}
    return {
        "settings": len(gaps), "median_abs_gap_db": median(gaps), "within_3db_share": within,
        "max_abs_gap_db": max(gaps), "median_minus_map_db": medians,
        "sigma_decades": math.log10(max(r["sigma"] for r in rows) / min(r["sigma"] for r in rows)),
        "acceptance": {"median_abs_gap_le_2db": median(gaps) <= MEDIAN_GAP_DB,
                       "share_within_3db_ge_0.8": within >= WITHIN_SHARE},
    }


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-setting table and, per weights, per weights × noise and overall, the headline's gap to the MAP
    attack (median |gap|, share within 3 dB, acceptance) and every other quantity's median offset from it."""
    table = settings(records)
    models = list(dict.fromkeys(r["model"] for r in table))
    kinds = list(dict.fromkeys(r["noise"] for r in table))
    return {
        "settings": table,
        "by_model": {m: _verdict([r for r in table if r["model"] == m]) for m in models},
        "by_case": {f"{m}/{k}": _verdict([r for r in table if r["model"] == m and r["noise"] == k])
                    for m in models for k in kinds},
        "overall": _verdict(table),
    }


# --- figures ----------------------------------------------------------------------------------------------


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """PSNR against σ per weights × noise kind: the headline (line), the attacks (markers; DLG and Inverting
    Gradients clamped to [0, 1] pixels), the paper's quantities (dashed) and the prior (dotted); the median |gap|
    headline − MAP in the title."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary.get("settings") or settings(records)
    models = list(dict.fromkeys(r["model"] for r in table))
    kinds = list(dict.fromkeys(r["noise"] for r in table))
    fig, axes = plt.subplots(len(models), len(kinds), figsize=(5.4 * len(kinds), 4.2 * len(models)), squeeze=False)
    styles = {"headline": ("-", None, "k"), "map": ("", "o", "tab:red"), "dlg": ("", "x", "tab:purple"),
              "inverting_gradients": ("", "^", "tab:brown"), "undamped": ("--", None, "tab:blue"),
              "damped": ("--", None, "tab:green"), "lower_bound": ("--", None, "tab:orange"),
              "prior": (":", None, "grey")}
    for i, model in enumerate(models):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            rows = sorted((r for r in table if r["model"] == model and r["noise"] == kind), key=lambda r: r["sigma"])
            sig = [r["sigma"] for r in rows]
            for key, (ls, marker, colour) in styles.items():
                values = [r.get(_psnr_key(key), math.nan) for r in rows]
                values = [v if v is not None and math.isfinite(v) else math.nan for v in values]
                ax.plot(sig, values, ls=ls or "none", marker=marker, color=colour, ms=6, lw=1.4, label=LABELS[key])
            ax.set_xscale("log")
            ax.set_xlabel("gradient noise σ (std per coordinate)" if kind == "gaussian"
                          else "DP-SGD noise multiplier σ (noise σC)")
            ax.set_ylabel("PSNR (dB, [0, 1] pixels, pooled over samples)")
            verdict = summary.get("by_case", {}).get(f"{model}/{kind}", {})
            gap = verdict.get("median_abs_gap_db")
            title = f"{model}, {kind}" + (f": median |headline − MAP| {gap:.1f} dB" if gap is not None else "")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Predicted vs real attack PSNR, one sample's released gradient (digits 16×16, lenet_zhu)")
    return [save_figure(fig, out_dir / f"{NAME}.png")]
