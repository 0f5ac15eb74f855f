"""One road for a leakage evaluation (:func:`leakage_report`) and the named calls over it."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pl_i2f import calibrated as cal
from pl_i2f.defenses import Defense
from pl_i2f.defenses.base import analysis_model
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import eval_mode
from pl_i2f.influence import settings as influence_settings
from pl_i2f.influence.chain import ChainProducts
from pl_i2f.influence.jacobian import chain_route
from pl_i2f.influence.per_sample import PerSampleOperator
from pl_i2f.influence.warm import exact_spectra
from pl_i2f.leakage.estimators import Calibrated, ExactSpectra, FullPrecision, WarmBasis
from pl_i2f.leakage.report import (
    EXACT_MAX_DIM,
    Estimator,
    LeakageOptions,
    LeakageReport,
    NoiseLike,
    SpectrumEnds,
    _finite,
    _summarise,
    noise_of,
)
from pl_i2f.threat import SampleNoise


def leakage_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: SampleNoise,
    options: LeakageOptions,
    estimator: Estimator,
    *,
    step: int = 0,
    generator: torch.Generator | None = None,
    clock: Callable[[], float] = time.perf_counter,
    loss_fn: Callable | None = None,
) -> LeakageReport:
    """Per-sample leakage of ``(x, y)`` (each sample its own private input) under ``noise`` (the noise on one
    sample's own gradient, :mod:`pl_i2f.threat`), by ``estimator``, summarised as ``options`` say. Never changes
    ``model``. The per-sample operator is built here, once, on a hook-free model in eval mode (a copy in
    ``estimator.dtype`` when that differs), and handed to the estimator; the exact λ_min of
    ``options.exact_spectrum_probes`` probes then come from the same operator unless the estimator had them.
    ``report.seconds`` holds the time of the estimate and of those spectra (``clock``)."""
    if not isinstance(noise, SampleNoise):
        raise ConfigError(f"leakage_report needs the noise on a sample's gradient (a SampleNoise: "
                          f"Defense.sample_noise / pl_i2f.leakage.noise_of), got {type(noise).__name__}")
    model = analysis_model(model)
    dtype = estimator.dtype
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model, x = copy.deepcopy(model).to(dtype), x.to(dtype)
    started = clock()
    spectra_seconds = 0.0
    with eval_mode(model):
        operator = PerSampleOperator(model, x, y, loss_fn=loss_fn)
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
                           noise=noise, step=step, basis=estimate.basis, posterior=estimate.posterior,
                           seconds={"estimate": estimate_seconds, "spectra": spectra_seconds})
    _summarise(report, options, estimate.unit_pixel, estimate.clipped)
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


@functools.cache
def _warm_up_torch_func() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    previous, influence_settings.CHAIN_PRODUCTS = influence_settings.CHAIN_PRODUCTS, False  # torch.func's route
    try:
        cal.exact_posteriors(net, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), SampleNoise(std=1.0), 1.0)
    finally:
        influence_settings.CHAIN_PRODUCTS = previous


def warm_up_transforms(model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None,
                       loss_fn: Callable | None = None, *, route: str = "sketch",
                       prior: cal.GaussianPrior | float = 1.0, reserve: int = 0) -> None:
    """torch.func's one-off set-up (the explicit Jacobians' vmap over forward-mode products), paid once per process
    on a tiny model, so that it does not count as the price of a probe; with ``model`` and a probe ``(x, y)``
    also the one-off costs of ``route`` on that network — a rank-1 sketch of one probe, or one probe's exact
    estimate under ``prior`` (its data span) — which would otherwise inflate the first price several times. A chain
    network's exact route (:mod:`pl_i2f.influence.chain`) runs without torch.func and its one-off costs are few:
    its trace, its operators, and with ``reserve`` the first touch of its buffers for that many probes; what is
    left (first calls of a few kernels) makes the first one-probe price dearer by about half, on the safe side."""
    given = model is not None and x is not None and y is not None
    chain = chain_route(model, x, y, loss_fn) if route == "exact" and given else None
    if chain is not None:  # its operators (the unfoldings are kept for later weights), and its buffers
        if reserve > 0:
            reserve_buffers(model, x, y, loss_fn, prior=prior, probes=reserve)
        else:
            ChainProducts(chain, reuse=True)
        return
    _warm_up_torch_func()
    if given:
        device = next(model.parameters()).device
        estimator = Calibrated(route="sketch", rank=1, probes=1) if route == "sketch" else Calibrated(route="exact")
        leakage_report(model, x[:1].to(device), y[:1].to(device), SampleNoise(std=1.0),
                       LeakageOptions(prior=prior, clipping_norm=1.0), estimator, loss_fn=loss_fn)


def reserve_buffers(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None, *,
                    prior: cal.GaussianPrior | float = 1.0, probes: int) -> None:
    """Touch the chain route's reused buffers (:meth:`pl_i2f.influence.chain.ChainProducts.reserve`) for an exact
    evaluation of ``probes`` probes under ``prior`` now: their first touch is a one-off cost, kept out of the price
    of that evaluation. Nothing off the chain route."""
    chain = chain_route(model, x, y, loss_fn) if probes > 0 else None
    if chain is not None:
        like = next(model.parameters()).detach()
        ChainProducts(chain, reuse=True).reserve(probes, Calibrated.exact_columns(prior, x[0].numel()), like)


def measure_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: Defense, step: int, *, method: str = "slq",
                    exact_spectrum_probes: int = 4, generator: torch.Generator | None = None,
                    noise: SampleNoise | None = None, **options: Any) -> LeakageReport:
    """The paper's per-sample I²F leakage of ``(x, y)`` under ``defense``'s noise at ``step``, at full precision
    (:class:`FullPrecision`; ``options``: the fields of :class:`LeakageOptions`). Never changes ``model``.

    ``method="slq"`` (default): λ_max by Lanczos and the traces by stochastic Lanczos quadrature (4 chains,
    λ_max to 1e-4), several times cheaper than ``"exact"``, which forms every sample's JJᵀ (d_x products each).
    λ_min and the condition number need the exact spectrum: with ``"slq"`` they come from the first
    ``exact_spectrum_probes`` samples only (0: skip them), for inputs of at most ``exact_max_dim`` values. The
    damping is ε = ``damping`` + ``relative_damping``·median λ_max (scale-free; see
    :func:`pl_i2f.influence.per_sample_leakage`); the ε used is logged as ``damping``. ``noise`` overrides the
    defense's noise at ``step`` (a :class:`SampleNoise` captured earlier, with a snapshot of the weights).
    ``sigma_for_target`` (isotropic noise only) and ``noise_multiplier_for_target`` (with ``clipping_norm`` and
    ``batch_size``): see :func:`sigma_for_target`. The monitor's cheaper evaluation is :func:`monitor_leakage`."""
    estimator = FullPrecision(method=method)
    noise = _noise(defense, step, model, noise, options)
    return leakage_report(model, x, y, noise, LeakageOptions(exact_spectrum_probes=exact_spectrum_probes, **options),
                          estimator, step=step, generator=generator)


def undamped_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: NoiseLike, step: int, *,
                     pixel_std: float = 1.0, exact_max_dim: int = EXACT_MAX_DIM,
                     batch_size: int | None = None) -> Tensor | None:
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
    noise = noise_of(defense, step, analysis_model(model), batch_size=batch_size)
    if not noise.isotropic:  # no single σ to scale the spectrum by
        return None
    report = leakage_report(model, x, y, noise, LeakageOptions(pixel_std=pixel_std, worst_k=0), ExactSpectra(),
                            step=step)
    return report.pixel_rmse


def monitor_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: Defense, step: int, *,
                    basis: Tensor | None = None, steps: int = 16, generator: torch.Generator | None = None,
                    noise: SampleNoise | None = None, **options: Any) -> LeakageReport:
    """The paper's damped figure at monitoring precision (:class:`WarmBasis`, warm-started from ``basis``;
    ``options``: the fields of :class:`LeakageOptions`): :func:`measure_leakage`'s report, cheaper. The next
    evaluation's basis is ``report.basis.basis``."""
    noise = _noise(defense, step, model, noise, options)
    return leakage_report(model, x, y, noise, LeakageOptions(**options), WarmBasis(steps=steps, basis=basis),
                          step=step, generator=generator)


def _noise(defense: NoiseLike, step: int, model: nn.Module, noise: SampleNoise | None,
           options: dict[str, Any]) -> SampleNoise:
    if noise is not None:
        return noise
    return noise_of(defense, step, analysis_model(model), batch_size=options.get("batch_size"))


def calibrated_leakage(model: nn.Module, x: Tensor, y: Tensor, defense: NoiseLike, step: int, *,
                       prior: cal.GaussianPrior | float, noise: SampleNoise | None = None,
                       generator: torch.Generator | None = None, **options: Any) -> LeakageReport:
    """The headline report (:class:`Calibrated`) of ``(x, y)`` under ``defense``'s noise at ``step`` (or
    ``noise``), for an attacker with the Gaussian ``prior`` (``options``: the fields of :class:`LeakageOptions`;
    ``batch_size`` is B for noise on the mean gradient). Never changes ``model``."""
    noise = _noise(defense, step, model, noise, options)
    return leakage_report(model, x, y, noise, LeakageOptions(prior=prior, **options), Calibrated(), step=step,
                          generator=generator)


def mean_pixel_std(datamodule: object) -> float:
    """The datamodule's per-channel std averaged (1.0 when it has none): normalised → pixel scale."""
    std = getattr(datamodule, "std", None)
    return float(sum(std) / len(std)) if std else 1.0
