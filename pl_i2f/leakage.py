"""What the leakage monitor and the attack audit measure, per probe sample, under the one threat model.

Each probe sample is its own private input x₀ (batch size 1: an attacker who sees one sample's contribution
to the release, everything else known — :mod:`pl_i2f.threat`), and the noise is the defense's own
:class:`~pl_i2f.threat.SampleNoise` at the step: DP-SGD σC on the *clipped* gradient, Gaussian σ on the mean
of B as Bσ on the sample's gradient, anisotropic its covariance, none nothing.

**The headline** (:class:`Calibrated`): the prior-aware expected error of a Gaussian-prior attacker
(:mod:`pl_i2f.calibrated`), exact from explicit Jacobians for inputs of at most :data:`EXACT_MAX_DIM` values
(:func:`~pl_i2f.calibrated.exact_posteriors`), a Nyström sketch with a stated error beyond. Summaries: the
pooled pixel RMSE sqrt(mean over probes of each probe's per-pixel MSE) and the PSNR 20·log10(1/RMSE) of that
same mean; the prior's PSNR (guessing the mean) and the gain over it; σ / noise multiplier for a target RMSE.

**The paper's quantities** (secondary, keys under ``paper/``): the undamped I²F σ·√(Σ1/λᵢ) (the unbiased
attacker's error) and its lower bound σ·√(tr JᵀJ)/λ_max (never above it: Σ1/λ ≥ tr/λ_max²), from the same
spectra; :class:`WarmBasis`, :class:`FullPrecision` and :class:`ExactSpectra` keep the damped and undamped
engine figures for reproducing the paper (with no noise they are per unit σ).

One road: :func:`leakage_report` builds the per-sample operator (:class:`PerSampleOperator`) once and hands it
to an estimator, which returns an :class:`Estimate`; the report and its summaries follow.
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

from pl_i2f import calibrated as cal
from pl_i2f.defenses import Defense, NoiseSampler
from pl_i2f.defenses.base import analysis_model
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import eval_mode
from pl_i2f.influence import PerSampleLeakage
from pl_i2f.influence.damping import Damping
from pl_i2f.influence.per_sample import METHODS, PerSampleOperator, operator_leakage
from pl_i2f.influence.settings import default_rcond
from pl_i2f.influence.warm import BASIS_RCOND, BasisLeakage, basis_leakage, exact_spectra
from pl_i2f.threat import SampleNoise

LANCZOS_CHAINS = 4  # Lanczos chains per probe sample at full precision (FullPrecision)
EXACT_MAX_DIM = 1024  # inputs of at most this many values get exact spectra (d_x products per sample)
DEFAULT_TARGET_PIXEL_RMSE = 0.1  # ≈ 20 dB PSNR: an attacker's reconstruction this far off is a blur
MONITOR_CHAINS = 1  # one Lanczos chain per probe for the monitor's Monte Carlo over a sampler's draws
MONITOR_LAMBDA_TOL = 1e-2  # its λ_max tolerance: a monitoring figure, whose spread over probes is logged
CONVERGED_RESIDUAL = 1e-2  # a Ritz λ_max counts as converged when its residual is below this share of it
NYSTROM_RANK = 64  # the sketch's rank beyond EXACT_MAX_DIM (its bounds say how much that leaves out)
NYSTROM_PROBES = 8  # Hutchinson vectors per probe for the sketch's residual trace
SKETCH_TARGET_MAX_DB = 1.0  # a sketch's σ-for-target is logged only where its bounds there are this tight
ROUTES = ("exact", "sketch")  # Calibrated's: explicit per-probe Jacobians, or a Nyström sketch from products


#: What each key of a calibrated report means (logged under ``leakage/``). Pixel values are on the [0, 1] scale.
LEAKAGE_KEYS: dict[str, str] = {
    "expected_attack_psnr": "headline: 20·log10(1/expected_pixel_rmse), the Gaussian-prior attacker's expected PSNR "
                            "(absent when that RMSE is 0: no noise and every probe determined)",
    "expected_pixel_rmse": "sqrt(mean over probes of each probe's expected per-pixel MSE), prior-aware",
    "expected_pixel_rmse_stderr": "standard error over the probes of their expected pixel RMSEs",
    "prior_pixel_rmse": "the same RMSE of guessing the data mean (nothing learned from the gradient)",
    "prior_psnr": "20·log10(1/prior_pixel_rmse)",
    "gain_over_prior_db": "expected_attack_psnr − prior_psnr: what the released gradient adds to the prior",
    "determined_fraction": "share of probes whose input the noiseless gradient determines (rank JᵀJ = d_x)",
    "sigma_for_target": "Gaussian σ on the mean gradient of a batch of B (σ on the sample with batch_of_one) that "
                        "brings expected_pixel_rmse to target_pixel_rmse (isotropic unclipped noise only; the "
                        "*_for_target keys of a sketch only where its bounds there are within 1 dB)",
    "noise_multiplier_for_target": "DP-SGD noise multiplier for the target at the run's clipping norm (the monitor's "
                                   "clipping_norm without DP-SGD), on the clipped Gram",
    "noise_scale_for_target": "factor on the current noise (anisotropic: its whole covariance) for the target",
    "target_pixel_rmse": "the target those σ are solved for",
    "noise_std": "std of the noise on one sample's own gradient (σC under DP-SGD, Bσ for gaussian); absent "
                 "without noise or with a non-isotropic covariance",
    "clip_norm": "DP-SGD's clipping norm C (the Jacobian is the clipped gradient's)",
    "error_half_width_db": "Nyström route only (inputs above 1,024 values, or sketched evaluations): half-width "
                           "of its bounds, in dB",
    "sketch_rank": "rank of the Nyström sketch (sketched evaluations only)",
    "probes": "probes this evaluation covered", "measured_at_step": "the step evaluated",
    "oldest_probe_step": "monitor: the oldest last-measured step among the probes (rotating subsets)",
    "lambda_max": "mean λ_max of the (noise-whitened) JᵀJ", "lambda_min": "mean λ_min (exact route)",
    "condition_number": "median λ_max/λ_min (exact route)",
    "worst_k_pixel_rmse": "pooled expected pixel RMSE of the worst_k most exposed probes",
    "unfairness_p90_p10": "90th/10th percentile ratio of the probes' expected RMSEs",
    "unfairness_cv": "their coefficient of variation",
    "paper/expected_i2f_pixel_rmse": "the paper's undamped I²F σ·√(Σ1/λ)/√d_x·pixel std (the unbiased attacker); "
                                     "with noise only",
    "paper/lower_bound_pixel_rmse": "the paper's lower bound σ·√tr(JᵀJ)/λ_max, same scale; never above the I²F "
                                    "it bounds (the prior-aware headline can be below both: it uses the prior)",
}


NoiseLike = Defense | SampleNoise | Any  # a defense, a pl_i2f.sources.NoiseSource, or the noise itself


def noise_of(source: NoiseLike, step: int, model: nn.Module | None = None, *,
             batch_size: int | None = None, batch_of_one: bool = False) -> SampleNoise:
    """The noise on one sample's own gradient at ``step`` (:mod:`pl_i2f.threat`): ``source`` itself when it is a
    :class:`SampleNoise`, else its ``sample_noise`` (a :class:`Defense` relative to ``batch_size`` — its own
    training batch by default — or a single sample's gradient with ``batch_of_one``)."""
    if isinstance(source, SampleNoise):
        return source
    if isinstance(source, Defense):
        return source.sample_noise(step, model, batch_size=batch_size, batch_of_one=batch_of_one)
    return source.sample_noise(step, model)


def _paper_noise(noise: SampleNoise, operator: PerSampleOperator) -> tuple[float | None, NoiseSampler | None]:
    """(σ, sampler) for the paper's engine estimators: σ = 1 with no noise (per unit σ), σ for isotropic
    noise, else Monte Carlo draws (the clipping is not represented there: the unclipped Jacobian)."""
    if noise.is_zero:
        return 1.0, None
    if noise.isotropic:
        return float(noise.std), None
    return None, noise.draws(torch.empty(operator.d_theta, dtype=operator.like.dtype, device=operator.like.device))


@dataclass
class Snapshot:
    """What an evaluation needs, frozen at its step: the weights (hook-free) and the noise on a sample there."""

    step: int
    model: nn.Module
    noise: SampleNoise

    @classmethod
    def of(cls, model: nn.Module, defense: NoiseLike, step: int, copy_weights: bool = False) -> Snapshot:
        """``model``'s weights at ``step`` (a copy with ``copy_weights``: training will change them before the
        evaluation runs) and ``defense``'s noise there."""
        analysed = analysis_model(model)  # hook-free (a copy already) under DP-SGD
        if copy_weights and analysed is model:
            analysed = copy.deepcopy(model)
        return cls(step=step, model=analysed, noise=noise_of(defense, step, analysed))


Posterior = cal.PosteriorSpectrum | cal.NystromSpectrum


@dataclass
class LeakageReport:
    """Per-sample leakage of a probe batch and its summaries (see the module docstring for scales).
    ``posterior``: the prior-aware spectrum (:class:`Calibrated`; ``None`` for the paper's engine estimators)."""

    per_sample: PerSampleLeakage
    labels: Tensor
    pixel_std: float
    noise: SampleNoise
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    per_class: dict[int, float] = field(default_factory=dict)
    worst: list[tuple[int, float]] = field(default_factory=list)
    basis: BasisLeakage | None = None  # a WarmBasis estimate's basis and products, for the next evaluation
    seconds: dict[str, float] = field(default_factory=dict)  # {"estimate": …, "spectra": …} by the report's clock
    posterior: Posterior | None = None
    coverage: Any = None  # which of a monitor's probes it covers (pl_i2f.monitoring.Coverage)
    plan: Any = None  # how a monitor ran it: route, rank (pl_i2f.monitoring.Plan)

    @property
    def pixel_rmse(self) -> Tensor:
        """Per-sample expected reconstruction RMSE on the [0, 1] pixel scale: the prior-aware one when the report
        has it, else the paper's I²F (per unit σ without noise)."""
        if self.posterior is not None:
            return (self.posterior.error() / self.posterior.dim).clamp_min(0).sqrt()
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
    """PSNR (dB) of reconstructions with these [0, 1]-pixel RMSEs: 20·log10(1/RMSE) (data range 1). A
    reconstruction in [0, 1] is never further than RMSE 1 from the image, so a larger predicted error scores
    0 dB, not a negative PSNR."""
    return -20 * torch.log10(torch.as_tensor(pixel_rmse).double().clamp(1e-30, 1.0))


def pooled_pixel_rmse(per_probe_mse: Tensor) -> float:
    """sqrt(mean over probes of each probe's per-pixel MSE): the RMSE whose PSNR the summary reports."""
    return float(per_probe_mse.double().mean().clamp_min(0).sqrt())


def _pooled(posterior: Posterior, scale: float | None = None) -> float:
    return pooled_pixel_rmse(posterior.error(scale) / posterior.dim)


def _prior_rmse(posterior: Posterior) -> float:
    if isinstance(posterior, cal.PosteriorSpectrum):
        return pooled_pixel_rmse(posterior.prior_error() / posterior.dim)
    return math.sqrt(max(posterior.prior_total, 0.0) / posterior.dim)


def scale_for_target(posterior: Posterior, target_pixel_rmse: float) -> float:
    """The noise scale s on the sample's gradient (the posterior's own noise shape) at which the pooled pixel
    RMSE reaches ``target_pixel_rmse``: 0 when no noise is needed, ∞ when no noise reaches it (the prior's own
    error is below the target). Monotone in s: a bracketing root finder (:func:`pl_i2f.calibrated.scale_for_target`)."""
    if isinstance(posterior, cal.PosteriorSpectrum):  # noiseless directions stay observed however large s
        return posterior.scale_for_target(target_pixel_rmse)
    return cal.scale_for_target(lambda s: _pooled(posterior, s), target_pixel_rmse, _pooled(posterior, 0.0),
                                _prior_rmse(posterior))


def _headline(posterior: Posterior, noise: SampleNoise, options: LeakageOptions,
              clipped: Posterior | None) -> dict[str, float]:
    """The prior-aware keys of one report (see :data:`LEAKAGE_KEYS`)."""
    rmse, prior_rmse = _pooled(posterior), _prior_rmse(posterior)
    out = {
        "expected_pixel_rmse": rmse,
        "prior_pixel_rmse": prior_rmse,
        "prior_psnr": float(attack_psnr(prior_rmse)),
        "target_pixel_rmse": float(options.target_pixel_rmse),
    }
    if rmse > 0:  # RMSE 0 (no noise, every probe determined): exact recovery to first order, no finite PSNR
        out["expected_attack_psnr"] = float(attack_psnr(rmse))
        out["gain_over_prior_db"] = out["expected_attack_psnr"] - out["prior_psnr"]
    if isinstance(posterior, cal.PosteriorSpectrum):
        out["determined_fraction"] = posterior.determined_fraction()
    else:
        out["error_half_width_db"] = _half_width_db(posterior)
    target = _stated_scale(posterior, options.target_pixel_rmse)
    if noise.clip_norm is None and noise.basis is None:
        # Gaussian σ on the mean gradient of B: noise Bσ on the sample (1 with batch_of_one)
        per_unit = 1 if noise.batch_of_one or not options.batch_size else options.batch_size
        out["sigma_for_target"] = target / per_unit
    if not noise.is_zero and noise.basis is not None:
        out["noise_scale_for_target"] = target / noise.std if noise.std > 0 else target
    if clipped is not None:
        clip = noise.clip_norm or options.clipping_norm
        out["noise_multiplier_for_target"] = _stated_scale(clipped, options.target_pixel_rmse) / clip
    return out


def _stated_scale(posterior: Posterior, target_pixel_rmse: float) -> float:
    """:func:`scale_for_target`, NaN (not logged) for a sketch whose bounds at that scale are wider than
    ``SKETCH_TARGET_MAX_DB``: a small sketch's σ-for-target sits where the noise is small and its bounds wide
    (off by up to 2× at rank 8 on trained weights), a figure without a stated error."""
    scale = scale_for_target(posterior, target_pixel_rmse)
    if isinstance(posterior, cal.NystromSpectrum) and not _half_width_db(posterior, scale) <= SKETCH_TARGET_MAX_DB:
        return math.nan
    return scale


def _half_width_db(posterior: cal.NystromSpectrum, scale: float | None = None) -> float:
    """The Nyström bounds' half-width on the pooled RMSE, in dB of PSNR (at the noise ``scale``; default its own)."""
    if scale is not None and not math.isfinite(scale):
        return math.inf
    lo, hi = posterior.bounds(scale)
    lo_rmse, hi_rmse = pooled_pixel_rmse(lo / posterior.dim), pooled_pixel_rmse(hi / posterior.dim)
    return float(attack_psnr(lo_rmse) - attack_psnr(hi_rmse)) / 2 if hi_rmse > 0 else 0.0


def _paper(report: LeakageReport) -> dict[str, float]:
    """The paper's quantities, with a noise only (with none they are per unit σ, which no attack scores)."""
    result = report.per_sample
    if report.noise.is_zero or result.expected_i2f_rmse is None:
        return {}
    out = {"paper/expected_i2f_pixel_rmse": float(result.expected_i2f_rmse.mean()) * report.pixel_std}
    if result.lower_bound is not None:
        out["paper/lower_bound_pixel_rmse"] = float(result.lower_bound.mean()) / math.sqrt(
            report.posterior.dim if report.posterior is not None else _dim(result)) * report.pixel_std
    if result.damping:
        out["paper/damping"] = float(result.damping)
    return out


def _dim(result: PerSampleLeakage) -> int:
    ratio = result.expected_i2f / result.expected_i2f_rmse
    return round(float(ratio[0]) ** 2) if len(ratio) and float(result.expected_i2f_rmse[0]) > 0 else 1


def _summarise(report: LeakageReport, options: LeakageOptions, unit_pixel: Tensor | None,
               clipped: Posterior | None) -> None:
    """Fill ``report.scalars``, ``per_class`` and ``worst`` from its per-sample values."""
    result, noise = report.per_sample, report.noise
    pixel = report.pixel_rmse.detach().double().cpu()
    k = len(pixel)
    scalars = {
        "probes": float(k),
        "measured_at_step": float(report.step),
        "lambda_max": float(result.lambda_max.mean()),
    }
    if k > 1:
        scalars["expected_pixel_rmse_stderr"] = float(pixel.std() / math.sqrt(k))
    if noise.isotropic and not noise.is_zero:
        scalars["noise_std"] = float(noise.std)  # on the sample's own gradient (the threat model's scale)
    if noise.clip_norm is not None:
        scalars["clip_norm"] = float(noise.clip_norm)
    if report.posterior is not None:
        scalars.update(_headline(report.posterior, noise, options, clipped))
        scalars.update(_paper(report))
    else:  # the paper's engine estimators: their own figure, per unit σ without noise
        scalars.update({
            "expected_i2f_pixel_rmse": float(pixel.mean()),
            "per_unit_noise": float(noise.per_unit),
            "converged_fraction": float(result.converged.double().mean()),
            "damping": float(result.damping),
            "lower_bound": float(result.lower_bound.mean()),
        })
        if not noise.per_unit:
            scalars["expected_attack_psnr"] = float(attack_psnr(pixel.pow(2).mean().sqrt()))
        if unit_pixel is not None:
            scalars["sigma_for_target"] = options.target_pixel_rmse / float(unit_pixel.double().mean())
    if k > 1:  # a spread needs two probes: one probe has no unfairness to report (not 0, not 1)
        scalars.update(unfairness(pixel))
    order = torch.argsort(pixel, descending=True)[: max(0, options.worst_k)]
    report.worst = [(int(i), float(pixel[i])) for i in order]
    if report.worst:
        scalars["worst_k_pixel_rmse"] = float(pixel[order].pow(2).mean().sqrt())
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
    pixels; ``value_scale`` the exact per-value one, when known), the data ``prior`` (the calibrated
    estimator's attacker; a :class:`~pl_i2f.calibrated.GaussianPrior` or τ²), the exact λ_min of the first
    ``exact_spectrum_probes`` probes for the engine estimators (inputs of at most ``exact_max_dim`` values),
    ``worst_k`` samples listed, the σ-for-target settings (``target_pixel_rmse``; ``batch_size`` B turns the
    sample's noise into σ on the mean; ``clipping_norm`` prices DP-SGD's noise multiplier for a run that does
    not clip), and, for the paper's engine estimators, their damping and ``noise_draws``."""

    pixel_std: float = 1.0
    prior: cal.GaussianPrior | float | None = None
    value_scale: Tensor | None = None
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
    """What an estimator returns: the per-sample values; ``unit_pixel`` the pixel RMSE at σ = 1 (the engine
    estimators' σ-for-target; ``None`` when the noise has no single σ); ``spectra`` its own exact λ_min/λ_max
    when it has them; ``basis`` the warm-start state for the next evaluation; ``posterior`` (and ``clipped``, the
    clipped Gram's, for a noise multiplier) the prior-aware spectra; ``scalars`` extra logged values."""

    per_sample: PerSampleLeakage
    unit_pixel: Tensor | None = None
    spectra: SpectrumEnds | None = None
    basis: BasisLeakage | None = None
    posterior: Posterior | None = None
    clipped: Posterior | None = None
    scalars: dict[str, float] = field(default_factory=dict)


class Estimator(Protocol):
    """Turns the per-sample operator of an evaluation into an :class:`Estimate`. ``dtype``: the precision the
    operator is built in (``None``: the model's own). Runs with the model in eval mode."""

    dtype: torch.dtype | None

    def estimate(self, operator: PerSampleOperator, noise: SampleNoise, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate: ...


def _prior_of(options: LeakageOptions, d_x: int) -> cal.GaussianPrior:
    prior = options.prior
    if prior is None:
        raise ConfigError("the calibrated leakage estimate needs the data prior (LeakageOptions.prior: a "
                          "GaussianPrior, e.g. datamodule.data_prior(), or a per-value variance τ²)")
    if isinstance(prior, (int, float)):
        return cal.isotropic_prior(0.0, float(prior), dim=d_x)
    if prior.dim != d_x:
        raise ConfigError(f"the prior has {prior.dim} values, the probes {d_x}")
    return prior


def _value_scale(options: LeakageOptions, d_x: int, like: Tensor) -> Tensor:
    if options.value_scale is not None:
        return options.value_scale.to(torch.float64)
    return torch.full((d_x,), float(options.pixel_std), dtype=torch.float64)


@dataclass
class Calibrated:
    """The headline: the prior-aware expected error (:mod:`pl_i2f.calibrated`) under the sample's own noise.

    Inputs of at most ``exact_max_dim`` values: exact, from every probe's explicit Jacobian
    (:func:`pl_i2f.calibrated.exact_posteriors`; DP-SGD's clipped Gram, an anisotropic defense's covariance by
    Woodbury). Beyond: a rank-``rank`` Nyström sketch of each probe's whitened x-side Gram from products only
    (:func:`pl_i2f.calibrated.nystrom_spectrum`, its bounds logged as ``error_half_width_db``); isotropic noise,
    clipped or not, there. ``clip_for_target``: also the clipped spectrum at ``options.clipping_norm`` when the
    noise itself is not clipped, so a run without DP-SGD gets a noise multiplier for its target too.

    ``route``: ``"exact"`` or ``"sketch"`` forces one (the monitor sketches its middle evaluations when exact
    Grams for enough probes do not fit its budget); ``None`` picks by ``exact_max_dim``."""

    exact_max_dim: int = EXACT_MAX_DIM
    rank: int = NYSTROM_RANK
    probes: int = NYSTROM_PROBES
    clip_for_target: bool = True
    dtype: torch.dtype | None = None
    route: str | None = None

    def __post_init__(self) -> None:
        if self.route not in (None, *ROUTES):
            raise ConfigError(f"Calibrated.route must be one of {', '.join(ROUTES)} or None, got {self.route!r}")
        if self.rank < 1 or self.probes < 1:
            raise ConfigError(f"Calibrated.rank and .probes must be >= 1, got {self.rank} and {self.probes}")

    @staticmethod
    def can_sketch(noise: SampleNoise) -> bool:
        """Whether the sketch route informs on this noise: isotropic (clipped or not; a covariance needs exact) and
        not zero — without noise its lower bound is 0 by construction (it cannot tell which unseen directions
        the gradient determines), so its midpoint would be a number without meaning."""
        return noise.isotropic and not noise.is_zero

    def estimate(self, operator: PerSampleOperator, noise: SampleNoise, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        d_x = operator.n
        prior = _prior_of(options, d_x)
        scale = _value_scale(options, d_x, operator.like)
        extra_clip = options.clipping_norm if self.clip_for_target and noise.clip_norm is None else None
        if self.route == "exact" or (self.route is None and d_x <= self.exact_max_dim):
            posterior, clipped = _exact(operator, noise, prior, scale, extra_clip)
            eigenvalues = posterior.eigenvalues
            per_sample = _paper_per_sample(operator, eigenvalues, noise)
            spectra = SpectrumEnds(eigenvalues[:, 0], eigenvalues[:, -1])
            return Estimate(per_sample=per_sample, spectra=spectra, posterior=posterior,
                            clipped=clipped if clipped is not None else (posterior if noise.clip_norm else None))
        if not noise.isotropic:
            raise ConfigError(f"the calibrated sketch (inputs above {self.exact_max_dim} values, or route='sketch') "
                              f"needs isotropic noise (this noise is {noise.source!r}); its covariance needs the "
                              "exact route")
        gen = generator if generator is not None else torch.Generator(device=operator.like.device).manual_seed(0)
        products = _ReusedProducts(operator)
        posterior = self._sketch(operator, products, noise.clip_norm, noise.std, prior, scale, gen)
        clipped = None
        if noise.clip_norm is not None:
            clipped = posterior
        elif extra_clip is not None:  # same seed, same vectors: the clipped Gram's products come from the same call
            clipped = self._sketch(operator, products, extra_clip, 0.0, prior, scale, gen)
        lam = posterior.mu.amax(-1)  # whitened λ_max (of S G S): the sketch's own spectrum
        per_sample = PerSampleLeakage(
            lambda_max=lam, lambda_min=None, trace=None, expected_jdelta=None, lower_bound=None, expected_i2f=None,
            expected_i2f_rmse=None, converged=torch.ones_like(lam, dtype=torch.bool), iterations=self.rank,
            method="nystrom", damping=0.0, labels=operator.y)
        return Estimate(per_sample=per_sample, posterior=posterior, clipped=clipped,
                        scalars={"sketch_rank": float(posterior.mu.shape[-1])})

    def _sketch(self, operator: PerSampleOperator, products: _ReusedProducts, clip: float | None, std: float,
                prior: cal.GaussianPrior, scale: Tensor, generator: torch.Generator) -> cal.NystromSpectrum:
        like = operator.like
        factor, unit_jtg = None, None
        if clip is not None:  # G_c v = (C/‖g‖)²(Gv − u uᵀv), u = Jᵀĝ, where ‖g‖ > C (clipped_gram, by products)
            g = operator.gradients()
            norm = g.norm(dim=1)
            unit_jtg = operator.transpose_apply(g / norm[:, None].clamp_min(torch.finfo(g.dtype).tiny)).double()
            factor = torch.where(norm > clip, clip / norm, torch.ones_like(norm)).double()

        def apply(v: Tensor) -> Tensor:  # (d, m) → (P, d, m)
            out = products(v)
            if factor is not None:
                clipped = factor < 1
                proj = unit_jtg[:, :, None] * (unit_jtg @ v.to(out))[:, None, :]
                out = torch.where(clipped[:, None, None], factor[:, None, None] ** 2 * (out - proj), out)
            return out

        return cal.nystrom_spectrum(apply, operator.n, self.rank, prior, scale=std, probes=self.probes,
                                    value_scale=scale, generator=generator.manual_seed(generator.initial_seed()),
                                    precision=like.dtype)


class _ReusedProducts:
    """The per-probe Gram products G V (P, d, m) of a block V shared by every probe, the last block's kept: the
    clipped sketch for the noise multiplier draws the same vectors and reuses the call."""

    def __init__(self, operator: PerSampleOperator):
        self.operator = operator
        self.last: tuple[Tensor, Tensor] | None = None

    def __call__(self, v: Tensor) -> Tensor:
        if self.last is not None and self.last[0].shape == v.shape and torch.equal(self.last[0], v):
            return self.last[1]
        op = self.operator
        shared = v.T.to(op.like).unsqueeze(0).expand(op.N, -1, -1).contiguous()
        out = op.gram(shared).transpose(-1, -2).double()
        self.last = (v, out)
        return out


def _exact(operator: PerSampleOperator, noise: SampleNoise, prior: cal.GaussianPrior, scale: Tensor,
           extra_clip: float | None) -> tuple[cal.PosteriorSpectrum, cal.PosteriorSpectrum | None]:
    """:func:`pl_i2f.calibrated.exact_posterior_pair` on the operator's probes (with ``extra_clip``: the clipped
    Gram's spectrum too, noise shape I: only its scale-free σ-for-target is read)."""
    return cal.exact_posterior_pair(operator.model, operator.x, operator.y, noise, prior, clip=extra_clip,
                                    value_scale=scale, loss_fn=operator.loss_fn)


def _paper_per_sample(operator: PerSampleOperator, eigenvalues: Tensor, noise: SampleNoise) -> PerSampleLeakage:
    """The paper's per-sample figures from the noise-whitened Gram's exact spectrum (per unit noise scale):
    undamped I²F s·√(Σ1/λ) over the eigenvalues above the rank threshold, ‖Jδ‖ = s·√tr, lower bound ‖Jδ‖/λ_max."""
    n = operator.n
    s = float(noise.std) if noise.std > 0 else 1.0
    lam = eigenvalues.double()
    kept = lam > default_rcond(n, torch.float64) * lam[:, -1:]
    inverse_sum = torch.where(kept, 1.0 / lam.where(kept, torch.ones_like(lam)), 0.0).sum(-1)
    lam_max, trace = lam[:, -1], lam.clamp_min(0).sum(-1)
    expected_i2f = s * inverse_sum.sqrt()
    expected_jdelta = s * trace.sqrt()
    return PerSampleLeakage(
        lambda_max=lam_max, lambda_min=lam[:, 0], trace=trace, expected_jdelta=expected_jdelta,
        lower_bound=expected_jdelta / lam_max, expected_i2f=expected_i2f, expected_i2f_rmse=expected_i2f / math.sqrt(n),
        converged=torch.ones_like(kept[:, 0]), iterations=n, method="exact_posterior", damping=0.0,
        labels=operator.y)


@dataclass
class FullPrecision:
    """The paper's damped I²F: stochastic Lanczos quadrature (``method="slq"``: ``chains`` Lanczos chains per
    probe, λ_max to 1e-4) or every sample's dense JJᵀ (``"exact"``, d_x products each; gives λ_min):
    :func:`pl_i2f.influence.per_sample.operator_leakage`. Non-isotropic noise: Monte Carlo over its draws."""

    method: str = "slq"
    chains: int = LANCZOS_CHAINS
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be 'slq' or 'exact', got {self.method!r}")

    def estimate(self, operator: PerSampleOperator, noise: SampleNoise, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        std, sampler = _paper_noise(noise, operator)
        result = operator_leakage(
            operator, noise_std=std, noise_sampler=sampler, damping=options.damping,
            relative_damping=options.relative_damping, method=self.method, noise_draws=options.noise_draws,
            chains=self.chains, generator=generator,
        )
        unit = None if std is None else (result.expected_i2f_rmse * options.pixel_std).detach() / std
        spectra = None if result.lambda_min is None else SpectrumEnds(result.lambda_min, result.lambda_max)
        return Estimate(per_sample=result, unit_pixel=unit, spectra=spectra)


@dataclass
class WarmBasis:
    """The paper's damped I²F at monitoring precision: one Lanczos basis of ``steps`` vectors per probe
    (:func:`pl_i2f.influence.warm.basis_leakage`), warm-started from ``basis`` (the previous evaluation's,
    returned in the report for the next call) — two block products instead of a fresh Lanczos run; one
    Rademacher vector per probe. Isotropic noise uses E‖I²F‖ = σ·(its value at σ = 1); other noise adds Monte
    Carlo over its draws on the same operator. Within 5% of :class:`FullPrecision` along a digits run (tested).

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

    def estimate(self, operator: PerSampleOperator, noise: SampleNoise, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        damping = Damping.request(options.damping, relative=options.relative_damping, d_x=operator.n,
                                  dtype=operator.like.dtype, caller="the leakage monitor", rcond=BASIS_RCOND)
        fit = basis_leakage(operator, damping, steps=self.steps, basis=self.basis, generator=generator,
                            keep_going=self._keep_going())
        n = operator.n
        unit = fit.unit_i2f_sq.clamp_min(0).sqrt()
        std, sampler = _paper_noise(noise, operator)
        if std is not None:
            expected_i2f = std * unit
            expected_jdelta = std * fit.trace.clamp_min(0).sqrt()
            converged = fit.lambda_max_residual <= CONVERGED_RESIDUAL * fit.lambda_max.abs()
            damping_used = fit.damping
        else:  # a sampler: Monte Carlo over its draws, at the damping the basis chose
            mc = operator_leakage(operator, noise_sampler=sampler, damping=fit.damping, chains=MONITOR_CHAINS,
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
    """The paper's **undamped** expected I²F from every eigenvalue of each probe's JᵢJᵢᵀ, in ``dtype`` (float64 by
    default): σ·√(Σᵢ 1/λᵢ), eigenvalues at or below the rank threshold d_x·u·λ_max counting as null directions
    (as in the pseudo-inverse). Isotropic noise only (no noise: per unit σ); see :func:`undamped_leakage`."""

    dtype: torch.dtype | None = torch.float64

    def estimate(self, operator: PerSampleOperator, noise: SampleNoise, options: LeakageOptions,
                 generator: torch.Generator | None) -> Estimate:
        std, _ = _paper_noise(noise, operator)
        if std is None:
            raise ValueError("ExactSpectra needs isotropic noise (a single σ to scale the spectrum by)")
        eigenvalues = exact_spectra(operator)
        result = _paper_per_sample(operator, eigenvalues, SampleNoise(std=std))
        result.method = "exact_spectra"
        unit = (result.expected_i2f_rmse * options.pixel_std).detach() / std
        return Estimate(per_sample=result, unit_pixel=unit, spectra=SpectrumEnds(eigenvalues[:, 0],
                                                                                 eigenvalues[:, -1]))


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
    cal.exact_posteriors(net, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), SampleNoise(std=1.0), 1.0)


def warm_up_transforms(model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None,
                       loss_fn: Callable | None = None) -> None:
    """torch.func's one-off set-up (the explicit Jacobians' vmap over forward-mode products), paid once per process
    on a tiny model, so that it does not count as the price of a probe; with ``model`` and a probe ``(x, y)``
    also the one-off costs of the sketch's block product on that network (a rank-1 sketch of one probe), which
    would otherwise double the first sketch's price."""
    _warm_up_torch_func()
    if model is not None and x is not None and y is not None:
        device = next(model.parameters()).device
        leakage_report(model, x[:1].to(device), y[:1].to(device), SampleNoise(std=1.0),
                       LeakageOptions(prior=1.0, clipping_norm=1.0), Calibrated(route="sketch", rank=1, probes=1),
                       loss_fn=loss_fn)


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
