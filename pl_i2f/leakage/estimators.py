"""The estimators :func:`pl_i2f.leakage.leakage_report` hands its per-sample operator to: the calibrated headline
(:class:`Calibrated`) and the paper's engine figures (:class:`WarmBasis`, :class:`FullPrecision`,
:class:`ExactSpectra`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pl_i2f import calibrated as cal
from pl_i2f import sketch as sk
from pl_i2f.errors import ConfigError
from pl_i2f.influence import PerSampleLeakage
from pl_i2f.influence.damping import Damping
from pl_i2f.influence.jacobian import chain_route
from pl_i2f.influence.per_sample import METHODS, PerSampleOperator, operator_leakage
from pl_i2f.influence.settings import default_rcond
from pl_i2f.influence.warm import BASIS_RCOND, basis_leakage, exact_spectra
from pl_i2f.leakage.report import (
    CONVERGED_RESIDUAL,
    EXACT_MAX_DIM,
    LANCZOS_CHAINS,
    MONITOR_CHAINS,
    MONITOR_LAMBDA_TOL,
    NYSTROM_PROBES,
    NYSTROM_RANK,
    ROUTES,
    Estimate,
    LeakageOptions,
    SpectrumEnds,
    _paper_noise,
)
from pl_i2f.threat import SampleNoise


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
    Grams for enough probes do not fit its budget); ``None`` picks by ``exact_max_dim``.

    ``span`` (exact route): where the prior is singular, the Jacobians on the data's span only — the same error,
    several times cheaper (:func:`pl_i2f.calibrated.exact_posterior_pair`); λ_min, λ_max and the condition number
    are then those of JᵀJ on that span, and the paper's full-space figures (undamped I²F, its lower bound) are
    not formed (``span=False`` forms them, over every input value)."""

    exact_max_dim: int = EXACT_MAX_DIM
    rank: int = NYSTROM_RANK
    probes: int = NYSTROM_PROBES
    clip_for_target: bool = True
    dtype: torch.dtype | None = None
    route: str | None = None
    span: bool = True

    def __post_init__(self) -> None:
        if self.route not in (None, *ROUTES):
            raise ConfigError(f"Calibrated.route must be one of {', '.join(ROUTES)} or None, got {self.route!r}")
        if self.rank < 1 or self.probes < 1:
            raise ConfigError(f"Calibrated.rank and .probes must be >= 1, got {self.rank} and {self.probes}")

    @staticmethod
    def exact_columns(prior: cal.GaussianPrior | float, d_x: int) -> int:
        """Forward-mode products per probe of the exact route: the data span's rank where the prior is singular
        (``span``), else d_x — what the monitor prices an exact probe in."""
        support = cal.prior_support(prior) if isinstance(prior, cal.GaussianPrior) else None
        return d_x if support is None else int(support[1].numel())

    @staticmethod
    def exact_by_chain(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None) -> bool:
        """Whether the exact route runs ``model`` on ``(x, y)`` by batched matrix products
        (:mod:`pl_i2f.influence.chain`): there exact Grams cost about what the smallest sketch costs at 8 probes
        and half as much at 1 (the sketch's products run through ``torch.func``, whose one-off set-up a run on
        this route never pays otherwise), so a monitor need not sketch."""
        return chain_route(model, x, y, loss_fn) is not None

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
            posterior, clipped = _exact(operator, noise, prior, scale, extra_clip, self.span)
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
                prior: cal.GaussianPrior, scale: Tensor, generator: torch.Generator) -> sk.NystromSpectrum:
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

        return sk.nystrom_spectrum(apply, operator.n, self.rank, prior, scale=std, probes=self.probes,
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
           extra_clip: float | None, span: bool) -> tuple[cal.PosteriorSpectrum, cal.PosteriorSpectrum | None]:
    """:func:`pl_i2f.calibrated.exact_posterior_pair` on the operator's probes (with ``extra_clip``: the clipped
    Gram's spectrum too, noise shape I: only its scale-free σ-for-target is read)."""
    return cal.exact_posterior_pair(operator.model, operator.x, operator.y, noise, prior, clip=extra_clip,
                                    value_scale=scale, loss_fn=operator.loss_fn, span=span)


def _paper_per_sample(operator: PerSampleOperator, eigenvalues: Tensor, noise: SampleNoise) -> PerSampleLeakage:
    """The paper's per-sample figures from the noise-whitened Gram's exact spectrum (per unit noise scale):
    undamped I²F s·√(Σ1/λ) over the eigenvalues above the rank threshold, ‖Jδ‖ = s·√tr, lower bound ‖Jδ‖/λ_max.
    A spectrum on the data's span only (fewer eigenvalues than input values) gives λ_max and λ_min alone: the
    paper's figures sum over every input direction."""
    n = operator.n
    lam = eigenvalues.double()
    if lam.shape[-1] < n:
        return PerSampleLeakage(
            lambda_max=lam[:, -1], lambda_min=lam[:, 0], trace=None, expected_jdelta=None, lower_bound=None,
            expected_i2f=None, expected_i2f_rmse=None, converged=torch.ones_like(lam[:, 0], dtype=torch.bool),
            iterations=lam.shape[-1], method="exact_posterior_span", damping=0.0, labels=operator.y)
    s = float(noise.std) if noise.std > 0 else 1.0
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
