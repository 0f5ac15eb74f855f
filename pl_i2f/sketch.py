"""Matrix-free: a Nyström sketch of the whitened Gram brackets the prior-aware error of :mod:`pl_i2f.calibrated`
for every noise level, from products only (inputs beyond the exact route, or the monitor's sketched evaluations)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pl_i2f.calibrated import RANK_RTOL, _sym
from pl_i2f.errors import ConfigError
from pl_i2f.prior import DTYPE, GaussianPrior, isotropic_prior

Apply = Callable[[Tensor], Tensor]


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

    # drawn on the generator's device; the algebra then runs where ``apply`` returns its products (a GPU
    # operator's), so a CPU generator with GPU products and a GPU generator both work
    omega = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=DTYPE, device=gen.device))[0]
    z = torch.randn(dim, probes, generator=gen, dtype=DTYPE, device=gen.device)
    # one product call for the sketch and the residual's vectors: z does not depend on the sketch, and each call
    # carries a fixed cost that dominates small blocks
    both = whitened(torch.cat([omega, z], dim=1))
    omega, z = omega.to(both.device), z.to(both.device)
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
        su = value_scale.to(su)[:, None] * su
    weights = su.pow(2).sum(-2)
    diagonal = prior.diagonal()
    scale_sq = value_scale.to(diagonal).pow(2) if value_scale is not None else torch.ones_like(diagonal)
    prior_total = float((scale_sq * diagonal).sum())
    prior_norm = prior.norm * float(scale_sq.max())
    mhat_z = u @ (mu[..., None] * (u.transpose(-1, -2) @ z))
    quad = (z * (mz - mhat_z)).sum(-2)  # (P, probes)
    residual = quad.mean(-1)
    stderr = quad.std(-1) / math.sqrt(probes) if probes > 1 else torch.full_like(residual, math.inf)
    return NystromSpectrum(mu=mu, weights=weights, prior_total=prior_total, prior_norm=prior_norm,
                           residual=residual, residual_stderr=stderr, dim=dim, scale=float(scale))
