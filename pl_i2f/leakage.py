"""What the leakage monitor and the attack audit measure: I²F under a defense's own noise, per sample.

Each probe sample is its own private input x₀ (batch size 1, the attacker's best case and the paper's
per-sample analysis), so the numbers compare directly with an attack on one sample's released gradient.
The noise is the defense's at the given step:

* isotropic Gaussian (``defense.noise_std(step)``: Gaussian, DP-SGD's σC/B after clipping) → the exact
  isotropic formula E‖I²F‖² = σ² Σ λᵢ/(λᵢ+ε)²;
* any other noise (``defense.noise_sampler(step)``: anisotropic …) → Monte Carlo over its draws;
* no noise (``none``, ``pruning``) → σ = 1: leakage **per unit of noise**, so runs stay comparable.

One road: :func:`leakage_report` builds the per-sample operator (:class:`PerSampleOperator`) once and hands it to
an estimator — :class:`WarmBasis` (the monitor's), :class:`FullPrecision` (the audit's and the studies'),
:class:`ExactSpectra` (the undamped figure) — which returns an :class:`Estimate`; the report, its summaries
and the optional exact λ_min are then the same whatever estimator ran. :func:`measure_leakage`,
:func:`monitor_leakage` and :func:`undamped_leakage` are named settings of it.

Scales: ``expected_i2f`` is ‖I²F‖ in the model's (normalised) input space; ``…_rmse`` divides by √d_x;
``…_pixel_rmse`` multiplies that by the datamodule's std, the [0, 1]-pixel RMSE an attack's metrics report
(exact for one channel or equal channel stds; the mean std otherwise).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pl_i2f.defenses import Defense, NoiseSampler
from pl_i2f.defenses.base import analysis_model
from pl_i2f.gradients import eval_mode
from pl_i2f.influence import PerSampleLeakage
from pl_i2f.influence.damping import Damping
from pl_i2f.influence.per_sample import METHODS, PerSampleOperator, operator_leakage
from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS, default_rcond
from pl_i2f.influence.warm import BASIS_RCOND, BasisLeakage, basis_leakage, exact_spectra
from pl_i2f.monitoring import CALIBRATION_CHAINS, CALIBRATION_PROBES, EvaluationPlanner
from pl_i2f.rng import analysis_generator, rademacher

LANCZOS_CHAINS = 4  # Lanczos chains per probe sample at full precision (FullPrecision)
EXACT_MAX_DIM = 1024  # inputs of at most this many values get exact spectra (d_x products per sample)
DEFAULT_TARGET_PIXEL_RMSE = 0.1  # ≈ 20 dB PSNR: an attacker's reconstruction this far off is a blur
MONITOR_CHAINS = 1  # one Lanczos chain per probe for the monitor's Monte Carlo over a sampler's draws
MONITOR_LAMBDA_TOL = 1e-2  # its λ_max tolerance: a monitoring figure, whose spread over probes is logged
CONVERGED_RESIDUAL = 1e-2  # a Ritz λ_max counts as converged when its residual is below this share of it


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
class Snapshot:
    """What an evaluation needs, frozen at its step: the weights (hook-free) and the defense's noise."""

    step: int
    model: nn.Module
    noise: NoiseModel

    @classmethod
    def of(cls, model: nn.Module, defense: Defense, step: int, copy_weights: bool = False) -> Snapshot:
        """``model``'s weights at ``step`` (a copy with ``copy_weights``: training will change them before the
        evaluation runs) and ``defense``'s noise there."""
        analysed = analysis_model(model)  # hook-free (a copy already) under DP-SGD
        if copy_weights and analysed is model:
            analysed = copy.deepcopy(model)
        return cls(step=step, model=analysed, noise=NoiseModel.of(defense, step, analysed))


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
    basis: BasisLeakage | None = None  # a WarmBasis estimate's basis and products, for the next evaluation
    seconds: dict[str, float] = field(default_factory=dict)  # {"estimate": …, "spectra": …} by the report's clock

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


@dataclass(frozen=True)
class LeakageOptions:
    """How a leakage report is summarised, shared by every estimator: ``pixel_std`` (normalised → [0, 1]
    pixels), the damping ε = ``damping`` + ``relative_damping``·median λ_max, the exact λ_min of the first
    ``exact_spectrum_probes`` probes (inputs of at most ``exact_max_dim`` values), ``worst_k`` samples listed,
    ``noise_draws`` for a sampler's Monte Carlo, and the σ-for-target settings (``target_pixel_rmse``; with
    ``clipping_norm`` and ``batch_size`` also as a DP-SGD noise multiplier)."""

    pixel_std: float = 1.0
    damping: float = 0.0
    relative_damping: float = 0.01
    exact_spectrum_probes: int = 0
    exact_max_dim: int = EXACT_MAX_DIM
    worst_k: int = 5
    noise_draws: int = 32
    target_pixel_rmse: float = DEFAULT_TARGET_PIXEL_RMSE
    clipping_norm: float | None = None
    batch_size: int | None = None


@dataclass
class SpectrumEnds:
    """The extreme eigenvalues of some probes' JᵢJᵢᵀ, from their full spectra."""

    lambda_min: Tensor
    lambda_max: Tensor


@dataclass
class Estimate:
    """What an estimator returns: the per-sample values; ``unit_pixel`` the pixel RMSE at σ = 1 (for
    σ-for-target; ``None`` when the noise has no single σ); ``spectra`` its own exact λ_min/λ_max when it has
    them; ``basis`` the warm-start state for the next evaluation; ``scalars`` extra logged values."""

    per_sample: PerSampleLeakage
    unit_pixel: Tensor | None = None
    spectra: SpectrumEnds | None = None
    basis: BasisLeakage | None = None
    scalars: dict[str, float] = field(default_factory=dict)


class Estimator(Protocol):
    """Turns the per-sample operator of an evaluation into an :class:`Estimate`. ``dtype``: the precision the
    operator is built in (``None``: the model's own). Runs with the model in eval mode."""

    dtype: torch.dtype | None

    def estimate(self, operator: PerSampleOperator, noise: NoiseModel, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate: ...


@dataclass
class FullPrecision:
    """Stochastic Lanczos quadrature (``method="slq"``: ``chains`` Lanczos chains per probe, λ_max to 1e-4) or
    every sample's dense JJᵀ (``"exact"``, d_x products each; gives λ_min):
    :func:`pl_i2f.influence.per_sample.operator_leakage`. A sampler's noise: Monte Carlo over its draws."""

    method: str = "slq"
    chains: int = LANCZOS_CHAINS
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be 'slq' or 'exact', got {self.method!r}")

    def estimate(self, operator: PerSampleOperator, noise: NoiseModel, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        result = operator_leakage(
            operator, noise_std=noise.std, noise_sampler=noise.sampler, damping=options.damping,
            relative_damping=options.relative_damping, method=self.method, noise_draws=options.noise_draws,
            chains=self.chains, generator=generator,
        )
        unit = None if noise.std is None else (result.expected_i2f_rmse * options.pixel_std).detach() / noise.std
        spectra = None if result.lambda_min is None else SpectrumEnds(result.lambda_min, result.lambda_max)
        return Estimate(per_sample=result, unit_pixel=unit, spectra=spectra)


@dataclass
class WarmBasis:
    """The monitor's evaluation: one Lanczos basis of ``steps`` vectors per probe
    (:func:`pl_i2f.influence.warm.basis_leakage`), warm-started from ``basis`` (the previous evaluation's,
    returned in the report for the next call) — two block products instead of a fresh Lanczos run; one
    Rademacher vector per probe (the mean's standard error over the probes is logged). Isotropic noise uses
    E‖I²F‖ = σ·(its value at σ = 1); other noise (anisotropic) adds Monte Carlo over the defense's draws on the
    same operator. Within 5% of the full-precision computation along a digits run (tested).

    ``stop(steps done, seconds so far, seconds of the last step)`` (fresh bases): ``True`` ends the basis there,
    after at least ``min_steps`` steps — the caller's budget, timed with ``clock``; the solver never reads a
    clock itself."""

    steps: int = 16
    basis: Tensor | None = None
    stop: Callable[[int, float, float], bool] | None = None
    min_steps: int = 2
    clock: Callable[[], float] = time.perf_counter
    dtype: torch.dtype | None = None

    def _keep_going(self) -> Callable[[int], bool] | None:
        if self.stop is None:
            return None
        stop, clock, min_steps = self.stop, self.clock, self.min_steps
        marks = [clock()]

        def keep_going(steps: int) -> bool:
            marks.append(clock())
            return steps < min_steps or not stop(steps, marks[-1] - marks[0], marks[-1] - marks[-2])

        return keep_going

    def estimate(self, operator: PerSampleOperator, noise: NoiseModel, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        damping = Damping.request(options.damping, relative=options.relative_damping, d_x=operator.n,
                                  dtype=operator.like.dtype, caller="the leakage monitor", rcond=BASIS_RCOND)
        fit = basis_leakage(operator, damping, steps=self.steps, basis=self.basis, generator=generator,
                            keep_going=self._keep_going())
        n = operator.n
        unit = fit.unit_i2f_sq.clamp_min(0).sqrt()
        if noise.std is not None:
            expected_i2f = noise.std * unit
            expected_jdelta = noise.std * fit.trace.clamp_min(0).sqrt()
            converged = fit.lambda_max_residual <= CONVERGED_RESIDUAL * fit.lambda_max.abs()
            damping_used = fit.damping
        else:  # a sampler: Monte Carlo over its draws, at the damping the basis chose
            mc = operator_leakage(operator, noise_sampler=noise.sampler, damping=fit.damping, chains=MONITOR_CHAINS,
                                  noise_draws=options.noise_draws, tol=MONITOR_LAMBDA_TOL, generator=generator)
            expected_i2f, expected_jdelta, converged, damping_used = (mc.expected_i2f, mc.expected_jdelta,
                                                                       mc.converged, mc.damping)
        result = PerSampleLeakage(
            lambda_max=fit.lambda_max, lambda_min=None, trace=fit.trace, expected_jdelta=expected_jdelta,
            lower_bound=expected_jdelta / (fit.lambda_max + damping_used), expected_i2f=expected_i2f,
            expected_i2f_rmse=expected_i2f / math.sqrt(n), converged=converged, iterations=fit.products[0],
            method="warm" if fit.warm else "lanczos", damping=damping_used, labels=operator.y,
        )
        return Estimate(per_sample=result, unit_pixel=unit / math.sqrt(n) * options.pixel_std, basis=fit,
                        scalars={"warm_started": float(fit.warm)})


@dataclass
class ExactSpectra:
    """The **undamped** expected I²F from every eigenvalue of each probe's JᵢJᵢᵀ, in ``dtype`` (float64 by
    default): σ·√(Σᵢ 1/λᵢ), eigenvalues at or below the rank threshold d_x·u·λ_max counting as null directions
    (as in the pseudo-inverse). Isotropic noise only (a defense without noise: per unit σ); see
    :func:`undamped_leakage`."""

    dtype: torch.dtype | None = torch.float64

    def estimate(self, operator: PerSampleOperator, noise: NoiseModel, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        if noise.std is None:
            raise ValueError("ExactSpectra needs isotropic noise (a single σ to scale the spectrum by)")
        n = operator.n
        eigenvalues = exact_spectra(operator)
        kept = eigenvalues > default_rcond(n, eigenvalues.dtype) * eigenvalues[:, -1:]
        inverse_sum = torch.where(kept, 1.0 / eigenvalues.where(kept, torch.ones_like(eigenvalues)), 0.0).sum(-1)
        lam_max, trace = eigenvalues[:, -1], eigenvalues.clamp_min(0).sum(-1)
        expected_i2f = noise.std * inverse_sum.sqrt()
        expected_jdelta = noise.std * trace.sqrt()
        result = PerSampleLeakage(
            lambda_max=lam_max, lambda_min=eigenvalues[:, 0], trace=trace, expected_jdelta=expected_jdelta,
            lower_bound=expected_jdelta / lam_max, expected_i2f=expected_i2f,
            expected_i2f_rmse=expected_i2f / math.sqrt(n), converged=torch.ones_like(kept[:, 0]), iterations=n,
            method="exact_spectra", damping=0.0, labels=operator.y,
        )
        unit = (result.expected_i2f_rmse * options.pixel_std).detach() / noise.std
        return Estimate(per_sample=result, unit_pixel=unit, spectra=SpectrumEnds(eigenvalues[:, 0], lam_max))


def leakage_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: NoiseModel,
    options: LeakageOptions,
    estimator: Estimator,
    *,
    step: int = 0,
    generator: torch.Generator | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LeakageReport:
    """Per-sample leakage of ``(x, y)`` (each sample its own private input) under ``noise``, by ``estimator``,
    summarised as ``options`` say. Never changes ``model``. The per-sample operator is built here, once, on a
    hook-free model in eval mode (a copy in ``estimator.dtype`` when that differs), and handed to the estimator;
    the exact λ_min of ``options.exact_spectrum_probes`` probes then come from the same operator unless the
    estimator had them. ``report.seconds`` holds the time of the estimate and of those spectra (``clock``)."""
    model = analysis_model(model)
    dtype = estimator.dtype
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model, x = copy.deepcopy(model).to(dtype), x.to(dtype)
    started = clock()
    spectra_seconds = 0.0
    with eval_mode(model):
        operator = PerSampleOperator(model, x, y)
        estimate = estimator.estimate(operator, noise, options, generator)
        estimate_seconds = clock() - started
        spectra = estimate.spectra
        count = options.exact_spectrum_probes
        if spectra is None and count > 0 and operator.n <= options.exact_max_dim:
            # an exact spectrum costs d_x forward-mode products per sample: affordable for digits, not CIFAR
            began = clock()
            eigenvalues = exact_spectra(operator, count)
            spectra = SpectrumEnds(lambda_min=eigenvalues[:, 0], lambda_max=eigenvalues[:, -1])
            spectra_seconds = clock() - began
    report = LeakageReport(per_sample=estimate.per_sample, labels=y.detach().cpu(), pixel_std=options.pixel_std,
                           noise=noise, step=step, basis=estimate.basis,
                           seconds={"estimate": estimate_seconds, "spectra": spectra_seconds})
    _summarise(report, estimate.unit_pixel, options.worst_k, options.target_pixel_rmse, options.clipping_norm,
               options.batch_size)
    if spectra is not None:
        _add_spectra(report, spectra)
    report.scalars.update(estimate.scalars)
    return report


def _add_spectra(report: LeakageReport, spectra: SpectrumEnds) -> None:
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


def product_seconds(model: nn.Module, x: Tensor, y: Tensor, chains: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds (by ``clock``) of one Lanczos step of the full-precision path on the samples ``x``: one vmapped
    JᵢJᵢᵀ product for every sample and ``chains`` vectors each (one call, so the first one of a process includes
    one-off allocation costs). The unit a caller scales to predict an evaluation's cost before running it."""
    model = analysis_model(model)
    with eval_mode(model):
        operator = PerSampleOperator(model, x, y)
        like = operator.like
        v = rademacher((operator.N, chains, operator.n), analysis_generator(None, like.device), like)
        sync = torch.cuda.synchronize if like.device.type == "cuda" else (lambda device=None: None)
        sync(like.device)
        start = clock()
        operator.gram(v)
        sync(like.device)
        return clock() - start


@functools.cache
def warm_up_transforms() -> None:
    """torch.func's one-off set-up, paid once per process on a tiny model, so that it does not count as the
    price of a product (and costs a large model nothing)."""
    product_seconds(nn.Sequential(nn.Flatten(), nn.Linear(2, 2)), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def price_batched_products(planner: EvaluationPlanner, model: nn.Module, x: Tensor, y: Tensor,
                           device: torch.device | str = "cpu") -> float:
    """Price the vmapped path (several probes) on real products of ``CALIBRATION_PROBES`` probes at each of
    ``CALIBRATION_CHAINS`` vectors (two sizes separate its fixed and per-vector parts), each only while the
    planner says it fits (:meth:`EvaluationPlanner.calibration_due`); the seconds are observed into
    ``planner.cost.batched``. Returns the seconds spent (by the planner's clock)."""
    start = planner.clock()
    warm_up_transforms()  # torch.func's one-off set-up, on a two-parameter model: not a price
    probes = min(CALIBRATION_PROBES, len(x))
    for chains in CALIBRATION_CHAINS:
        if not planner.calibration_due(probes, chains):
            break
        seconds = product_seconds(model, x[:probes].to(device), y[:probes].to(device), chains, clock=planner.clock)
        planner.cost.batched.observe(1, probes * chains, seconds)
    return planner.clock() - start


def merge_basis(stored: Tensor | None, new: Tensor) -> Tensor:
    """The warm-start basis to keep after an evaluation that produced ``new`` (p, k, d_x): it replaces ``stored``
    when it covers as many probes; a reduced evaluation (fewer probes) updates their rows when the sizes agree
    and otherwise leaves the stored basis as it was (an older start for those probes, not a smaller probe set
    for the rest of the run)."""
    if stored is None or len(new) >= len(stored):
        return new
    if new.shape[1:] == stored.shape[1:]:
        return torch.cat([new, stored[len(new):]])
    return stored


def measure_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: Defense, step: int, *, method: str = "slq",
                    exact_spectrum_probes: int = 4, generator: torch.Generator | None = None,
                    noise: NoiseModel | None = None, **options: Any) -> LeakageReport:
    """Per-sample I²F leakage of ``(x, y)`` under ``defense``'s noise at ``step``, at full precision
    (:class:`FullPrecision`; ``options``: the fields of :class:`LeakageOptions`). Never changes ``model``.

    ``method="slq"`` (default): λ_max by Lanczos and the traces by stochastic Lanczos quadrature (4 chains,
    λ_max to 1e-4), several times cheaper than ``"exact"``, which forms every sample's JJᵀ (d_x products each).
    λ_min and the condition number need the exact spectrum: with ``"slq"`` they come from the first
    ``exact_spectrum_probes`` samples only (0: skip them), for inputs of at most ``exact_max_dim`` values. The
    damping is ε = ``damping`` + ``relative_damping``·median λ_max (scale-free; see
    :func:`pl_i2f.influence.per_sample_leakage`); the ε used is logged as ``damping``. ``noise`` overrides the
    defense's noise at ``step`` (a :class:`NoiseModel` captured earlier, with a snapshot of the weights).
    ``sigma_for_target`` (isotropic noise only) and ``noise_multiplier_for_target`` (with ``clipping_norm`` and
    ``batch_size``): see :func:`sigma_for_target`. The monitor's cheaper evaluation is :func:`monitor_leakage`."""
    estimator = FullPrecision(method=method)
    noise = NoiseModel.of(defense, step, analysis_model(model)) if noise is None else noise
    return leakage_report(model, x, y, noise, LeakageOptions(exact_spectrum_probes=exact_spectrum_probes, **options),
                          estimator, step=step, generator=generator)


def undamped_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: Defense, step: int, *, pixel_std: float = 1.0,
                     exact_max_dim: int = EXACT_MAX_DIM) -> Tensor | None:
    """Each sample's **undamped** expected I²F on the [0, 1] pixel scale, σ·√(Σᵢ 1/λᵢ)/√d_x·pixel_std, from its
    exact spectrum in float64 (:class:`ExactSpectra`): the attack-calibrated figure (DLG's error when the attack
    converges: within ~1% on the untrained LeNet, ``docs/results.md``), where the damped headline is a
    monitoring figure that understates the attack's error.

    Exact because Σ 1/λ is dominated by the smallest eigenvalues, which a short Lanczos basis does not resolve;
    float64 because the rank threshold is d_x·u·λ_max (u the unit roundoff): in float32 that is 3·10⁻⁵·λ_max at
    d_x = 256 and would drop real eigenvalues of a trained digits LeNet (λ_min/λ_max ≈ 10⁻⁶–10⁻⁷).
    Costs d_x forward-mode products per sample, so it is only computed for inputs of at most ``exact_max_dim``
    values and for isotropic noise (a defense without noise: per unit σ); ``None`` otherwise."""
    if x[0].numel() > exact_max_dim:
        return None
    noise = NoiseModel.of(defense, step, analysis_model(model))
    if noise.std is None:  # anisotropic draws: no single σ to scale the spectrum by
        return None
    report = leakage_report(model, x, y, noise, LeakageOptions(pixel_std=pixel_std, worst_k=0), ExactSpectra(),
                            step=step)
    return report.pixel_rmse


def monitor_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: Defense, step: int, *,
                    basis: Tensor | None = None, steps: int = 16, generator: torch.Generator | None = None,
                    noise: NoiseModel | None = None, **options: Any) -> LeakageReport:
    """The leakage monitor's evaluation (:class:`WarmBasis`, warm-started from ``basis``; ``options``: the
    fields of :class:`LeakageOptions`): :func:`measure_leakage`'s report at monitoring precision. The next
    evaluation's basis is ``report.basis.basis``."""
    noise = NoiseModel.of(defense, step, analysis_model(model)) if noise is None else noise
    return leakage_report(model, x, y, noise, LeakageOptions(**options), WarmBasis(steps=steps, basis=basis),
                          step=step, generator=generator)


def mean_pixel_std(datamodule: object) -> float:
    """The datamodule's per-channel std averaged (1.0 when it has none): normalised → pixel scale."""
    std = getattr(datamodule, "std", None)
    return float(sum(std) / len(std)) if std else 1.0
