"""``eigen_directions`` — noise along single singular directions of J (Zhang et al. 2023, §5.1).

With J = U S Vᵀ (sᵢ = √λᵢ, λᵢ the eigenvalues of JJᵀ), noise of norm α along the θ-space right singular
vector vᵢ moves the L2 attacker's reconstruction by I²F(α vᵢ) = α uᵢ / sᵢ: the error α/√λᵢ is largest along
the smallest eigenvalues. Here the released gradient of one probe digit is g₀ ± α vᵢ for directions i spread
log-uniformly over the eigenvalues, from the smallest to the largest, and the real attack's error ‖x̂ − x₀‖
is compared with α/√λᵢ. Reported: Spearman ρ of the error against λ (negative when the claim holds) and
against the prediction, and the median ratio actual/predicted.

The full spectrum of one digit's JJᵀ (d_x = 256 on 16×16 digits) comes from the dense matrix
(:func:`pl_i2f.influence.gram_matrix`, float64); vᵢ = Jᵀuᵢ / sᵢ as in
:func:`pl_i2f.influence.right_singular_vectors`, which returns only the k largest or smallest.
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

NAME = "eigen_directions"


@dataclass
class Config:
    """The study's parameters (``conf/study/eigen_directions.yaml`` holds the same keys)."""

    samples: int = 2  #: probe digits, each its own private input
    directions: int = 10  #: eigen-directions per sample, log-uniform in λ from the smallest to the largest
    alpha: float = 0.01  #: norm of the noise α (the released gradient is g₀ ± α vᵢ, both signs)
    signs: int = 2  #: 1: +α only; 2: +α and −α
    #: skip eigenvalues below this fraction of λ_max (numerically zero: no singular vector to follow)
    min_relative_eigenvalue: float = 1e-10
    model: dict[str, Any] = field(default_factory=lambda: {"init": "uniform", "epochs": 0})
    attacks: dict[str, Any] = field(default_factory=lambda: {"dlg": {"iterations": 300}})
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits", "size": 16})
    workers: int = 2
    seed: int = 0


#: What ``smoke=True`` changes: 8x8 digits, few directions, tiny budget, one process.
SMOKE: dict[str, Any] = {
    "samples": 1,
    "directions": 4,
    "attacks": {"dlg": {"iterations": 25}},
    "data": {"name": "digits", "size": 8},
    "workers": 1,
}


def make_config(smoke: bool = False, **params: Any) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **params})


def pick_directions(eigenvalues: torch.Tensor, count: int, min_relative: float) -> list[int]:
    """Indices (into ascending ``eigenvalues``) of ``count`` eigenvalues spread log-uniformly from the
    smallest usable one to the largest, without repeats."""
    lam = eigenvalues.double()
    usable = torch.nonzero(lam > min_relative * lam[-1]).flatten()
    lo, hi = math.log(float(lam[usable[0]])), math.log(float(lam[-1]))
    log_lam = lam[usable].log()
    picked: list[int] = []
    for k in range(count):
        target = lo + (hi - lo) * k / max(count - 1, 1)
        order = torch.argsort((log_lam - target).abs())
        for j in order.tolist():
            index = int(usable[j])
            if index not in picked:
                picked.append(index)
                break
    return sorted(picked)


def _unit(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """All directions of one probe sample (runs in a worker process)."""
    model = build_model(**payload["build"])
    model.load_state_dict(payload["state"])
    model.eval()
    x0, y0 = payload["x0"], payload["y0"]
    op = influence.GradientJacobian(float64_copy(model), x0.double(), y0)
    lam, U = torch.linalg.eigh(influence.gram_matrix(op))
    picked = pick_directions(lam, payload["directions"], payload["min_relative_eigenvalue"])
    s = lam[picked].sqrt()
    V = op.rmatvec_batch(U[:, picked].T) / s.unsqueeze(1)  # right singular vectors vᵢ = Jᵀuᵢ / sᵢ
    g0 = flat_gradient(model, x0, y0).detach()
    alpha = payload["alpha"]
    rows = []
    for attack_name, attack in payload["attacks"].items():
        for rank, (index, v) in enumerate(zip(picked, V)):
            for sign in (1.0, -1.0)[: payload["signs"]]:
                released = g0 + (sign * alpha * v).to(g0.dtype)
                measured = attack_error(model, released, x0, y0, attack, payload["stats"], seed=payload["seed"])
                rows.append({
                    **payload["meta"], "attack": attack_name, "direction": rank, "eigen_index": index,
                    "eigenvalue": float(lam[index]), "lambda_max": float(lam[-1]), "sign": sign, "alpha": alpha,
                    "v_norm": float(v.norm()), "predicted": alpha / float(s[rank]), **measured,
                })
    return rows


def run(out_dir: str | Path, smoke: bool = False, **params: Any) -> StudyResult:
    """Run the study, write ``eigen_directions.{csv,json}`` and its figure into ``out_dir``."""
    start = time.perf_counter()
    config = make_config(smoke, **params)
    out_dir = Path(out_dir)
    dm = build_datamodule(**config.data)
    x, y = dm.probe_batch(config.samples)
    model, info = probe_model(dm, **{"seed": config.seed, **config.model})
    build = {"name": info["model"], "input_shape": dm.input_shape, "num_classes": dm.num_classes, "init": "default"}
    attacks = {name: AttackSpec.parse(name, spec) for name, spec in config.attacks.items()}
    units = [{
        "build": build, "state": {k: v.clone() for k, v in model.state_dict().items()}, "x0": x[i : i + 1],
        "y0": y[i : i + 1], "directions": config.directions, "alpha": config.alpha, "signs": config.signs,
        "min_relative_eigenvalue": config.min_relative_eigenvalue, "attacks": attacks, "stats": (dm.mean, dm.std),
        "seed": config.seed, "meta": {"sample": i, "label": int(y[i]), "val_acc": info["val_acc"]},
    } for i in range(len(y))]
    return run_study_units(NAME, _unit, units, config, smoke, out_dir, start, analyse, plot, model=info)


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per attack: Spearman ρ of the error against λ (over all samples, directions and signs, and per
    sample), against α/√λ, and the median ratio actual/predicted."""
    by_attack: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in records:
        by_attack[row["attack"]].append(row)
    out: dict[str, Any] = {"attacks": {}}
    for attack, rows in sorted(by_attack.items()):
        per_sample = {}
        for sample in sorted({r["sample"] for r in rows}):
            mine = [r for r in rows if r["sample"] == sample]
            per_sample[str(sample)] = spearman([r["eigenvalue"] for r in mine], [r["error"] for r in mine])
        ratios = [r["error"] / r["predicted"] for r in rows]
        out["attacks"][attack] = {
            "points": len(rows),
            "rho_error_vs_eigenvalue": spearman([r["eigenvalue"] for r in rows], [r["error"] for r in rows]),
            "rho_error_vs_eigenvalue_per_sample": per_sample,
            "rho_error_vs_prediction": spearman([r["predicted"] for r in rows], [r["error"] for r in rows]),
            "median_ratio": median(ratios),
            "median_abs_ratio_minus_1": median(abs(v - 1) for v in ratios),
            "error_falls_as_eigenvalue_grows": bool(
                spearman([r["eigenvalue"] for r in rows], [r["error"] for r in rows]) < 0),
        }
    return out


def plot(records: list[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Attack error and α/√λ against λ (log-log), one panel per attack; ratio actual/predicted below."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, len(attacks), figsize=(5.6 * len(attacks), 7.0), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for j, attack in enumerate(attacks):
        top, bottom = axes[0][j], axes[1][j]
        rows = [r for r in records if r["attack"] == attack]
        for k, sample in enumerate(sorted({r["sample"] for r in rows})):
            mine = sorted((r for r in rows if r["sample"] == sample), key=lambda r: r["eigenvalue"])
            colour = colours(k % 10)
            lam = [r["eigenvalue"] for r in mine]
            top.plot(lam, [r["error"] for r in mine], "o", ms=4, color=colour,
                     label=f"attack, sample {sample} (digit {mine[0]['label']})")
            top.plot(lam, [r["predicted"] for r in mine], "-", lw=1, color=colour,
                     label=f"prediction α/√λ, sample {sample}")
            bottom.plot(lam, [r["error"] / r["predicted"] for r in mine], "o", ms=4, color=colour)
        stats = summary.get("attacks", {}).get(attack, {})
        rho = stats.get("rho_error_vs_eigenvalue")
        alpha = rows[0]["alpha"] if rows else math.nan
        top.set_title(f"{attack}: noise ‖δ‖ = α = {alpha:g} along one singular direction"
                      + (f"\nSpearman ρ(error, λ) = {rho:.2f}" if rho is not None else ""), fontsize=10)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        top.set_yscale("log")  # errors span decades; the ratio stays near 1 (linear axis)
        top.set_ylabel("reconstruction error ‖x̂ − x₀‖ (normalised input units)")
        top.legend(fontsize=6)
        bottom.axhline(1.0, color="k", lw=0.8)
        bottom.set_xlabel("eigenvalue λ of JJᵀ along the noise direction")
        bottom.set_ylabel("attack error / (α/√λ)")
    fig.suptitle("Noise along small-eigenvalue directions protects the most")
    return [save_figure(fig, out_dir / f"{NAME}.png")]
