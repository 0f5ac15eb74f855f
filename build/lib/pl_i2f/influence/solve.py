"""I²F(δ) = (JJᵀ + εI)⁻¹ J δ for one perturbation δ, and its eigenvalue bounds."""

from __future__ import annotations

import torch
from torch import Tensor

from pl_i2f.influence.damping import Damping, check_nonnegative
from pl_i2f.influence.estimator import solve_damped
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.results import ConvergenceWarning, I2FResult, ThetaVector, warn_caller
from pl_i2f.influence.settings import TINY, cg_maxiter
from pl_i2f.influence.spectrum import check_operator, lambda_max_scale, spectrum, top_eigenvalue


def i2f(
    op: GradientJacobian,
    delta: ThetaVector,
    damping: float = 0.0,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> I2FResult:
    """I²F(δ) = (JJᵀ + εI)⁻¹ J δ (x-shaped) by conjugate gradients started from zero.

    JJᵀ is symmetric positive semi-definite and Jδ lies in its range, so CG from zero stays in the range and
    converges to the minimum-norm solution. CG stops when the relative residual ≤ ``tol`` (default maxiter
    min(max(2·d_x, 50), 2000) products). With ε = 0 and a rank-deficient (d_x > d_θ) or numerically singular
    JJᵀ (CG breakdown, no convergence, non-finite values) an :class:`InfluenceWarning` is issued and the
    system is re-solved with ε = rcond·λ_max (rcond default d_x·machine epsilon), so the answer is always finite.
    """
    check_operator(op)
    jd = op.matvec(delta).reshape(-1)
    if not torch.isfinite(jd).all():
        raise FloatingPointError("J δ is not finite: check δ and the model")
    damp = Damping.request(damping, d_x=op.d_x, dtype=op.dtype, caller="i2f", rcond=rcond)
    sol = solve_damped(op._apply_flat, jd.unsqueeze(0), damp, damp.epsilon, d_x=op.d_x, d_theta=op.d_theta, tol=tol,
                       maxiter=cg_maxiter(op.d_x) if maxiter is None else int(maxiter),
                       lambda_max=lambda: lambda_max_scale(op, generator))
    z, epsilon = sol.z[0], sol.damping
    true_rel = float((jd - op._apply_flat(z.unsqueeze(0))[0] - epsilon * z).norm() / jd.norm().clamp_min(TINY))
    # judged on the true residual reported, not CG's recursive one: in float32 the recursion drifts below
    # a tol the products' rounding cannot reach (undamped: recursive 1e-8, true 1e-5)
    converged = true_rel <= tol and not bool(sol.broken.any())
    if not converged:
        drift = (f"; CG's recursive residual {float(sol.residual[0]):.2e} met tol but {op.dtype} rounding of the "
                 "products does not allow the true one to" if float(sol.residual[0]) <= tol else "")
        warn_caller(
            f"CG for I²F stopped at relative residual {true_rel:.2e} after {int(sol.iterations[0])} iterations "
            f"(tol={tol:g}){drift}",
            ConvergenceWarning,
        )
    return I2FResult(
        vector=z.reshape(op.x_shape),
        residual=true_rel,
        iterations=int(sol.iterations[0]),
        converged=converged,
        damping=epsilon,
        jdelta_norm=float(jd.norm()),
    )


def i2f_lower_bound(op: GradientJacobian, delta: ThetaVector, damping: float = 0.0, *,
                    lambda_max: float | Tensor | None = None, tol: float = 1e-8,
                    generator: torch.Generator | None = None) -> Tensor:
    """‖Jδ‖ / (λ_max(JJᵀ) + ε) ≤ ‖I²F(δ)‖ — with ε = 0 the quantity the paper plots. Pass ``lambda_max`` to
    reuse an eigenvalue already computed."""
    check_operator(op)
    check_nonnegative(damping, "damping")
    lam = top_eigenvalue(op, tol=tol, generator=generator) if lambda_max is None else torch.as_tensor(lambda_max)
    return op.matvec(delta).norm() / (lam.to(op.dtype) + damping)


def i2f_upper_bound(
    op: GradientJacobian,
    delta: ThetaVector,
    damping: float = 0.0,
    *,
    lambda_min: float | Tensor | None = None,
    tol: float = 1e-8,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """‖Jδ‖ / (λ_min(JJᵀ) + ε) ≥ ‖I²F(δ)‖. λ_min comes from Lanczos (slow to converge when JJᵀ is
    ill-conditioned; pass ``lambda_min`` if known). Undamped with a singular JJᵀ: warning, damped answer."""
    check_operator(op)
    damp = Damping.request(damping, d_x=op.d_x, dtype=op.dtype, caller="i2f_upper_bound", rcond=rcond)
    if lambda_min is None:
        lam_min = spectrum(op, 1, "smallest", tol=tol, maxiter=maxiter, generator=generator).eigenvalues
    else:
        lam_min = torch.as_tensor(float(lambda_min), dtype=torch.float64).reshape(1)
    epsilon = damp.epsilon
    if epsilon == 0:
        lam_max = torch.as_tensor(lambda_max_scale(op, generator), dtype=lam_min.dtype).reshape(1)
        epsilon = damp.resolve(op.d_x, op.d_theta, lam_max, lam_min.reshape(1))
    return op.matvec(delta).norm() / (max(float(lam_min[0]), 0.0) + epsilon)
