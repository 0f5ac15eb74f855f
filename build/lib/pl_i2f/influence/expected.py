"""The expected reconstruction error √E‖I²F(δ)‖² of one private batch under a defense's noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pl_i2f.influence.damping import Damping, check_nonnegative
from pl_i2f.influence.estimator import (
    dense_quadrature,
    draw_noise,
    expected_squares,
    root_mean_square,
    slq_quadrature,
)
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.results import ConvergenceWarning, ExpectedI2F, NoiseSampler, renamed, warn_caller
from pl_i2f.influence.settings import LAMBDA_SCALE_TOL, SLQ_MAX_STEPS, cg_maxiter
from pl_i2f.influence.spectrum import check_operator, gram_matrix, lambda_max_scale
from pl_i2f.rng import analysis_generator, rademacher

METHODS = ("auto", "exact", "slq", "monte_carlo")


class BatchOfOne:
    """A :class:`GradientJacobian` as the estimator's problem set with N = 1 (the whole batch is x₀)."""

    def __init__(self, op: GradientJacobian):
        self.op = op
        self.n = op.d_x
        self.d_theta = op.d_theta
        self.params = op._params

    def gram(self, v: Tensor) -> Tensor:
        return self.op._apply_flat(v)

    def dense_gram(self) -> Tensor:
        return gram_matrix(self.op).unsqueeze(0)

    def matvec_shared(self, deltas: Tensor) -> Tensor:
        return self.op.matvec_batch(deltas).reshape(1, deltas.shape[0], self.n)


def expected_i2f(
    op: GradientJacobian,
    noise_std: float | None = None,
    noise_sampler: NoiseSampler | None = None,
    damping: float = 0.0,
    *,
    noise_draws: int = 64,
    method: str = "auto",
    probes: int = 16,
    exact_max_dim: int = 2048,
    tol: float = 1e-4,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
    samples: int | None = None,
) -> ExpectedI2F:
    """√E‖I²F(δ)‖², the expected reconstruction error, and its per-pixel (RMSE) scale value/√d_x.

    * Isotropic Gaussian δ ~ N(0, σ² I_θ) (``noise_std`` = σ): E‖I²F‖² = σ² tr(MMᵀ), M = (JJᵀ+εI)⁻¹J, i.e.
      σ² Σᵢ λᵢ/(λᵢ+ε)² (σ² Σᵢ 1/λᵢ undamped). ``method="exact"`` (the default when d_x ≤ ``exact_max_dim``)
      forms JJᵀ with d_x products and uses its eigenvalues; ``"slq"`` estimates the trace by stochastic
      Lanczos quadrature with ``probes`` Rademacher vectors, one Lanczos chain each (batched), stopped when
      every chain's quadrature changes by < ``tol`` relatively. Undamped SLQ needs the small end of the
      spectrum resolved (≈√κ steps); prefer ε > 0 or the exact path there.
    * Any noise (``noise_sampler``, see :data:`NoiseSampler`; DP-SGD, anisotropic...): Monte Carlo over
      ``noise_draws`` draws, √mean‖I²F(δ_s)‖². With the dense eigen-decomposition available (small d_x) each draw
      costs one J δ product; otherwise one batched CG solve per draw.

    Undamped and singular JJᵀ: :class:`InfluenceWarning` and ε = rcond·λ_max (the answer stays finite).
    ``samples`` is the deprecated name of ``noise_draws``.
    """
    noise_draws = renamed("noise_draws", noise_draws, "samples", samples)
    check_operator(op)
    if (noise_std is None) == (noise_sampler is None):
        raise ValueError("give exactly one of noise_std (isotropic Gaussian σ) and noise_sampler")
    if noise_std is not None:
        check_nonnegative(noise_std, "noise_std")
    if method not in METHODS:
        raise ValueError(f"method must be auto, exact, slq or monte_carlo, got {method!r}")
    if method == "slq" and noise_std is None:
        raise ValueError("method='slq' applies to isotropic noise (noise_std); use a sampler with monte_carlo")
    damp = Damping.request(damping, d_x=op.d_x, dtype=op.dtype, caller="expected_i2f", rcond=rcond)
    n = op.d_x
    gen = analysis_generator(generator, op.device)
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    problems = BatchOfOne(op)
    dense = method == "exact" or (method in ("auto", "monte_carlo") and n <= exact_max_dim)

    quadrature = None
    if dense:
        quadrature = dense_quadrature(problems.dense_gram())
    elif noise_std is not None:
        quadrature = slq_quadrature(problems.gram, rademacher((1, probes, n), gen, like), lambda_tol=LAMBDA_SCALE_TOL,
                                    quad_tol=tol, maxiter=min(n, SLQ_MAX_STEPS) if maxiter is None else int(maxiter),
                                    stop="residual", generator=gen, watch=damp)
        if not quadrature.settled and quadrature.steps < n:
            warn_caller(
                f"stochastic Lanczos quadrature did not stabilise to tol={tol:g} in {quadrature.steps} steps; the "
                "undamped estimate is biased low when small eigenvalues are unresolved (use damping > 0)",
                ConvergenceWarning,
            )
    jdeltas = None
    if noise_sampler is not None:
        deltas = draw_noise(noise_sampler, op._params, noise_draws, like, gen)
        jdeltas = problems.matvec_shared(deltas)
    squares, epsilon = expected_squares(
        problems, quadrature, damp, isotropic=noise_std is not None, jdeltas=jdeltas,
        cg_maxiter=cg_maxiter(n) if maxiter is None else int(maxiter), lambda_max=lambda: lambda_max_scale(op, gen))
    root, se = root_mean_square(squares[0])
    if noise_std is None:
        return ExpectedI2F(root, root / math.sqrt(n), se, "monte_carlo", noise_draws, 0, epsilon, n)
    value = noise_std * root
    if dense:
        return ExpectedI2F(value, value / math.sqrt(n), torch.zeros_like(value), "exact", 0, 0, epsilon, n)
    return ExpectedI2F(value, value / math.sqrt(n), noise_std * se, "slq", 0, probes, epsilon, n)
