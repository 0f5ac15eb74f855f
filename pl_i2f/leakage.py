"""What the leakage monitor and the attack audit measure: I²F under a defense's own noise, per sample.

Each probe sample is its own private input x₀ (batch size 1, the attacker's best case and the paper's
per-sample analysis), so the numbers compare directly with an attack on one sample's released gradient.
The noise is the defense's at the given step:

* isotropic Gaussian (``defense.noise_std(step)``: Gaussian, DP-SGD's σC/B after clipping) → the exact
  isotropic formula E‖I²F‖² = σ² Σ λᵢ/(λᵢ+ε)²;
* any other noise (``defense.noise_sampler(step)``: anisotropic …) → Monte Carlo over its draws;
* no noise (``none``, ``pruning``) → σ = 1: leakage **per unit of noise**, so runs stay comparable.

Scales: ``expected_i2f`` is ‖I²F‖ in the model's (normalised) input space; ``…_rmse`` divides by √d_x;
``…_pixel_rmse`` multiplies that by the datamodule's std, the [0, 1]-pixel RMSE an attack's metrics report
(exact for one channel or equal channel stds; the mean std otherwise).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pl_i2f.defenses import Defense, NoiseSampler
from pl_i2f.defenses.base import analysis_model
from pl_i2f.influence import PerSampleLeakage, per_sample_leakage, per_sample_product_seconds

# Lanczos steps of a typical per-sample evaluation (λ_max to 1e-4 and settled quadratures): 6-25 measured on
# lenet_zhu and resnet18; the first prediction of a run uses this, later ones the measured cost.
TYPICAL_LANCZOS_STEPS = 12
LANCZOS_CHAINS = 4  # Lanczos chains per probe sample in measure_leakage (and what estimate_leakage_seconds times)


@dataclass
class NoiseModel:
    """The perturbation the estimator assumes: isotropic ``std`` or a ``sampler``; ``per_unit`` when the
    defense adds no noise and σ = 1 stands in."""

    std: float | None
    sampler: NoiseSampler | None
    per_unit: bool

    @classmethod
    def of(cls, defense: Defense, step: int, model: nn.Module) -> NoiseModel:
        std = defense.noise_std(step)
        if std is not None and std > 0:
            return cls(std=float(std), sampler=None, per_unit=False)
        sampler = defense.noise_sampler(step, model)
        if sampler is not None and (std is None or std > 0):
            return cls(std=None, sampler=sampler, per_unit=False)
        return cls(std=1.0, sampler=None, per_unit=True)


@dataclass
class LeakageReport:
    """Per-sample leakage of a probe batch and its summaries (see the module docstring for scales)."""

    per_sample: PerSampleLeakage
    labels: Tensor
    pixel_std: float
    noise: NoiseModel
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    per_class: dict[int, float] = field(default_factory=dict)
    worst: list[tuple[int, float]] = field(default_factory=list)

    @property
    def pixel_rmse(self) -> Tensor:
        """Per-sample expected reconstruction RMSE on the [0, 1] pixel scale."""
        return self.per_sample.expected_i2f_rmse * self.pixel_std


def unfairness(values: Tensor) -> dict[str, float]:
    """How unequally a noise level protects samples: the 90th/10th percentile ratio and the coefficient of
    variation of their expected reconstruction errors (1 and 0 for perfectly equal protection)."""
    v = values.double()
    p10, p90 = torch.quantile(v, 0.1), torch.quantile(v, 0.9)
    mean = v.mean()
    return {
        "unfairness_p90_p10": float(p90 / p10) if p10 > 0 else math.inf,
        "unfairness_cv": float(v.std() / mean) if len(v) > 1 and mean > 0 else 0.0,
    }


def measure_leakage(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defense: Defense,
    step: int,
    *,
    pixel_std: float = 1.0,
    damping: float = 0.0,
    relative_damping: float = 0.01,
    method: str = "slq",
    spectrum_samples: int = 4,
    exact_max_dim: int = 1024,
    worst_k: int = 5,
    samples: int = 32,
    generator: torch.Generator | None = None,
    noise: NoiseModel | None = None,
) -> LeakageReport:
    """Per-sample I²F leakage of ``(x, y)`` under ``defense``'s noise at ``step``. Never changes ``model``.

    ``method="slq"`` (default): λ_max by Lanczos and the traces by stochastic Lanczos quadrature, ~7x cheaper
    than ``"exact"``, which forms every sample's JJᵀ (d_x products each). λ_min and the condition number
    need the exact spectrum: with ``"slq"`` they come from the first ``spectrum_samples`` samples only
    (0: skip them), and only for inputs of at most ``exact_max_dim`` values (d_x products per sample). The
    damping is ε = ``damping`` + ``relative_damping``·median λ_max (scale-free; see
    :func:`pl_i2f.influence.per_sample_leakage`); the ε used is logged as ``damping``. ``noise`` overrides
    the defense's noise at ``step`` (a :class:`NoiseModel` captured earlier, with a snapshot of the weights).
    """
    model = analysis_model(model)
    noise = NoiseModel.of(defense, step, model) if noise is None else noise
    result = per_sample_leakage(
        model, x, y,
        noise_std=noise.std, noise_sampler=noise.sampler, damping=damping, relative_damping=relative_damping,
        method=method, noise_draws=samples, probes=LANCZOS_CHAINS, generator=generator,
    )
    report = LeakageReport(per_sample=result, labels=y.detach().cpu(), pixel_std=pixel_std, noise=noise, step=step)
    pixel = report.pixel_rmse.detach().double().cpu()
    scalars = {
        "expected_i2f": float(result.expected_i2f.mean()),
        "expected_i2f_rmse": float(result.expected_i2f_rmse.mean()),
        "expected_i2f_pixel_rmse": float(pixel.mean()),
        "lower_bound": float(result.lower_bound.mean()),
        "lambda_max": float(result.lambda_max.mean()),
        "noise_std": noise.std if noise.std is not None else float("nan"),
        "per_unit_noise": float(noise.per_unit),
        "converged_fraction": float(result.converged.double().mean()),
        "damping": float(result.damping),
    }
    spectra = result
    # an exact spectrum costs d_x products per sample: affordable for digits (256), not for CIFAR (3,072)
    if result.lambda_min is None and spectrum_samples > 0 and x[0].numel() <= exact_max_dim:
        k = min(spectrum_samples, len(y))
        spectra = per_sample_leakage(model, x[:k], y[:k], method="exact", expected=False, generator=generator)
    if spectra.lambda_min is not None:
        lam_min = spectra.lambda_min.double().clamp_min(0)
        scalars["lambda_min"] = float(lam_min.mean())
        scalars["condition_number"] = float((spectra.lambda_max.double() / lam_min).median())
    scalars.update(unfairness(pixel))
    order = torch.argsort(pixel, descending=True)[: max(0, worst_k)]
    report.worst = [(int(i), float(pixel[i])) for i in order]
    if report.worst:
        scalars["worst_k_pixel_rmse"] = float(pixel[order].mean())
    report.per_class = {
        int(c): float(pixel[report.labels == c].mean()) for c in torch.unique(report.labels).tolist()
    }
    # never report NaN/inf (a non-isotropic noise has no single std; λ_min = 0 has no condition number)
    report.scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
    return report




class LeakageCost(NamedTuple):
    """A prediction of :func:`estimate_leakage_seconds`: ``seconds`` predicted, ``calibration_seconds`` spent
    predicting, and ``extrapolated`` — True when the batched product was too dear to time in full, so
    ``seconds`` is an upper estimate (it assumes no further speed-up from vmap)."""

    seconds: float
    calibration_seconds: float
    extrapolated: bool


@functools.cache
def _warm_up_transforms() -> None:
    """torch.func's one-off set-up (~0.2 s per process) on a two-parameter model, so that it does not count as
    the cost of a product in :func:`estimate_leakage_seconds`."""
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    per_sample_product_seconds(tiny, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def estimate_leakage_seconds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    spectrum_samples: int = 4,
    exact_max_dim: int = 1024,
    steps: int = TYPICAL_LANCZOS_STEPS,
    affordable: float = math.inf,
) -> LeakageCost:
    """Predicted wall time of :func:`measure_leakage` on ``(x, y)`` (method ``"slq"``) without running it.

    A Lanczos step is one batched product (every sample × 4 chains); the prediction is ``steps`` of them, plus
    the exact spectra of ``spectrum_samples`` samples (d_x products each) when inputs have at most
    ``exact_max_dim`` values. The batched product is timed on growing sub-batches — 1 sample × 1 vector,
    1 × 4, 4 × 4, 16 × 4, all — and extrapolated linearly from the largest one timed. A sub-batch is timed
    only if that extrapolation from the previous one stays within ``affordable`` seconds, so calibrating a
    compute-bound model costs about one product (resnet18: ~0.4 s per vector, no gain from vmap) while a
    small one gets its real vmap speed-up measured (lenet_zhu: 32 × 4 vectors in 60 ms, one vector 20 ms)."""
    model = analysis_model(model)
    started = time.perf_counter()
    _warm_up_transforms()
    n_samples, d_x = x.shape[0], x[0].numel()
    units_all = n_samples * LANCZOS_CHAINS
    sizes = [(1, 1), (1, 1), (1, LANCZOS_CHAINS), *((k, LANCZOS_CHAINS) for k in (4, 16) if k < n_samples),
             (n_samples, LANCZOS_CHAINS)]  # (1, 1) twice: the first call of a process is a warm-up
    measured: tuple[float, int] | None = None
    for k, chains in sizes:
        k = min(k, n_samples)
        if measured is not None and measured[0] * k * chains / measured[1] > affordable:
            break
        measured = (per_sample_product_seconds(model, x[:k], y[:k], chains), k * chains)
    assert measured is not None
    step = measured[0] * units_all / measured[1]
    predicted = steps * step
    if spectrum_samples > 0 and d_x <= exact_max_dim:
        predicted += step * min(spectrum_samples, n_samples) * d_x / units_all
    return LeakageCost(predicted, time.perf_counter() - started, measured[1] < units_all)


def mean_pixel_std(datamodule: object) -> float:
    """The datamodule's per-channel std averaged (1.0 when it has none): normalised → pixel scale."""
    std = getattr(datamodule, "std", None)
    return float(sum(std) / len(std)) if std else 1.0
