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

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pl_i2f.defenses import Defense, NoiseSampler
from pl_i2f.defenses.base import analysis_model
from pl_i2f.influence import PerSampleLeakage, per_sample_leakage
from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS, default_rcond
from pl_i2f.influence.warm import BasisLeakage, basis_leakage, exact_spectra

LANCZOS_CHAINS = 4  # Lanczos chains per probe sample in measure_leakage (full precision)
EXACT_MAX_DIM = 1024  # inputs of at most this many values get exact spectra (d_x products per sample)
DEFAULT_TARGET_PIXEL_RMSE = 0.1  # ≈ 20 dB PSNR: an attacker's reconstruction this far off is a blur


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


def attack_psnr(pixel_rmse: Tensor) -> Tensor:
    """PSNR (dB) of reconstructions with these [0, 1]-pixel RMSEs: 10·log10(1/MSE) (data range 1). A
    reconstruction in [0, 1] is never further than RMSE 1 from the image, so a larger predicted error (the
    linear estimate of an attack that fails outright) scores 0 dB, not a negative PSNR."""
    return -20 * torch.log10(pixel_rmse.double().clamp(1e-30, 1.0))


def sigma_for_target(unit_pixel_rmse: Tensor, target_pixel_rmse: float) -> float:
    """The isotropic Gaussian σ (per gradient coordinate) at which the probes' mean expected pixel RMSE
    reaches ``target_pixel_rmse``. E‖I²F‖ is linear in σ for isotropic noise (the damping does not depend on
    σ), so σ* = target / (mean expected pixel RMSE at σ = 1)."""
    unit = float(unit_pixel_rmse.double().mean())
    return target_pixel_rmse / unit if unit > 0 else math.inf


def _summarise(
    report: LeakageReport,
    unit_pixel: Tensor | None,
    worst_k: int,
    target_pixel_rmse: float,
    clipping_norm: float | None,
    batch_size: int | None,
) -> None:
    """Fill ``report.scalars``, ``per_class`` and ``worst`` from its per-sample values."""
    result = report.per_sample
    pixel = report.pixel_rmse.detach().double().cpu()
    k = len(pixel)
    mean = float(pixel.mean())
    stderr = float(pixel.std() / math.sqrt(k)) if k > 1 else math.nan
    psnr = attack_psnr(pixel)
    scalars = {
        "expected_i2f": float(result.expected_i2f.mean()),
        "expected_i2f_rmse": float(result.expected_i2f_rmse.mean()),
        "expected_i2f_pixel_rmse": mean,
        # the standard error of that mean over the probes evaluated (their spread, which includes the
        # trace estimator's own noise) and its relative size: how far to trust the logged number
        "expected_i2f_pixel_rmse_stderr": stderr,
        "relative_stderr": stderr / mean if mean > 0 else math.nan,
        "probes": float(k),
        "measured_at_step": float(report.step),
        "lower_bound": float(result.lower_bound.mean()),
        "lambda_max": float(result.lambda_max.mean()),
        "noise_std": report.noise.std if report.noise.std is not None else float("nan"),
        "per_unit_noise": float(report.noise.per_unit),
        "converged_fraction": float(result.converged.double().mean()),
        "damping": float(result.damping),
    }
    if not report.noise.per_unit:
        # with no noise (defense=none) the values are per unit σ: no attack scores that, so no PSNR is
        # shown; sigma_for_target is then the headline
        scalars["expected_attack_psnr"] = float(psnr.mean())
    if unit_pixel is not None:
        sigma = sigma_for_target(unit_pixel, target_pixel_rmse)
        scalars["sigma_for_target"] = sigma
        scalars["target_pixel_rmse"] = float(target_pixel_rmse)
        if clipping_norm and batch_size:
            # DP-SGD adds N(0, z²C²) to the sum of B clipped gradients: σ per coordinate of the mean is zC/B
            scalars["noise_multiplier_for_target"] = sigma * batch_size / clipping_norm
    if k > 1:  # a spread needs two probes: one probe has no unfairness to report (not 0, not 1)
        scalars.update(unfairness(pixel))
    order = torch.argsort(pixel, descending=True)[: max(0, worst_k)]
    report.worst = [(int(i), float(pixel[i])) for i in order]
    if report.worst:
        scalars["worst_k_pixel_rmse"] = float(pixel[order].mean())
    report.per_class = {
        int(c): float(pixel[report.labels == c].mean()) for c in torch.unique(report.labels).tolist()
    }
    report.scalars = _finite(scalars)


def _finite(scalars: dict[str, float]) -> dict[str, float]:
    """Only the finite values: a non-isotropic noise has no single std, one probe has no standard error, λ_min = 0
    has no condition number, and a dashboard must never show NaN/inf."""
    return {k: v for k, v in scalars.items() if math.isfinite(v)}


@dataclass
class ExactSpectra:
    """The extreme eigenvalues of some probes' JᵢJᵢᵀ, from their full spectra."""

    lambda_min: Tensor
    lambda_max: Tensor


def _exact_spectra(model: nn.Module, x: Tensor, y: Tensor, count: int, exact_max_dim: int) -> ExactSpectra | None:
    # an exact spectrum costs d_x forward-mode products per sample: affordable for digits (256), not CIFAR (3,072)
    if count <= 0 or x[0].numel() > exact_max_dim:
        return None
    k = min(count, len(y))
    eigenvalues = exact_spectra(model, x[:k], y[:k])
    return ExactSpectra(lambda_min=eigenvalues[:, 0], lambda_max=eigenvalues[:, -1])


def _add_spectra(report: LeakageReport, spectra: ExactSpectra | PerSampleLeakage) -> None:
    """λ_min and the condition number, over the probes whose exact spectrum was computed."""
    lam_min = spectra.lambda_min.double().clamp_min(0)
    report.scalars.update(_finite({
        "lambda_min": float(lam_min.mean()),
        "condition_number": float((spectra.lambda_max.double() / lam_min).median()),
    }))


def spectrum_products(model: nn.Module, d_x: int, count: int) -> tuple[int, int]:
    """(products, vectors) that the exact spectra of ``count`` samples are worth, for the monitor's cost plan
    before one has been timed: d_x Jacobian columns per sample, a column (one forward-mode product) counted
    as half a JJᵀ product vector."""
    d_theta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    columns = max(1, min(d_x, EXACT_BLOCK_NUMBERS // max(1, count * d_theta)))
    return math.ceil(d_x / columns), max(1, count * d_x // 2)


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
    exact_spectrum_probes: int = 4,
    exact_max_dim: int = EXACT_MAX_DIM,
    worst_k: int = 5,
    noise_draws: int = 32,
    generator: torch.Generator | None = None,
    noise: NoiseModel | None = None,
    target_pixel_rmse: float = DEFAULT_TARGET_PIXEL_RMSE,
    clipping_norm: float | None = None,
    batch_size: int | None = None,
) -> LeakageReport:
    """Per-sample I²F leakage of ``(x, y)`` under ``defense``'s noise at ``step``, at full precision.
    Never changes ``model``.

    ``method="slq"`` (default): λ_max by Lanczos and the traces by stochastic Lanczos quadrature (4 chains,
    λ_max to 1e-4), ~7x cheaper than ``"exact"``, which forms every sample's JJᵀ (d_x products each). λ_min and
    the condition number need the exact spectrum: with ``"slq"`` they come from the first ``exact_spectrum_probes``
    samples only (0: skip them), and only for inputs of at most ``exact_max_dim`` values. The damping is
    ε = ``damping`` + ``relative_damping``·median λ_max (scale-free; see
    :func:`pl_i2f.influence.per_sample_leakage`); the ε used is logged as ``damping``. ``noise`` overrides
    the defense's noise at ``step`` (a :class:`NoiseModel` captured earlier, with a snapshot of the weights).
    ``sigma_for_target`` (isotropic noise only) and ``noise_multiplier_for_target`` (with ``clipping_norm``
    and ``batch_size``): see :func:`sigma_for_target`. The monitor's cheaper evaluation is
    :func:`monitor_leakage`.
    """
    model = analysis_model(model)
    noise = NoiseModel.of(defense, step, model) if noise is None else noise
    result = per_sample_leakage(
        model, x, y,
        noise_std=noise.std, noise_sampler=noise.sampler, damping=damping, relative_damping=relative_damping,
        method=method, noise_draws=noise_draws, probes=LANCZOS_CHAINS, generator=generator,
    )
    spectra = result if result.lambda_min is not None else _exact_spectra(
        model, x, y, exact_spectrum_probes, exact_max_dim)
    report = LeakageReport(per_sample=result, labels=y.detach().cpu(), pixel_std=pixel_std, noise=noise, step=step)
    unit = None
    if noise.std is not None:
        unit = report.pixel_rmse.detach() / noise.std
    _summarise(report, unit, worst_k, target_pixel_rmse, clipping_norm, batch_size)
    if spectra is not None:
        _add_spectra(report, spectra)
    return report


def undamped_leakage(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defense: Defense,
    step: int,
    *,
    pixel_std: float = 1.0,
    exact_max_dim: int = EXACT_MAX_DIM,
) -> Tensor | None:
    """Each sample's **undamped** expected I²F on the [0, 1] pixel scale, σ·√(Σᵢ 1/λᵢ)/√d_x·pixel_std, from its
    exact spectrum in float64 (:func:`pl_i2f.influence.warm.exact_spectra`; eigenvalues at or below the rank
    threshold d_x·u·λ_max count as null directions, as in the pseudo-inverse): the attack-calibrated figure (DLG's
    error when the attack converges: within ~1% on the untrained LeNet, ``docs/results.md``), where the damped
    headline is a monitoring figure that understates the attack's error.

    Exact because Σ 1/λ is dominated by the smallest eigenvalues, which a short Lanczos basis does not resolve;
    float64 because the rank threshold is d_x·u·λ_max (u the unit roundoff): in float32 that is 3·10⁻⁵·λ_max at
    d_x = 256 and would drop real eigenvalues of a trained digits LeNet (λ_min/λ_max ≈ 10⁻⁶–10⁻⁷).
    Costs d_x forward-mode products per sample, so it is only computed for inputs of at most ``exact_max_dim``
    values and for isotropic noise (a defense without noise: per unit σ); ``None`` otherwise."""
    n = x[0].numel()
    if n > exact_max_dim:
        return None
    noise = NoiseModel.of(defense, step, analysis_model(model))
    if noise.std is None:  # anisotropic draws: no single σ to scale the spectrum by
        return None
    eigenvalues = exact_spectra(copy.deepcopy(analysis_model(model)).double(), x.double(), y)
    kept = eigenvalues > default_rcond(n, eigenvalues.dtype) * eigenvalues[:, -1:]
    inverse_sum = torch.where(kept, 1.0 / eigenvalues.where(kept, torch.ones_like(eigenvalues)), 0.0).sum(-1)
    return noise.std * inverse_sum.sqrt() / math.sqrt(n) * pixel_std


def monitor_leakage(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defense: Defense,
    step: int,
    *,
    basis: Tensor | None = None,
    steps: int = 16,
    pixel_std: float = 1.0,
    damping: float = 0.0,
    relative_damping: float = 0.01,
    exact_spectrum_probes: int = 0,
    exact_max_dim: int = EXACT_MAX_DIM,
    worst_k: int = 5,
    noise_draws: int = 32,
    generator: torch.Generator | None = None,
    noise: NoiseModel | None = None,
    target_pixel_rmse: float = DEFAULT_TARGET_PIXEL_RMSE,
    clipping_norm: float | None = None,
    batch_size: int | None = None,
    max_seconds: float | None = None,
    min_steps: int = 2,
    stop: Callable[[int, float], bool] | None = None,
) -> tuple[LeakageReport, BasisLeakage]:
    """The leakage monitor's evaluation: :func:`measure_leakage`'s report at monitoring precision.

    One Lanczos basis of ``steps`` vectors per probe (:func:`basis_leakage`), warm-started from ``basis``
    (the previous evaluation's, returned for the next call) — two block products instead of a fresh
    Lanczos run; one Rademacher vector per probe (the mean's standard error over the probes is logged).
    Isotropic noise uses E‖I²F‖ = σ·(its value at σ = 1); other noise (anisotropic) adds Monte Carlo over
    the defense's draws (:func:`pl_i2f.influence.per_sample_leakage`). ``exact_spectrum_probes`` > 0 adds the
    exact spectra (λ_min, condition number) of that many probes — the monitor asks for them at its first
    and last evaluation only (their seconds in ``fit.spectra_seconds``). ``max_seconds``/``min_steps``/``stop``: a
    fresh basis stops growing when its next product would not fit (:func:`basis_leakage`). Within 5% of the
    full-precision computation along a digits run (tested).
    """
    model = analysis_model(model)
    noise = NoiseModel.of(defense, step, model) if noise is None else noise
    fit = basis_leakage(model, x, y, steps=steps, basis=basis, damping=damping, relative_damping=relative_damping,
                        generator=generator, max_seconds=max_seconds, min_steps=min_steps, stop=stop)
    n = x[0].numel()
    unit = fit.unit_i2f_sq.clamp_min(0).sqrt()
    if noise.std is not None:
        expected_i2f = noise.std * unit
        expected_jdelta = noise.std * fit.trace.clamp_min(0).sqrt()
        converged = fit.lambda_max_residual <= 1e-2 * fit.lambda_max.abs()
        damping_used = fit.damping
    else:  # a sampler: Monte Carlo over its draws, at the damping the basis chose
        mc = per_sample_leakage(model, x, y, noise_sampler=noise.sampler, damping=fit.damping, probes=1,
                                noise_draws=noise_draws, tol=1e-2, generator=generator)
        expected_i2f, expected_jdelta, converged, damping_used = (mc.expected_i2f, mc.expected_jdelta, mc.converged,
                                                                   mc.damping)
    started = time.perf_counter()
    spectra = _exact_spectra(model, x, y, exact_spectrum_probes, exact_max_dim)
    fit.spectra_seconds = time.perf_counter() - started if spectra is not None else 0.0
    result = PerSampleLeakage(
        lambda_max=fit.lambda_max, lambda_min=None, trace=fit.trace, expected_jdelta=expected_jdelta,
        lower_bound=expected_jdelta / (fit.lambda_max + damping_used), expected_i2f=expected_i2f,
        expected_i2f_rmse=expected_i2f / math.sqrt(n), converged=converged, iterations=fit.products[0],
        method="warm" if fit.warm else "lanczos", damping=damping_used, labels=y,
    )
    report = LeakageReport(per_sample=result, labels=y.detach().cpu(), pixel_std=pixel_std, noise=noise, step=step)
    _summarise(report, unit / math.sqrt(n) * pixel_std, worst_k, target_pixel_rmse, clipping_norm, batch_size)
    if spectra is not None:
        _add_spectra(report, spectra)
    report.scalars["warm_started"] = float(fit.warm)
    return report, fit


def mean_pixel_std(datamodule: object) -> float:
    """The datamodule's per-channel std averaged (1.0 when it has none): normalised → pixel scale."""
    std = getattr(datamodule, "std", None)
    return float(sum(std) / len(std)) if std else 1.0
