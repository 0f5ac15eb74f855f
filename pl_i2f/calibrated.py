"""The prior-aware expected reconstruction error: what a Gaussian-prior attacker achieves, at every noise level.

An attacker observes one sample's released gradient g(x) + n, n ~ N(0, s²Σ_n) (the shared threat model of
:mod:`pl_i2f.threat`), and knows a Gaussian prior x ~ N(μ, Σ_x) of the data. Linearising g around x, the
Bayes-optimal (MAP = posterior-mean) attacker has expected squared error (van Trees / Bayesian Cramér–Rao)

    E‖x̂ − x‖² = tr((JᵀΣ_n⁻¹J/s² + Σ_x⁻¹)⁻¹),            J = ∂g/∂x (d_θ × d_x),

which for Σ_n = I, Σ_x = τ²I is Σᵢ s²τ²/(s² + τ²λᵢ) = s² tr((JᵀJ + (s²/τ²)I)⁻¹), λᵢ the eigenvalues of
G = JᵀJ. It is the undamped I²F s²Σ1/λᵢ where s² ≪ τ²λᵢ, the prior's own error tr Σ_x (guessing the mean)
where noise dominates, and monotone in s. It is the error of a *Gaussian-prior* attacker: one with a stronger
learned prior can do better, so it is an estimate, not a guarantee.

**One eigendecomposition serves every noise level.** With S = Σ_x^{1/2} (no inverse: a singular prior — zero
variance on pixels the attacker knows — costs nothing), M = S F S = U diag(μ) Uᵀ, F = JᵀΣ_n⁻¹J the noise-
whitened Gram and wₖ = ‖D S uₖ‖² (D the per-value output scale, I in the model's input space),

    error(s) = s² tr(D S (M + s²I)⁻¹ S D) = Σₖ wₖ s² / (s² + μₖ),

O(d_x) per s (:class:`PosteriorSpectrum`). Directions of the sample's gradient that carry *no* noise (σ_iso =
0 with noise only along a basis V) are observed exactly: the prior is first conditioned on them (its
covariance loses those directions), then the noisy ones enter F.

Threat model (:mod:`pl_i2f.threat`): DP-SGD releases clip_C(gᵢ) + N(0, σ²C²) relative to the sample, so J is
the clipped gradient's Jacobian — when ‖g‖ > C, J_c = (C/‖g‖)(I − ĝĝᵀ)J and G_c = (C/‖g‖)²(G − vvᵀ),
v = Jᵀĝ (:func:`clipped_gram`, :func:`clipped_jacobian`); Gaussian noise σ on the mean of a batch of B is
noise Bσ on gᵢ (:func:`sample_noise_scale`, ``batch_of_one`` names DLG's setting).

Scales: errors are squared norms in the model's (normalised) input space unless ``value_scale`` (the
datamodule's per-value std, :func:`value_scale`) is given, which gives them on the [0, 1] pixel scale exactly
(per channel). Mean pixel RMSE over probes = sqrt(mean over probes of the per-probe MSE); the PSNR reported is
20·log10(1/RMSE) of that same mean squared error (:func:`psnr`).

Beyond d_x ≈ 1024 (ResNet-18 on CIFAR: 3072), :func:`nystrom_spectrum` sketches M from products only and
brackets the error for every s (:class:`NystromSpectrum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import brentq
from torch import Tensor

from pl_i2f.errors import ConfigError
from pl_i2f.prior import (  # noqa: F401  (re-exported: the estimator's prior, in one import)
    DTYPE,
    FULL_COVARIANCE_MAX_DIM,
    PRIOR_RANK,
    GaussianPrior,
    covariance_prior,
    estimate_prior,
    isotropic_prior,
    prior_from_dataset,
)
from pl_i2f.threat import SampleNoise, clipped_gram, clipped_jacobian

#: Relative eigenvalue threshold (× the largest, per probe) under which a direction counts as not observed.
RANK_RTOL = 1e-10

Apply = Callable[[Tensor], Tensor]


# -- the threat model: which Jacobian, which noise ----------------------------------------------------
def sample_noise_scale(std_on_mean: float, batch_size: int, *, batch_of_one: bool = False) -> float:
    """The noise std on one sample's own gradient when N(0, σ²I) is added to the mean gradient of a batch of B:
    Bσ (the sample's share of the mean is gᵢ/B). ``batch_of_one``: DLG's federated setting, σ itself."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return float(std_on_mean) if batch_of_one else float(std_on_mean) * batch_size


@dataclass(frozen=True)
class NoiseGram:
    """F = JᵀΣ_shape⁻¹J per unit noise scale s (Σ_n = s²Σ_shape), and the Gram of the directions observed
    without noise (``exact``; None when every direction carries noise), both (P, d_x, d_x) float64."""

    gram: Tensor
    exact: Tensor | None
    scale: float


def noise_gram(jacobian: Tensor, noise: SampleNoise, gradient: Tensor | None = None) -> NoiseGram:
    """The noise-whitened Gram of explicit per-probe Jacobians ``jacobian`` (P, d_θ, d_x) under ``noise``.

    Clips first when ``noise.clip_norm`` is set (needs the unclipped ``gradient`` (P, d_θ)). Noise covariance
    s²Σ_shape = std²I + V diag(extra)Vᵀ with s = std (Woodbury: Σ_shape⁻¹ = I − V diag(a/(1+a))Vᵀ, a = extra/s²),
    or, when std = 0, s = 1 and only the span of V (extra > 0) carries noise: every other direction of the
    gradient is observed exactly (:attr:`NoiseGram.exact`). Zero noise gives F = G with s = 0.
    """
    if noise.sampler is not None and noise.basis is None and noise.std == 0:
        raise ConfigError("this noise is known only through a sampler: the exact estimator needs std/basis")
    j = jacobian.to(DTYPE)
    if j.dim() == 2:
        j = j[None]
    if noise.clip_norm is not None:
        if gradient is None:
            raise ConfigError("clipped noise (DP-SGD) needs the unclipped per-sample gradient")
        j = clipped_jacobian(j, gradient.to(DTYPE).reshape(j.shape[0], -1), noise.clip_norm)
    g = j.transpose(-1, -2) @ j
    if noise.basis is None:
        return NoiseGram(gram=g, exact=None, scale=float(noise.std))
    return woodbury_gram(g, _project(noise.basis, j), noise)


def _project(basis: Tensor, jacobian: Tensor) -> Tensor:
    """Vᵀ J per probe (P, k, r) for V (d_θ, k) and J (P, d_θ, r), as one float64 matrix product over all probes."""
    p, d_theta, r = jacobian.shape
    flat = jacobian.transpose(0, 1).reshape(d_theta, p * r)
    return (basis.to(flat.device, DTYPE).T @ flat).reshape(-1, p, r).transpose(0, 1)


def woodbury_gram(gram: Tensor, basis_jacobian: Tensor, noise: SampleNoise) -> NoiseGram:
    """:func:`noise_gram` from products only: the (clipped, if DP-SGD) Gram G (P, d_x, d_x) and Vᵀ J (P, k, d_x),
    V = ``noise.basis`` — for engines that form Grams and a few projections rather than the whole J."""
    g = gram.to(DTYPE)
    b = basis_jacobian.to(DTYPE)
    extra = noise.extra_variance.to(g.device, DTYPE).reshape(-1)
    if noise.std > 0:
        a = extra / noise.std ** 2
        f = g - b.transpose(-1, -2) @ ((a / (1 + a))[:, None] * b)
        return NoiseGram(gram=f, exact=None, scale=float(noise.std))
    noisy = extra > 0
    bn = b[..., noisy, :]
    f = bn.transpose(-1, -2) @ (bn / extra[noisy][:, None])
    exact = g - bn.transpose(-1, -2) @ bn  # Jᵀ(I − V₊V₊ᵀ)J: everything outside the noisy span
    return NoiseGram(gram=f, exact=exact, scale=1.0)


# -- the spectrum: one eigendecomposition per probe, every noise level --------------------------------
@dataclass(frozen=True)
class PosteriorSpectrum:
    """error(s) = Σₖ wₖ s²/(s² + μₖ) per probe: ``mu`` and ``weights`` (P, d), ``scale`` the current noise s,
    ``dim`` d_x (for per-value means), ``determined`` whether G had full rank d_x (to RANK_RTOL),
    ``eigenvalues`` (P, d) those of the noise-whitened Gram F itself (no prior: the paper's undamped I²F)."""

    mu: Tensor
    weights: Tensor
    scale: float
    dim: int
    determined: Tensor
    eigenvalues: Tensor | None = None
    prior_total: Tensor | None = None  # (P,) tr D²Σ_x of the prior before any noiseless direction conditioned it

    def error(self, scale: float | Tensor | None = None) -> Tensor:
        """Expected squared error per probe (P,) at noise scale s (default: the current one); a (S,) tensor of
        scales gives (S, P)."""
        s = torch.as_tensor(self.scale if scale is None else scale, dtype=DTYPE, device=self.mu.device)
        s2 = s.reshape(-1, 1, 1) ** 2
        mu = self.mu.clamp_min(0)[None]
        # s = 0: the unobserved directions (μ ≈ 0 to RANK_RTOL) keep their prior weight, the others cost nothing
        unseen = (mu <= RANK_RTOL * mu.amax(-1, keepdim=True)).to(DTYPE)
        frac = torch.where(s2 > 0, s2 / (s2 + mu), unseen)
        frac = torch.where(torch.isinf(s2), torch.ones_like(frac), frac)  # s → ∞: the prior's own error
        out = (self.weights[None] * frac).sum(-1)
        return out[0] if s.dim() == 0 else out

    def mse(self, scale: float | Tensor | None = None) -> Tensor:
        """Per-value mean squared error per probe: error / d_x."""
        return self.error(scale) / self.dim

    def prior_error(self) -> Tensor:
        """Guessing the mean: tr of the data prior's covariance (scaled), per probe. (Where part of the gradient
        carries no noise, s → ∞ still leaves those directions observed: :meth:`error` then tends to less.)"""
        return self.weights.sum(-1) if self.prior_total is None else self.prior_total

    def rmse(self, scale: float | Tensor | None = None) -> Tensor:
        """sqrt(mean over probes of the per-probe MSE) — the pooled RMSE whose PSNR :func:`psnr` reports."""
        return self.mse(scale).mean(-1).sqrt()

    def psnr(self, scale: float | Tensor | None = None) -> Tensor:
        """20·log10(1/RMSE) of :meth:`rmse` (pixel scale when built with ``value_scale``)."""
        return psnr(self.rmse(scale))

    def prior_psnr(self) -> float:
        """The PSNR of guessing the mean: what an attacker gets from the prior alone."""
        return float(psnr((self.prior_error().mean() / self.dim).sqrt()))

    def determined_fraction(self) -> float:
        """Share of probes whose input the noiseless gradient determines (rank G = d_x)."""
        return float(self.determined.to(DTYPE).mean())

    def scale_for_target(self, target_rmse: float) -> float:
        """The noise scale s at which the pooled RMSE reaches ``target_rmse`` (see :func:`scale_for_target`)."""
        # the root finder's many evaluations at finite s > 0 in NumPy: the same sums, without a dozen small torch
        # calls each (which cost more than the spectra they read)
        mu, weights = self.mu.clamp_min(0).cpu().numpy(), self.weights.cpu().numpy()

        def rmse(s: float) -> float:
            s2 = s * s
            return math.sqrt(float((weights * (s2 / (s2 + mu))).sum(-1).mean()) / self.dim)

        return scale_for_target(rmse, target_rmse, float(self.rmse(0.0)), float(self.rmse(math.inf)))


def psnr(rmse: Tensor | float) -> Tensor:
    """20·log10(1/RMSE) for values on the [0, 1] scale (peak 1)."""
    return -20 * torch.log10(torch.as_tensor(rmse, dtype=DTYPE))


def _whitened(gram: Tensor, prior: GaussianPrior | Tensor) -> tuple[Tensor, Tensor]:
    """(S, S G S) with S = Σ_x^{1/2} (dense; a per-probe (P, d, d) covariance is allowed)."""
    if isinstance(prior, GaussianPrior):
        s = prior.sqrt_apply(torch.eye(prior.dim, dtype=DTYPE, device=gram.device))
    else:
        e, q = torch.linalg.eigh(prior.to(gram.device, DTYPE))
        s = (q * e.clamp_min(0).sqrt()[..., None, :]) @ q.transpose(-1, -2)
    return s, s @ gram @ s


def posterior_spectrum(gram: Tensor | NoiseGram, prior: GaussianPrior | Tensor | float,
                       *, scale: float | None = None, value_scale: Tensor | None = None,
                       rtol: float = RANK_RTOL, dim: int | None = None, eigenvalues: bool = True) -> PosteriorSpectrum:
    """The per-probe spectrum of the prior-aware error from an x-side Gram.

    ``gram``: G = JᵀJ (P, d_x, d_x) or (d_x, d_x) — noise s²I on the sample's gradient, s = ``scale`` — or a
    :class:`NoiseGram` (non-isotropic / clipped noise, its own scale). ``prior``: a :class:`GaussianPrior`, a
    scalar τ² (zero mean, τ²I), or a dense covariance (d, d) / per-probe (P, d, d). ``value_scale`` (d,): the
    per-value output scale D (pixel std), so errors come out in pixels; or a (d_out, d) map from the Gram's
    coordinates to output values (the data span's basis, scaled: see :func:`exact_posterior_pair`), with
    ``dim`` = d_out the number of values per-value means divide by (default: the Gram's size). Without
    ``eigenvalues`` the Gram's own spectrum (λ_min, the condition number) is not computed — only the error
    needs none — and ``determined`` is read from the whitened spectrum (of the same rank).
    """
    exact = None
    if isinstance(gram, NoiseGram):
        exact, scale, gram = gram.exact, gram.scale, gram.gram
    g = gram.to(DTYPE)
    if g.dim() == 2:
        g = g[None]
    p, d, _ = g.shape
    if isinstance(prior, (int, float)):
        prior = isotropic_prior(0.0, float(prior), dim=d)
    if isinstance(prior, GaussianPrior) and prior.dim != d:
        raise ConfigError(f"prior has {prior.dim} values, the Gram {d}")
    s, m = _whitened(g, prior)
    s = s.expand(p, d, d) if s.dim() == 2 else s
    prior_total = None
    if exact is not None:
        prior_total = _to_values(s, value_scale).pow(2).sum((-2, -1))
        # condition the prior on the noiseless directions: drop the whitened directions they observe
        eta, u = torch.linalg.eigh(_sym(s @ exact @ s))
        seen = eta > rtol * eta[..., -1:].clamp_min(torch.finfo(DTYPE).tiny)
        keep = u * (~seen).to(DTYPE)[..., None, :]
        posterior_cov = s @ keep @ keep.transpose(-1, -2) @ s
        s, m = _whitened(g, posterior_cov)
    mu, u = torch.linalg.eigh(_sym(m))
    weights = _to_values(s @ u, value_scale).pow(2).sum(-2)
    lam = torch.linalg.eigvalsh(_sym(g if exact is None else g + exact)) if eigenvalues else None
    ranked = lam if lam is not None else mu
    determined = ranked[..., 0] > rtol * ranked[..., -1].clamp_min(torch.finfo(DTYPE).tiny)
    return PosteriorSpectrum(mu=mu, weights=weights, scale=float(scale or 0.0), dim=dim or d,
                             determined=determined, eigenvalues=lam, prior_total=prior_total)


def _to_values(m: Tensor, value_scale: Tensor | None) -> Tensor:
    """Columns of ``m`` (…, d, k) in output values: D·m for a per-value scale (d,), A·m for a map (d_out, d)."""
    if value_scale is None:
        return m
    v = value_scale.to(m)
    return v[:, None] * m if v.dim() == 1 else v @ m


def concat_spectra(parts: Sequence[PosteriorSpectrum]) -> PosteriorSpectrum:
    """One batched spectrum from spectra of consecutive probe chunks (same scale and d_x)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    eig = None if first.eigenvalues is None else torch.cat([p.eigenvalues for p in parts])
    total = None if first.prior_total is None else torch.cat([p.prior_total for p in parts])
    return PosteriorSpectrum(mu=torch.cat([p.mu for p in parts]), weights=torch.cat([p.weights for p in parts]),
                             scale=first.scale, dim=first.dim, determined=torch.cat([p.determined for p in parts]),
                             eigenvalues=eig, prior_total=total)


def exact_posteriors(model: torch.nn.Module, x: Tensor, y: Tensor, noise: SampleNoise,
                     prior: GaussianPrior | float, *, value_scale: Tensor | None = None,
                     loss_fn: Callable | None = None, max_numbers: int | None = None,
                     span: bool = True) -> PosteriorSpectrum:
    """The prior-aware posterior spectrum of every probe ``(x[i], y[i])`` (each its own private input) from its
    explicit Jacobian (:mod:`pl_i2f.influence.jacobian`), one chunk of Jacobians alive at a time: the Gram of
    the clipped gradient when ``noise.clip_norm`` is set, Woodbury-whitened when ``noise.basis`` is, then
    :func:`posterior_spectrum`. One batched :class:`PosteriorSpectrum` (row i: probe i); the model runs in eval
    mode and is never changed. For inputs of up to ~1024 values (:data:`pl_i2f.leakage.EXACT_MAX_DIM`)."""
    return exact_posterior_pair(model, x, y, noise, prior, value_scale=value_scale, loss_fn=loss_fn,
                                max_numbers=max_numbers, span=span)[0]


def exact_posterior_pair(model: torch.nn.Module, x: Tensor, y: Tensor, noise: SampleNoise,
                         prior: GaussianPrior | float, *, clip: float | None = None, value_scale: Tensor | None = None,
                         loss_fn: Callable | None = None, max_numbers: int | None = None,
                         span: bool = True) -> tuple[PosteriorSpectrum, PosteriorSpectrum | None]:
    """:func:`exact_posteriors`, and with ``clip`` C also the spectrum of the gradient clipped at C (noise shape
    I, for DP-SGD's noise multiplier of a run that does not clip) from the same Jacobians: one x-side Gram per
    probe, clipped by a rank-one update (:func:`clipped_gram`).

    ``span`` (default): where the prior is singular (:func:`prior_support`: the data vary in r < d_x
    directions), each Jacobian is formed on that span only — r forward-mode products per probe instead of d_x,
    an r × r Gram instead of d_x × d_x — and the error is the same: directions with no prior variance are known
    to the attacker and cost nothing. The spectra (``eigenvalues``, ``determined``) are then those of JᵀJ on the
    span."""
    from pl_i2f.influence.jacobian import gram_terms, iter_per_sample_jacobians
    from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS

    support = prior_support(prior) if span and isinstance(prior, GaussianPrior) else None
    tangents, dim = None, int(x[0].numel())
    if support is not None:
        basis, variances = support
        tangents = basis.T
        value_scale = basis if value_scale is None else value_scale.to(DTYPE)[:, None] * basis
        r = variances.numel()
        prior = GaussianPrior(mean=torch.zeros(r, dtype=DTYPE), basis=torch.eye(r, dtype=DTYPE),
                              eigenvalues=variances)
    main, clipped = [], []
    for chunk in iter_per_sample_jacobians(model, x, y, loss_fn=loss_fn, tangents=tangents, reuse_buffers=True,
                                           max_numbers=max_numbers or EXACT_BLOCK_NUMBERS):
        # the Jacobians' products where they are (a GPU's); the small d × d algebra on the CPU, where a root
        # finder's many tiny evaluations do not each wait on a device
        if noise.basis is not None or noise.sampler is not None:
            f = noise_gram(chunk.jacobians, noise, chunk.gradients)
            f = NoiseGram(gram=f.gram.cpu(), exact=None if f.exact is None else f.exact.cpu(), scale=f.scale)
            main.append(posterior_spectrum(f, prior, value_scale=value_scale, dim=dim))
            if clip is None:
                continue
        gram, jtg, norm = (t.cpu() for t in gram_terms(chunk.jacobians, chunk.gradients, DTYPE))
        if noise.basis is None and noise.sampler is None:
            own = gram if noise.clip_norm is None else clipped_gram(gram, jtg, norm, noise.clip_norm)
            main.append(posterior_spectrum(own, prior, scale=noise.std, value_scale=value_scale, dim=dim))
        if clip is not None:
            clipped.append(posterior_spectrum(clipped_gram(gram, jtg, norm, clip), prior, value_scale=value_scale,
                                              dim=dim, eigenvalues=False))  # only its error is reported
    return concat_spectra(main), concat_spectra(clipped) if clipped else None


#: Prior variances at or below this share of the largest count as none (rounding of a singular covariance).
SUPPORT_RTOL = 1e-10


def prior_support(prior: GaussianPrior, rtol: float = SUPPORT_RTOL) -> tuple[Tensor, Tensor] | None:
    """The directions the data prior varies in, when they are fewer than its d values: (Q (d, r) orthonormal,
    the variances along them (r,)); None when the prior spans every direction (an isotropic or PPCA remainder,
    or a full-rank covariance). Bundled 8×8 digits upsampled to 16×16 vary in 60 of 256 directions. Kept with the
    prior: a monitor asks for the same prior's support at every evaluation."""
    known = prior.__dict__.setdefault("_supports", {})
    if rtol not in known:
        known[rtol] = _support(prior, rtol)
    return known[rtol]


def _support(prior: GaussianPrior, rtol: float) -> tuple[Tensor, Tensor] | None:
    d = prior.dim
    if prior.rest > 0 and prior.basis.shape[1] < d:
        return None
    e = prior.eigenvalues.to(DTYPE).clamp_min(0)
    if e.numel() == 0 or not float(e.max()) > 0:
        return None
    keep = e > rtol * e.max()
    if int(keep.sum()) >= d:
        return None
    return prior.basis.to(DTYPE)[:, keep], e[keep]


def _sym(a: Tensor) -> Tensor:
    return (a + a.transpose(-1, -2)) / 2


def expected_error(jacobian: Tensor, noise: SampleNoise, prior: GaussianPrior | float,
                   gradient: Tensor | None = None, value_scale: Tensor | None = None) -> Tensor:
    """E‖x̂ − x‖² per probe (P,) from explicit Jacobians (P, d_θ, d_x) under the shared threat model."""
    return posterior_spectrum(noise_gram(jacobian, noise, gradient), prior, value_scale=value_scale).error()


def scale_for_target(rmse: Callable[[float], Tensor | float], target_rmse: float, at_zero: float, at_infinity: float,
                     *, lo: float = 1e-12, hi: float = 1e12, xtol: float = 1e-10) -> float:
    """The noise scale s with rmse(s) = ``target_rmse`` for a monotone non-decreasing ``rmse``: brentq on log s.

    0 when even no noise reaches the target (rmse(0) ≥ target), ∞ when no noise can (the prior's own error is
    below the target: guessing the mean already beats it)."""
    if not (target_rmse > 0 and math.isfinite(target_rmse)):
        raise ConfigError(f"target RMSE must be a positive finite number, got {target_rmse}")
    if at_zero >= target_rmse:
        return 0.0
    if at_infinity <= target_rmse:
        return math.inf

    def gap(log_s: float) -> float:
        return float(rmse(math.exp(log_s))) - target_rmse

    a, b = math.log(lo), math.log(hi)
    if gap(a) >= 0:
        return lo
    if gap(b) <= 0:
        return hi
    return math.exp(brentq(gap, a, b, xtol=xtol))


def sigma_for_target(spectrum: PosteriorSpectrum, target_rmse: float, *, noise_per_unit: float = 1.0) -> float:
    """σ such that noise σ·``noise_per_unit`` on the sample's gradient gives the pooled ``target_rmse``.

    Gaussian noise σ on the mean of a batch of B: ``noise_per_unit`` = B (1 with ``batch_of_one``), the spectrum
    of the unclipped Gram."""
    return spectrum.scale_for_target(target_rmse) / noise_per_unit


def noise_multiplier_for_target(spectrum: PosteriorSpectrum, target_rmse: float, clip: float) -> float:
    """DP-SGD's noise multiplier σ for ``target_rmse``: noise σC on the clipped gradient — ``spectrum`` must be
    built from the *clipped* Gram (:func:`clipped_gram` / :func:`noise_gram` with ``clip_norm``)."""
    return sigma_for_target(spectrum, target_rmse, noise_per_unit=clip)
