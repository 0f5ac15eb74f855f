"""The leakage report: its keys, options, result types and summaries (see :mod:`pl_i2f.leakage`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pl_i2f import calibrated as cal
from pl_i2f import sketch as sk
from pl_i2f.defenses import Defense, NoiseSampler
from pl_i2f.defenses.base import analysis_model
from pl_i2f.influence import PerSampleLeakage
from pl_i2f.influence.per_sample import PerSampleOperator
from pl_i2f.influence.warm import BasisLeakage
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
    "determined_fraction": "share of probes whose input the noiseless gradient determines (rank JᵀJ = d_x; on the "
                           "data's span where the prior is singular: the directions the inputs vary in)",
    "sigma_for_target": "Gaussian σ on the mean gradient of a batch of B (σ on the sample with batch_of_one) that "
                        "brings expected_pixel_rmse to target_pixel_rmse (isotropic unclipped noise only; the "
                        "*_for_target keys of a sketch only where its bounds there are within 1 dB)",
    "noise_multiplier_for_target": "DP-SGD noise multiplier for the target at the run's clipping norm (the monitor's "
                                   "clipping_norm without DP-SGD), on the clipped Gram; without DP-SGD a second "
                                   "spectrum, which the monitor under a budget computes at its first and final "
                                   "evaluations only",
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
    "lambda_max": "mean λ_max of the (noise-whitened) JᵀJ — on the data's span where the prior is singular",
    "lambda_min": "mean λ_min (exact route; on the data's span likewise)",
    "condition_number": "median λ_max/λ_min (exact route; on the data's span likewise)",
    "worst_k_pixel_rmse": "pooled expected pixel RMSE of the worst_k most exposed probes",
    "unfairness_p90_p10": "90th/10th percentile ratio of the probes' expected RMSEs",
    "unfairness_cv": "their coefficient of variation",
    "paper/expected_i2f_pixel_rmse": "the paper's undamped I²F σ·√(Σ1/λ)/√d_x·pixel std (the unbiased attacker); "
                                     "with noise only, over every input value (not from a data-span estimate)",
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


Posterior = cal.PosteriorSpectrum | sk.NystromSpectrum


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
    if isinstance(posterior, sk.NystromSpectrum) and not _half_width_db(posterior, scale) <= SKETCH_TARGET_MAX_DB:
        return math.nan
    return scale


def _half_width_db(posterior: sk.NystromSpectrum, scale: float | None = None) -> float:
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
