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
from pl_i2f.threat import SampleNoise

#: Inputs of at most this many values get a full data covariance; beyond, probabilistic PCA (top
#: ``PRIOR_RANK`` eigen-directions + one isotropic variance for the rest, whose square root stays closed-form).
FULL_COVARIANCE_MAX_DIM = 4096
PRIOR_RANK = 256
#: Relative eigenvalue threshold (× the largest, per probe) under which a direction counts as not observed.
RANK_RTOL = 1e-10
DTYPE = torch.float64  # spectra span many decades: every computation here is float64

Apply = Callable[[Tensor], Tensor]


# -- the data prior ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GaussianPrior:
    """N(mean, Σ_x) on flattened inputs, Σ_x = Q diag(eigenvalues) Qᵀ + rest·(I − QQᵀ).

    Full covariance: Q is d × d and ``rest`` unused (0). Probabilistic PCA (d > :data:`FULL_COVARIANCE_MAX_DIM`):
    Q is d × r and ``rest`` the mean of the other eigenvalues. Isotropic τ²I: Q is d × 0 and ``rest`` = τ².
    """

    mean: Tensor  # (d,)
    basis: Tensor  # (d, r), orthonormal columns
    eigenvalues: Tensor  # (r,), >= 0
    rest: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def trace(self) -> float:
        """tr Σ_x: the squared error of guessing the mean (in the model's input space)."""
        return float(self.eigenvalues.sum()) + self.rest * (self.dim - self.basis.shape[1])

    @property
    def variance(self) -> float:
        """τ², the mean per-value variance tr Σ_x / d."""
        return self.trace / self.dim

    @property
    def norm(self) -> float:
        """‖Σ_x‖₂, the largest variance along any direction."""
        top = float(self.eigenvalues.max()) if self.eigenvalues.numel() else 0.0
        return max(top, self.rest if self.basis.shape[1] < self.dim else 0.0)

    def _power(self, v: Tensor, p: float) -> Tensor:
        """Σ_x^p applied to the columns of ``v`` (d × m); p = 1/2 or 1 (no inverse, so a singular Σ_x is fine)."""
        q = self.basis.to(v)
        coef = q.T @ v
        out = q @ (self.eigenvalues.to(v).clamp_min(0).pow(p)[:, None] * coef)
        if self.rest and q.shape[1] < self.dim:
            out = out + self.rest ** p * (v - q @ coef)
        return out

    def sqrt_apply(self, v: Tensor) -> Tensor:
        """Σ_x^{1/2} v (columns of v)."""
        return self._power(v, 0.5)

    def apply(self, v: Tensor) -> Tensor:
        """Σ_x v (columns of v)."""
        return self._power(v, 1.0)

    def diagonal(self) -> Tensor:
        """The per-value variances diag Σ_x (d,)."""
        q = self.basis
        inside = q.pow(2).sum(1)
        return (q.pow(2) * self.eigenvalues.clamp_min(0)).sum(1) + self.rest * (1 - inside)

    def covariance(self) -> Tensor:
        """The dense d × d Σ_x (float64)."""
        return self.apply(torch.eye(self.dim, dtype=DTYPE))

    def sqrt(self) -> Tensor:
        """The dense d × d Σ_x^{1/2} (float64)."""
        return self.sqrt_apply(torch.eye(self.dim, dtype=DTYPE))

    def isotropic(self) -> GaussianPrior:
        """The same mean with τ²I, τ² = tr Σ_x / d (the weaker attacker of the τ² form)."""
        return isotropic_prior(self.mean, self.variance)


def isotropic_prior(mean: Tensor | float, variance: float, dim: int | None = None) -> GaussianPrior:
    """N(mean, τ²I): ``mean`` a (d,) tensor, or a scalar with ``dim`` given."""
    if not (variance >= 0 and math.isfinite(variance)):
        raise ConfigError(f"prior_variance must be a finite number >= 0, got {variance}")
    if not isinstance(mean, Tensor):
        if dim is None:
            raise ConfigError("isotropic_prior needs dim= when the mean is a scalar")
        mean = torch.full((dim,), float(mean), dtype=DTYPE)
    mean = mean.detach().reshape(-1).to(DTYPE)
    return GaussianPrior(mean=mean, basis=torch.zeros(mean.numel(), 0, dtype=DTYPE),
                         eigenvalues=torch.zeros(0, dtype=DTYPE), rest=float(variance))


def covariance_prior(mean: Tensor, covariance: Tensor, rank: int | None = None) -> GaussianPrior:
    """N(mean, Σ_x) from a dense covariance; ``rank`` keeps the top eigen-directions (PPCA remainder)."""
    d = mean.numel()
    if covariance.shape != (d, d):
        raise ConfigError(f"covariance must be {d} x {d} for a mean of {d} values, got {tuple(covariance.shape)}")
    cov = covariance.detach().to(DTYPE)
    e, q = torch.linalg.eigh((cov + cov.T) / 2)
    e = e.clamp_min(0)
    rest = 0.0
    if rank is not None and rank < d:
        rest = float(e[: d - rank].mean())
        e, q = e[d - rank:], q[:, d - rank:]
    return GaussianPrior(mean=mean.detach().reshape(-1).to(DTYPE), basis=q, eigenvalues=e, rest=rest)


def estimate_prior(samples: Tensor, *, full: bool | None = None, rank: int = PRIOR_RANK) -> GaussianPrior:
    """The Gaussian prior of a tensor of inputs (n, …) in the model's input space: their mean and covariance.

    ``full`` (default: d ≤ :data:`FULL_COVARIANCE_MAX_DIM`) keeps the full sample covariance; otherwise
    probabilistic PCA with ``rank`` directions (from a thin SVD of the centred samples, never a d × d matrix)
    and the mean of the remaining variance; ``full=False`` with ``rank=0`` gives τ²I.
    """
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise ConfigError(f"estimate_prior needs at least 2 samples (n, ...), got shape {tuple(samples.shape)}")
    x = samples.detach().reshape(samples.shape[0], -1).to(DTYPE)
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    full = d <= FULL_COVARIANCE_MAX_DIM if full is None else full
    if full:
        return covariance_prior(mean, xc.T @ xc / (n - 1))
    total = float(xc.pow(2).sum()) / (n - 1)
    if rank <= 0:
        return isotropic_prior(mean, total / d)
    _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
    r = min(rank, int(sv.numel()), d - 1)
    e = sv[:r].pow(2) / (n - 1)
    rest = max(total - float(e.sum()), 0.0) / (d - r)
    return GaussianPrior(mean=mean, basis=vh[:r].T.contiguous(), eigenvalues=e, rest=rest)


PPCA_MAX_SAMPLES = 10_000  # samples the PPCA prior's thin SVD uses (a full covariance streams every sample)


def prior_from_dataset(dataset: torch.utils.data.Dataset, *, max_samples: int | None = None, batch_size: int = 512,
                       full: bool | None = None, rank: int = PRIOR_RANK) -> GaussianPrior:
    """:func:`estimate_prior` over a dataset of ``(x, y)`` items (the first ``max_samples`` when set).

    The full covariance streams the data (sum and Σxxᵀ in float64: d² memory, never n × d); PPCA takes a thin
    SVD of at most :data:`PPCA_MAX_SAMPLES` samples."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    d = int(dataset[0][0].numel())
    full = d <= FULL_COVARIANCE_MAX_DIM if full is None else full
    if not full:
        n = min(n, PPCA_MAX_SAMPLES)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    if not full:
        xs = torch.cat([batch[0].reshape(batch[0].shape[0], -1).to(DTYPE) for batch in loader])
        return estimate_prior(xs, full=False, rank=rank)
    if n < 2:
        raise ConfigError(f"a data prior needs at least 2 samples, the dataset has {n}")
    total = torch.zeros(d, dtype=DTYPE)
    outer = torch.zeros(d, d, dtype=DTYPE)
    for batch in loader:
        x = batch[0].reshape(batch[0].shape[0], -1).to(DTYPE)
        total += x.sum(0)
        outer += x.T @ x
    mean = total / n
    return covariance_prior(mean, (outer - n * torch.outer(mean, mean)) / (n - 1))


def value_scale(std: Sequence[float], input_shape: Sequence[int]) -> Tensor:
    """The per-value std of a (C, H, W) input (the datamodule's per-channel normalisation), flattened: multiplying
    normalised errors by it gives [0, 1]-pixel errors, exactly per channel."""
    c = int(input_shape[0])
    if len(std) not in (1, c):
        raise ConfigError(f"{len(std)} channel stds for an input with {c} channels")
    per_channel = torch.as_tensor(list(std) * (c if len(std) == 1 else 1), dtype=DTYPE)
    return per_channel.repeat_interleave(int(math.prod(input_shape[1:])))


# -- the threat model: which Jacobian, which noise ----------------------------------------------------
def clipped_jacobian(jacobian: Tensor, gradient: Tensor, clip: float) -> Tensor:
    """The Jacobian of clip_C(g) = g·min(1, C/‖g‖): (C/‖g‖)(I − ĝĝᵀ)J where ‖g‖ > C, J otherwise.

    ``jacobian`` (…, d_θ, d_x), ``gradient`` (…, d_θ) the unclipped per-sample gradient."""
    norm = gradient.norm(dim=-1, keepdim=True)
    unit = gradient / norm.clamp_min(torch.finfo(gradient.dtype).tiny)
    projected = jacobian - unit[..., :, None] * (unit[..., None, :] @ jacobian)
    clipped = (norm > clip)[..., None]
    return torch.where(clipped, (clip / norm)[..., None] * projected, jacobian)


def clipped_gram(gram: Tensor, jtg: Tensor, grad_norm: Tensor, clip: float) -> Tensor:
    """G_c = (C/‖g‖)²(G − vvᵀ), v = Jᵀg/‖g‖, where ‖g‖ > C; G otherwise. Needs only the x-side Gram
    G = JᵀJ (…, d_x, d_x), Jᵀg (…, d_x) and ‖g‖ (…), so a Gram-only engine can price DP-SGD's clipping."""
    norm = torch.as_tensor(grad_norm, dtype=gram.dtype, device=gram.device)
    v = jtg / norm[..., None].clamp_min(torch.finfo(gram.dtype).tiny)
    projected = (clip / norm)[..., None, None] ** 2 * (gram - v[..., :, None] * v[..., None, :])
    return torch.where((norm > clip)[..., None, None], projected, gram)


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
    return woodbury_gram(g, noise.basis.to(DTYPE).T @ j, noise)


def woodbury_gram(gram: Tensor, basis_jacobian: Tensor, noise: SampleNoise) -> NoiseGram:
    """:func:`noise_gram` from products only: the (clipped, if DP-SGD) Gram G (P, d_x, d_x) and Vᵀ J (P, k, d_x),
    V = ``noise.basis`` — for engines that form Grams and a few projections rather than the whole J."""
    g = gram.to(DTYPE)
    b = basis_jacobian.to(DTYPE)
    extra = noise.extra_variance.to(DTYPE).reshape(-1)
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
        s = torch.as_tensor(self.scale if scale is None else scale, dtype=DTYPE)
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
        return scale_for_target(self.rmse, target_rmse, float(self.rmse(0.0)), float(self.rmse(math.inf)))


def psnr(rmse: Tensor | float) -> Tensor:
    """20·log10(1/RMSE) for values on the [0, 1] scale (peak 1)."""
    return -20 * torch.log10(torch.as_tensor(rmse, dtype=DTYPE))


def _whitened(gram: Tensor, prior: GaussianPrior | Tensor) -> tuple[Tensor, Tensor]:
    """(S, S G S) with S = Σ_x^{1/2} (dense; a per-probe (P, d, d) covariance is allowed)."""
    if isinstance(prior, GaussianPrior):
        s = prior.sqrt()
    else:
        e, q = torch.linalg.eigh(prior.to(DTYPE))
        s = (q * e.clamp_min(0).sqrt()[..., None, :]) @ q.transpose(-1, -2)
    return s, s @ gram @ s


def posterior_spectrum(gram: Tensor | NoiseGram, prior: GaussianPrior | Tensor | float,
                       *, scale: float | None = None, value_scale: Tensor | None = None,
                       rtol: float = RANK_RTOL) -> PosteriorSpectrum:
    """The per-probe spectrum of the prior-aware error from an x-side Gram.

    ``gram``: G = JᵀJ (P, d_x, d_x) or (d_x, d_x) — noise s²I on the sample's gradient, s = ``scale`` — or a
    :class:`NoiseGram` (non-isotropic / clipped noise, its own scale). ``prior``: a :class:`GaussianPrior`, a
    scalar τ² (zero mean, τ²I), or a dense covariance (d, d) / per-probe (P, d, d). ``value_scale`` (d,): the
    per-value output scale D (pixel std), so errors come out in pixels.
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
        scaled = s if value_scale is None else value_scale.to(DTYPE)[:, None] * s
        prior_total = scaled.pow(2).sum((-2, -1))
        # condition the prior on the noiseless directions: drop the whitened directions they observe
        eta, u = torch.linalg.eigh(_sym(s @ exact @ s))
        seen = eta > rtol * eta[..., -1:].clamp_min(torch.finfo(DTYPE).tiny)
        keep = u * (~seen).to(DTYPE)[..., None, :]
        posterior_cov = s @ keep @ keep.transpose(-1, -2) @ s
        s, m = _whitened(g, posterior_cov)
    mu, u = torch.linalg.eigh(_sym(m))
    su = s @ u
    if value_scale is not None:
        su = value_scale.to(DTYPE)[:, None] * su
    weights = su.pow(2).sum(-2)
    lam = torch.linalg.eigvalsh(_sym(g if exact is None else g + exact))
    determined = lam[..., 0] > rtol * lam[..., -1].clamp_min(torch.finfo(DTYPE).tiny)
    return PosteriorSpectrum(mu=mu, weights=weights, scale=float(scale or 0.0), dim=d, determined=determined,
                             eigenvalues=lam, prior_total=prior_total)


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
                     loss_fn: Callable | None = None, max_numbers: int | None = None) -> PosteriorSpectrum:
    """The prior-aware posterior spectrum of every probe ``(x[i], y[i])`` (each its own private input) from its
    explicit Jacobian (:mod:`pl_i2f.influence.jacobian`), one chunk of Jacobians alive at a time: the Gram of
    the clipped gradient when ``noise.clip_norm`` is set, Woodbury-whitened when ``noise.basis`` is, then
    :func:`posterior_spectrum`. One batched :class:`PosteriorSpectrum` (row i: probe i); the model runs in eval
    mode and is never changed. For inputs of up to ~1024 values (:data:`pl_i2f.leakage.EXACT_MAX_DIM`)."""
    return exact_posterior_pair(model, x, y, noise, prior, value_scale=value_scale, loss_fn=loss_fn,
                                max_numbers=max_numbers)[0]


def exact_posterior_pair(model: torch.nn.Module, x: Tensor, y: Tensor, noise: SampleNoise,
                         prior: GaussianPrior | float, *, clip: float | None = None, value_scale: Tensor | None = None,
                         loss_fn: Callable | None = None,
                         max_numbers: int | None = None) -> tuple[PosteriorSpectrum, PosteriorSpectrum | None]:
    """:func:`exact_posteriors`, and with ``clip`` C also the spectrum of the gradient clipped at C (noise shape
    I, for DP-SGD's noise multiplier of a run that does not clip) from the same Jacobians: one x-side Gram per
    probe, clipped by a rank-one update (:func:`clipped_gram`)."""
    from pl_i2f.influence.jacobian import iter_per_sample_jacobians
    from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS

    main, clipped = [], []
    for chunk in iter_per_sample_jacobians(model, x, y, loss_fn=loss_fn,
                                           max_numbers=max_numbers or EXACT_BLOCK_NUMBERS):
        if noise.basis is not None or noise.sampler is not None:
            main.append(posterior_spectrum(noise_gram(chunk.jacobians, noise, chunk.gradients), prior,
                                           value_scale=value_scale))
            if clip is None:
                continue
        j, g = chunk.jacobians.to(DTYPE), chunk.gradients.to(DTYPE)
        gram = _sym(j.transpose(-1, -2) @ j)
        jtg, norm = (j.transpose(-1, -2) @ g[..., None])[..., 0], g.norm(dim=-1)
        if noise.basis is None and noise.sampler is None:
            own = gram if noise.clip_norm is None else clipped_gram(gram, jtg, norm, noise.clip_norm)
            main.append(posterior_spectrum(own, prior, scale=noise.std, value_scale=value_scale))
        if clip is not None:
            clipped.append(posterior_spectrum(clipped_gram(gram, jtg, norm, clip), prior, value_scale=value_scale))
    return concat_spectra(main), concat_spectra(clipped) if clipped else None


def _sym(a: Tensor) -> Tensor:
    return (a + a.transpose(-1, -2)) / 2


def expected_error(jacobian: Tensor, noise: SampleNoise, prior: GaussianPrior | float,
                   gradient: Tensor | None = None, value_scale: Tensor | None = None) -> Tensor:
    """E‖x̂ − x‖² per probe (P,) from explicit Jacobians (P, d_θ, d_x) under the shared threat model."""
    return posterior_spectrum(noise_gram(jacobian, noise, gradient), prior, value_scale=value_scale).error()


def scale_for_target(rmse: Callable[[float], Tensor], target_rmse: float, at_zero: float, at_infinity: float,
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


# -- matrix-free: a Nyström sketch brackets the error for every noise level ---------------------------
@dataclass(frozen=True)
class NystromSpectrum:
    """A rank-k Nyström sketch M̂ = U diag(μ̂) Uᵀ ⪯ M of the whitened Gram M = S G S, the prior weights of its
    directions, and the residual trace t = tr(M − M̂) (estimated with ``probes`` Gaussian vectors).

    Bounds for every s (per probe): M̂ ⪯ M gives upper(s) = Σₖ wₖ s²/(s²+μ̂ₖ) + (tr D²Σ_x − Σₖ wₖ) ≥ error(s).
    The deficit is at most ‖DΣ_x^{1/2}‖² · [d_eff(M) − d_eff(M̂)], d_eff(A) = tr A(A+s²)⁻¹; since λ/(λ+s²) is
    concave with f(0)=0, Rotfel'd's trace inequality and Jensen give d_eff(M) − d_eff(M̂) ≤ (d−k) f(t/(d−k)).
    So error ∈ [upper − ‖DΣ_x^{1/2}‖²(d−k)·t/(t + (d−k)s²), upper] — exact when the residual is 0, and tight
    wherever s² dominates the residual's eigenvalues. ``error`` returns the midpoint, ``half_width`` the stated
    error (t is a stochastic estimate; its standard error is ``residual_stderr``).
    """

    mu: Tensor  # (P, k)
    weights: Tensor  # (P, k)
    prior_total: float  # tr D²Σ_x
    prior_norm: float  # ‖DΣ_x^{1/2}‖²
    residual: Tensor  # (P,)
    residual_stderr: Tensor  # (P,)
    dim: int
    scale: float

    def bounds(self, scale: float | None = None) -> tuple[Tensor, Tensor]:
        s2 = (self.scale if scale is None else scale) ** 2
        if s2 == 0:
            unseen = (self.mu <= RANK_RTOL * self.mu.amax(-1, keepdim=True)).to(DTYPE)
            upper = (self.weights * unseen).sum(-1) + self.prior_total - self.weights.sum(-1)
            return torch.zeros_like(upper), upper
        upper = (self.weights * s2 / (s2 + self.mu.clamp_min(0))).sum(-1) + self.prior_total - self.weights.sum(-1)
        m = self.dim - self.mu.shape[-1]
        t = self.residual.clamp_min(0)
        deficit = self.prior_norm * m * t / (t + m * s2) if m > 0 else torch.zeros_like(t)
        return (upper - deficit).clamp_min(0), upper

    def error(self, scale: float | None = None) -> Tensor:
        lo, hi = self.bounds(scale)
        return (lo + hi) / 2

    def half_width(self, scale: float | None = None) -> Tensor:
        lo, hi = self.bounds(scale)
        return (hi - lo) / 2

    def rmse(self, scale: float | None = None) -> Tensor:
        return (self.error(scale) / self.dim).mean(-1).sqrt()


SHIFT_RETRIES = 10  # tenfold shifts tried for a core that rounding left indefinite


def nystrom_spectrum(apply: Apply, dim: int, rank: int, prior: GaussianPrior | float, *, scale: float = 0.0,
                     probes: int = 8, value_scale: Tensor | None = None,
                     generator: torch.Generator | None = None, precision: torch.dtype = DTYPE) -> NystromSpectrum:
    """Sketch the whitened Gram of P probes from products only: ``apply(V)`` maps V (d, m), shared by every
    probe, to the products G V (P, d, m) (or (d, m) for one probe).

    ``rank`` + ``probes`` products per probe (one batched call for the sketch and the residual); one sketch
    serves every noise level. Stable Nyström (shifted Cholesky, Tropp et al. 2017) for M = S G S, S = Σ_x^{1/2}
    applied with :meth:`GaussianPrior.sqrt_apply`; the residual trace by Hutchinson on M − M̂ (XNysTrace-style).
    ``precision``: the dtype ``apply`` really computes in (its rounding sets the stabilising shift).
    """
    if isinstance(prior, (int, float)):
        prior = isotropic_prior(0.0, float(prior), dim=dim)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    k = min(rank, dim)

    def sq(v: Tensor) -> Tensor:  # Σ_x^{1/2} on (d, m) or (P, d, m)
        if v.dim() == 2:
            return prior.sqrt_apply(v)
        p, d, m = v.shape
        return prior.sqrt_apply(v.transpose(0, 1).reshape(d, p * m)).reshape(d, p, m).transpose(0, 1)

    def whitened(v: Tensor) -> Tensor:  # (d, m) shared by every probe → (P, d, m)
        out = apply(sq(v).to(DTYPE)).to(DTYPE)
        return sq(out if out.dim() == 3 else out[None])

    omega = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=DTYPE))[0]
    z = torch.randn(dim, probes, generator=gen, dtype=DTYPE)
    # one product call for the sketch and the residual's vectors: z does not depend on the sketch, and each call
    # carries a fixed cost that dominates small blocks
    both = whitened(torch.cat([omega, z], dim=1))
    y, mz = both[..., :k], both[..., k:]
    nu = math.sqrt(dim) * torch.finfo(precision).eps * y.norm(dim=(-2, -1)).clamp_min(torch.finfo(DTYPE).tiny)
    for _ in range(SHIFT_RETRIES):
        # rounding in the products (a clipped Gram's G − uuᵀ cancels its largest direction) can leave the core
        # indefinite at the smallest shift: a larger one for those probes (the sketch stays ⪯ M, a little coarser)
        y_nu = y + nu[:, None, None] * omega
        chol, info = torch.linalg.cholesky_ex(_sym(omega.T @ y_nu))
        if not bool((info > 0).any()):
            break
        nu = torch.where(info > 0, nu * 10, nu)
    else:
        raise ConfigError("nystrom_spectrum: the sketch's core stayed indefinite under every shift (non-finite or "
                          "non-symmetric products?)")
    b = torch.linalg.solve_triangular(chol, y_nu.transpose(-1, -2), upper=False).transpose(-1, -2)
    u, sv, _ = torch.linalg.svd(b, full_matrices=False)
    mu = (sv.pow(2) - nu[:, None]).clamp_min(0)
    su = sq(u)
    if value_scale is not None:
        su = value_scale.to(DTYPE)[:, None] * su
    weights = su.pow(2).sum(-2)
    scale_sq = value_scale.to(DTYPE).pow(2) if value_scale is not None else torch.ones(dim, dtype=DTYPE)
    prior_total = float((scale_sq * prior.diagonal()).sum())
    prior_norm = prior.norm * float(scale_sq.max())
    mhat_z = u @ (mu[..., None] * (u.transpose(-1, -2) @ z))
    quad = (z * (mz - mhat_z)).sum(-2)  # (P, probes)
    residual = quad.mean(-1)
    stderr = quad.std(-1) / math.sqrt(probes) if probes > 1 else torch.full_like(residual, math.inf)
    return NystromSpectrum(mu=mu, weights=weights, prior_total=prior_total, prior_norm=prior_norm,
                           residual=residual, residual_stderr=stderr, dim=dim, scale=float(scale))
