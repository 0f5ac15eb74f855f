"""The one estimator of the expected reconstruction error, for N independent problems at once.

A *problem set* (:class:`Problems`) is N operators JᵢJᵢᵀ of the same size n: one for :func:`expected_i2f`
(the whole batch is the private input), one per sample for :func:`per_sample_leakage`. Both go through the
same three stages:

1. **spectrum** (:class:`Quadrature`): every eigenvalue of a dense JᵢJᵢᵀ (:func:`dense_quadrature`), or Gauss
   quadrature nodes and weights from p Lanczos chains per problem (:func:`slq_quadrature`, stochastic Lanczos
   quadrature);
2. **damping** (:class:`~pl_i2f.influence.damping.Damping`): undamped, else damped with a warning;
3. **noise** (:func:`expected_squares`): isotropic δ ~ N(0, σ²I) → Σ f(λ), f(λ) = λ/(λ+ε)², from the
   spectrum; any other noise → Monte Carlo over draws, by the dense eigen-decomposition or by CG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from pl_i2f.gradients import ParamDict, as_flat
from pl_i2f.influence.damping import Damping
from pl_i2f.influence.krylov import Apply, Lanczos, cg, deflated_trace, gauss_quadrature, top_lanczos
from pl_i2f.influence.results import ConvergenceWarning, NoiseSampler, warn_caller
from pl_i2f.influence.settings import DRAW_CG_TOL, TINY


class Problems(Protocol):
    """N operators JᵢJᵢᵀ (n × n) over a common θ (d_θ)."""

    n: int
    d_theta: int
    params: ParamDict

    def gram(self, v: Tensor) -> Tensor:
        """(N, p, n) → (N, p, n): JᵢJᵢᵀ applied to p vectors of each problem."""

    def dense_gram(self) -> Tensor:
        """(N, n, n): every JᵢJᵢᵀ as a dense symmetric matrix."""

    def matvec_shared(self, deltas: Tensor) -> Tensor:
        """(s, d_θ) → (N, s, n): Jᵢδ for the same s θ-vectors in every problem."""


def f_damped(theta: Tensor, damping: float, floor: Tensor | float) -> Tensor:
    """f(λ) = λ / (λ + ε)²: E‖I²F‖² = σ² tr f(JJᵀ). Nodes at or below ``floor`` count as zero eigenvalues
    (they receive nothing from Jδ), which keeps 1/λ finite in the undamped case."""
    lam = theta.clamp_min(0)
    keep = lam > floor
    safe = torch.where(keep, lam, torch.ones_like(lam))
    return torch.where(keep, safe / (safe + damping) ** 2, torch.zeros_like(lam))


@dataclass
class Quadrature:
    """What is known of each problem's spectrum: ``nodes`` (N, p, m) with Gauss ``weights`` τ² (p chains of m
    Lanczos steps), or, dense, every eigenvalue (N, 1, n) with weight 1 (``weights`` None) and the
    ``eigenvectors`` (N, n, n). ``lambda_max`` (N,); ``lambda_min`` (N,) dense only; ``converged`` (N,) whether
    λ_max met its tolerance; ``settled`` whether the watched quadratures stopped changing."""

    nodes: Tensor
    weights: Tensor | None
    lambda_max: Tensor
    lambda_min: Tensor | None
    eigenvectors: Tensor | None
    converged: Tensor
    steps: int
    settled: bool
    lanczos: Lanczos | None

    @property
    def n(self) -> int:
        return self.nodes.shape[-1] if self.lanczos is None else self.lanczos.n

    def smallest(self) -> Tensor:
        """λ_min where known, else the smallest node seen (a Ritz value ≥ λ_min), clamped at 0."""
        return self.lambda_min if self.lambda_min is not None else self.nodes.clamp_min(0).amin(dim=(-1, -2))

    def terms(self, f_values: Tensor) -> Tensor:
        """(N, p) estimates of tr f(JᵢJᵢᵀ): Σ f(λ) (dense, p = 1) or n·Σ τ² f(θ) per chain (Hutchinson terms)."""
        return f_values.sum(-1) if self.weights is None else self.n * (self.weights * f_values).sum(-1)

    def trace(self) -> Tensor:
        """(N,) tr(JᵢJᵢᵀ): exact, deflated (Hutch++-style) from two or more chains, else Hutchinson."""
        lz = self.lanczos
        if lz is not None and self.nodes.shape[-2] > 1 and lz.steps < lz.n:
            return deflated_trace(lz)
        return self.terms(self.nodes).mean(-1)


def dense_quadrature(gram: Tensor) -> Quadrature:
    """Every eigenpair of the dense (N, n, n) JᵢJᵢᵀ."""
    lam, U = torch.linalg.eigh(gram)  # (N, n) ascending
    return Quadrature(nodes=lam.unsqueeze(1), weights=None, lambda_max=lam[:, -1], lambda_min=lam[:, 0],
                      eigenvectors=U, converged=torch.ones(lam.shape[0], dtype=torch.bool, device=lam.device),
                      steps=lam.shape[-1], settled=True, lanczos=None)


def slq_quadrature(apply: Apply, v0: Tensor, *, lambda_tol: float, quad_tol: float, maxiter: int, stop: str,
                   generator: torch.Generator, watch: Damping | None) -> Quadrature:
    """p Lanczos chains per problem from the start vectors ``v0`` (N, p, n), batched, until every λ_max has
    converged to ``lambda_tol`` (``stop`` as in :func:`~pl_i2f.influence.spectrum`) and — when ``watch`` is
    given — every chain's quadrature of f(λ) = λ/(λ+ε)² with that damping changed by < ``quad_tol`` relatively
    since the previous check; at most ``maxiter`` steps."""
    state: dict = {"previous": None, "settled": watch is None}

    def quadratures_settled(lz: Lanczos) -> bool:
        if watch is None:
            return True
        theta, w = gauss_quadrature(lz)
        epsilon = watch.at(theta.amax(dim=(-1, -2)))
        estimate = (w * f_damped(theta, epsilon, -1.0 if epsilon > 0 else 0.0)).sum(-1)
        previous, state["previous"] = state["previous"], estimate
        state["settled"] = previous is not None and bool(
            ((estimate - previous).abs() <= quad_tol * estimate.abs()).all())
        return state["settled"]

    lz, lam_max, converged = top_lanczos(apply, v0, lambda_tol, maxiter, generator, min_steps=2,
                                         extra_stop=quadratures_settled, stop=stop)
    theta, weights = gauss_quadrature(lz)
    return Quadrature(nodes=theta, weights=weights, lambda_max=lam_max, lambda_min=None, eigenvectors=None,
                      converged=converged, steps=lz.steps, settled=state["settled"], lanczos=lz)


class Solution(NamedTuple):
    """CG's answer to (A + εI) z = b: ``z``, ``iterations`` and recursive relative residual ``residual`` per
    system, ``broken`` (non-positive curvature) per system, and the ε finally used."""

    z: Tensor
    iterations: Tensor
    residual: Tensor
    broken: Tensor
    damping: float

    def failed(self, tol: float) -> bool:
        return bool(self.broken.any()) or not bool(torch.isfinite(self.z).all()) or bool((self.residual > tol).any())


def solve_damped(apply: Apply, rhs: Tensor, damping: Damping, epsilon: float, *, d_x: int, d_theta: int, tol: float,
                 maxiter: int, lambda_max: Callable[[], float]) -> Solution:
    """(A + εI) z = rhs by CG from zero, batched over rhs's leading dims. Undamped (ε = 0) and singular — known
    in advance (d_x > d_θ) or shown by CG (breakdown, no convergence, non-finite values) — it warns and solves
    with ε = rcond·λ_max instead (``lambda_max`` gives the scale, called only then)."""
    if epsilon == 0:
        epsilon = damping.resolve(d_x, d_theta, lambda_max)
    sol = Solution(*cg(apply, rhs, epsilon, tol, maxiter), epsilon)
    if epsilon == 0 and sol.failed(tol):
        if bool(sol.broken.any()):
            why = "CG broke down (non-positive curvature)"
        elif bool(torch.isfinite(sol.z).all()):
            why = "CG did not converge"
        else:
            why = "CG produced non-finite values"
        epsilon = damping.fallback(lambda_max(), why)
        sol = Solution(*cg(apply, rhs, epsilon, tol, maxiter), epsilon)
    return sol


def expected_squares(problems: Problems, quadrature: Quadrature | None, damping: Damping, *, isotropic: bool,
                     jdeltas: Tensor | None, cg_maxiter: int, lambda_max: Callable[[], float]) -> tuple[Tensor, float]:
    """(N, k) terms whose mean over k is E‖I²Fᵢ(δ)‖² (per unit σ² when ``isotropic``), and the ε used.

    Isotropic: the quadrature's estimates of tr f(JᵢJᵢᵀ) (k = chains, or 1 when dense). Otherwise ‖I²Fᵢ(δ_s)‖²
    of each draw, from ``jdeltas`` = Jᵢδ_s (N, s, n): by the dense eigen-decomposition when the quadrature has
    it (one J δ product per draw), else by one batched CG solve (``lambda_max``: the scale of a fallback)."""
    epsilon = damping.epsilon
    if quadrature is not None:
        epsilon = damping.resolve(problems.n, problems.d_theta, quadrature.lambda_max, quadrature.smallest())
        floor = damping.node_floor(epsilon, quadrature.lambda_max)
    if isotropic:
        assert quadrature is not None
        return quadrature.terms(f_damped(quadrature.nodes, epsilon, floor)), epsilon
    assert jdeltas is not None
    if quadrature is not None and quadrature.eigenvectors is not None:
        lam = quadrature.nodes  # (N, 1, n): every eigenvalue; undamped, the zero ones receive nothing
        inv = torch.where(lam > floor, 1.0 / (lam + epsilon).clamp_min(TINY), torch.zeros_like(lam))
        coefficients = torch.einsum("nsk,nkj->nsj", jdeltas, quadrature.eigenvectors) * inv
        return coefficients.pow(2).sum(-1), epsilon  # ‖U diag(1/(λ+ε)) Uᵀ Jδ‖²
    sol = solve_damped(problems.gram, jdeltas, damping, epsilon, d_x=problems.n, d_theta=problems.d_theta,
                       tol=DRAW_CG_TOL, maxiter=cg_maxiter, lambda_max=lambda_max)
    if sol.failed(DRAW_CG_TOL):
        warn_caller(f"CG reached only relative residual {float(sol.residual.max()):.2e} for some draws",
                    ConvergenceWarning)
    return sol.z.pow(2).sum(-1), sol.damping


def root_mean_square(squares: Tensor) -> tuple[Tensor, Tensor]:
    """√mean and its standard error along the last dim (delta method: se(√m) = se(m) / (2√m)); the error is
    NaN for a single value."""
    count = squares.shape[-1]
    mean = squares.mean(-1)
    se = squares.std(-1) / math.sqrt(count) if count > 1 else torch.full_like(mean, float("nan"))
    root = mean.clamp_min(0).sqrt()
    return root, se / (2 * root.clamp_min(TINY))


def draw_noise(sampler: NoiseSampler, params: ParamDict, count: int, like: Tensor,
               generator: torch.Generator) -> Tensor:
    """``count`` draws from the sampler as a (count, d_θ) tensor in ``like``'s dtype and device."""
    d_theta = sum(p.numel() for p in params.values())
    draws: list[Tensor] = []
    total = 0
    while total < count:
        out = sampler(generator)
        if isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] == d_theta:
            batch = out
        else:
            batch = as_flat(out, params).reshape(1, -1)
        draws.append(batch.to(device=like.device, dtype=like.dtype))
        total += batch.shape[0]
    return torch.cat(draws)[:count]
