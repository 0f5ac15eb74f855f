"""Lanczos and conjugate gradients over any symmetric positive semi-definite ``apply: (..., n) → (..., n)``,
batched over the leading dimensions, with no knowledge of models: the same code serves a batch operator,
several probe vectors and per-sample (``vmap``) operators, and the tests drive it with explicit matrices.

* :class:`Lanczos` — full reorthogonalisation, restart on breakdown;
* :func:`top_lanczos` — Lanczos until the largest eigenvalue of each problem converges (best over p chains);
* :func:`ritz_converged`, :func:`ritz_value_error`, :func:`last_block_converged` — the stopping tests;
* :func:`gauss_quadrature`, :func:`deflated_trace` — stochastic Lanczos quadrature and a Hutch++-style trace;
* :func:`cg` — conjugate gradients for (A + εI) z = b.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pl_i2f.influence.settings import (
    BREAKDOWN_ULPS,
    LANCZOS_INITIAL_BASIS,
    RITZ_CHECK_EVERY_STEP_UNTIL,
    RITZ_CHECKS_PER_RUN,
    RITZ_FLOOR_ULPS,
    TOP_RITZ_FLOOR_ULPS,
    machine_eps,
)
from pl_i2f.rng import randn

Apply = Callable[[Tensor], Tensor]


def _project_out(basis: Tensor, w: Tensor) -> Tensor:
    """w minus its components along the orthonormal rows of ``basis``, twice (classical Gram–Schmidt twice:
    "twice is enough" for full reorthogonalisation)."""
    for _ in range(2):
        w = w - torch.einsum("...k,...kn->...n", torch.einsum("...kn,...n->...k", basis, w), basis)
    return w


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """The symmetric tridiagonal T with diagonal ``alpha`` (..., m) and off-diagonal ``beta`` (..., m − 1)."""
    return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)


class Lanczos:
    """Lanczos on a symmetric operator ``apply``, batched over the leading dims of the start vectors, with full
    reorthogonalisation.

    Without reorthogonalisation Ritz values come back as spurious copies ("ghosts") after convergence; with
    it, T = QᵀAQ holds to rounding and the run can go up to n steps. On breakdown (an invariant subspace is
    found, e.g. a repeated eigenvalue or rank deficiency) the chain continues from a fresh random vector
    orthogonal to Q with β = 0, so T becomes block diagonal and multiplicities are found too. Blocks after the
    first carry no weight in e₁, so quadrature over the start vector stays correct.
    """

    def __init__(self, apply: Apply, v0: Tensor, max_steps: int, generator: torch.Generator):
        self.apply = apply
        self.generator = generator
        self.n = v0.shape[-1]
        self.batch = tuple(v0.shape[:-1])
        self.m_max = max(1, min(int(max_steps), self.n))
        # The basis grows on demand (doubling): most runs stop after a handful of steps, and zero-filling the
        # full (max_steps + 1) × n basis up front is a measurable share of a λ_max run at d_x in the thousands.
        self.Q = v0.new_zeros(*self.batch, min(self.m_max + 1, LANCZOS_INITIAL_BASIS), self.n)
        self.alpha = v0.new_zeros(*self.batch, self.m_max)
        self.beta = v0.new_zeros(*self.batch, self.m_max)
        self.scale = v0.new_zeros(self.batch)
        norm = v0.norm(dim=-1, keepdim=True)
        if (norm == 0).any():
            raise ValueError("Lanczos start vector is zero")
        self.Q[..., 0, :] = v0 / norm
        self.steps = 0

    @property
    def done(self) -> bool:
        return self.steps >= self.m_max

    def step(self) -> None:
        j = self.steps
        q = self.Q[..., j, :]
        w = self.apply(q)
        if not torch.isfinite(w).all():
            raise FloatingPointError("a JJᵀ product returned non-finite values (check the model and the input)")
        basis = self.Q[..., : j + 1, :]
        self.alpha[..., j] = (w * q).sum(-1)
        w = _project_out(basis, w)
        b = w.norm(dim=-1)
        self.scale = torch.maximum(self.scale, torch.maximum(self.alpha[..., j].abs(), b))
        self.steps = j + 1
        if self.steps == self.n:  # the whole space is spanned: T is exact, the residual is zero
            return
        broken = b <= BREAKDOWN_ULPS * machine_eps(w.dtype) * math.sqrt(self.n) * self.scale
        self.beta[..., j] = torch.where(broken, torch.zeros_like(b), b)
        if self.steps == self.m_max:
            return
        if broken.any():
            fresh = _project_out(basis, randn(w.shape, self.generator, w))
            w = torch.where(broken.unsqueeze(-1), fresh, w)
            b = w.norm(dim=-1)
        if j + 1 >= self.Q.shape[-2]:
            grown = self.Q.new_zeros(*self.batch, min(self.m_max + 1, 2 * self.Q.shape[-2]), self.n)
            grown[..., : j + 1, :] = self.Q
            self.Q = grown
        self.Q[..., j + 1, :] = w / b.unsqueeze(-1)

    def tridiagonal(self, start: int = 0) -> Tensor:
        """T = QᵀAQ over steps ``start`` … (the last block after a restart when ``start`` > 0)."""
        m = self.steps
        return tridiagonal(self.alpha[..., start:m], self.beta[..., start : m - 1])

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values θ (ascending, (..., m)), eigenvectors S of T ((..., m, m)) and residual norms
        ‖A yᵢ − θᵢ yᵢ‖ = β_m |S[m−1, i]| ((..., m))."""
        m = self.steps
        theta, S = torch.linalg.eigh(self.tridiagonal())
        last = self.beta[..., m - 1] if m < self.n else torch.zeros_like(self.alpha[..., 0])
        resid = last.unsqueeze(-1).abs() * S[..., m - 1, :].abs()
        return theta, S, resid

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors for the columns of S: (..., k) columns → (..., k, n)."""
        return torch.einsum("...mk,...mn->...kn", S, self.Q[..., : S.shape[-2], :])


def check_ritz_now(step: int) -> bool:
    """Whether to compute Ritz values after ``step``: they are cheap for small T but not free for T of several
    hundred, so every step early, then about ``RITZ_CHECKS_PER_RUN`` times over the steps taken."""
    return step <= RITZ_CHECK_EVERY_STEP_UNTIL or step % max(1, step // RITZ_CHECKS_PER_RUN) == 0


def ritz_converged(theta: Tensor, resid: Tensor, theta_max: Tensor, tol: float, n: int,
                   top: bool = False) -> Tensor:
    """Relative residual ‖r‖ ≤ tol·|θ| (the ARPACK criterion; it bounds each eigenvalue's relative error by
    tol), or below the floor that rounding in the products allows at all (otherwise λ ≈ 0 never converges)."""
    unit = machine_eps(theta.dtype)
    rel_floor = RITZ_FLOOR_ULPS * unit * math.sqrt(n)
    if top:
        # The largest eigenvalues are not near zero: there the generous floor above (6.9e-4 relative in float32
        # at d_x = 8192) would silently loosen the caller's tol. Honour tol down to a few ulps (~1e-6 in
        # float32) and keep the general floor as a cap.
        rel_floor = min(rel_floor, max(tol, TOP_RITZ_FLOOR_ULPS * unit))
    return resid <= torch.maximum(tol * theta.abs(), rel_floor * theta_max.abs())


def ritz_value_error(theta: Tensor, resid: Tensor) -> Tensor:
    """A posteriori error estimate of each Ritz value: min(‖r‖, ‖r‖²/gap) with gap the distance to the nearest
    other Ritz value (Kato–Temple / Parlett's gap theorem; the Ritz gap stands in for the unknown true gap, as
    in Saad's and Parlett's texts). An eigenvalue's error is quadratic in its residual, so a λ_max to 1e-7
    needs a residual of only ~3e-4·λ when λ₁/λ₂ ≈ 2."""
    if theta.shape[-1] < 2:
        return resid
    diff = (theta.unsqueeze(-1) - theta.unsqueeze(-2)).abs()
    diff = diff + torch.diag_embed(torch.full_like(theta, math.inf))
    gap = diff.amin(-1)
    return torch.minimum(resid, resid.square() / gap.clamp_min(torch.finfo(theta.dtype).tiny))


STOPS = ("residual", "eigenvalue")


def check_stop(stop: str) -> None:
    if stop not in STOPS:
        raise ValueError(f"stop must be 'residual' or 'eigenvalue', got {stop!r}")


def stopping_error(theta: Tensor, resid: Tensor, stop: str) -> Tensor:
    """What a convergence test compares with tol·|θ|: the residual, or the eigenvalue's error estimate."""
    return resid if stop == "residual" else ritz_value_error(theta, resid)


def last_block_converged(lz: Lanczos, which: str, tol: float, theta_max: Tensor) -> bool:
    """After a breakdown the Krylov space is (numerically) invariant, but rounding can have dropped a weak
    eigen-component from it — typically a small eigenvalue of a cluster. So the wanted end is trusted only
    once the block started from the fresh random vector (which sees the whole orthogonal complement) has
    converged at that end too: then the complement holds nothing more extreme. Unbatched runs only."""
    m = lz.steps
    if m >= lz.n:
        return True
    if float(lz.beta[m - 1]) == 0.0:  # broke down on the last step: the complement is still unexplored
        return False
    zeros = (lz.beta[: m - 1] == 0).nonzero()
    start = int(zeros[-1]) + 1 if zeros.numel() else 0
    if start == 0:
        return True
    theta, S = torch.linalg.eigh(lz.tridiagonal(start))
    i = 0 if which == "smallest" else -1
    resid = lz.beta[m - 1].abs() * S[-1, i].abs()
    return bool(ritz_converged(theta[i], resid, theta_max, tol, lz.n, top=which == "largest"))


def select_ritz(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k largest (descending) or smallest (ascending) of the ascending Ritz values ``theta``."""
    m = theta.shape[-1]
    idx = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
    return idx.to(theta.device)


def top_lanczos(
    apply: Apply,
    v0: Tensor,
    tol: float,
    maxiter: int,
    generator: torch.Generator,
    min_steps: int = 1,
    extra_stop: Callable[[Lanczos], bool] | None = None,
    stop: str = "residual",
) -> tuple[Lanczos, Tensor, Tensor]:
    """Run Lanczos until λ_max of every problem converges. ``v0`` is (..., p, n): p independent chains per
    problem; a problem's λ_max is the largest Ritz value over its chains (every Ritz value is a lower bound on
    λ_max, so the maximum is the best one). ``stop`` as in :func:`pl_i2f.influence.spectrum`; ``extra_stop``
    must also hold before stopping. Returns the run, λ_max (...) and converged (...)."""
    lz = Lanczos(apply, v0, maxiter, generator)
    lam = conv = None
    while not lz.done:
        lz.step()
        if lz.steps < min_steps or not (check_ritz_now(lz.steps) or lz.done):
            continue
        theta, _, resid = lz.ritz()
        err = stopping_error(theta, resid, stop)
        top, top_err = theta[..., -1], err[..., -1]  # (..., p)
        best = top.argmax(-1, keepdim=True)
        lam = top.gather(-1, best).squeeze(-1)
        conv = ritz_converged(lam, top_err.gather(-1, best).squeeze(-1), lam, tol, lz.n, top=True)
        if bool(conv.all()) and (extra_stop is None or extra_stop(lz)):
            break
    if lam is None:  # only when the loop never checked (cannot happen with min_steps <= maxiter)
        theta, _, _ = lz.ritz()
        lam = theta[..., -1].amax(-1)
        conv = torch.ones_like(lam, dtype=torch.bool)
    return lz, lam, conv


def gauss_quadrature(lz: Lanczos) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes θ and weights τ² = S[0, :]² of every chain: uᵀf(A)u ≈ Σ τ² f(θ) for the unit
    start vector u (stochastic Lanczos quadrature when u is random)."""
    theta, S, _ = lz.ritz()
    return theta, S[..., 0, :] ** 2


def deflated_trace(lz: Lanczos) -> Tensor:
    """tr(A) from p ≥ 2 independent Lanczos chains per problem (lz batch (..., p)) started from Rademacher
    vectors, Hutch++-style, with no product beyond those Lanczos already made.

    Chain c's Krylov basis Q_c (m vectors, QᵀAQ = T_c) deflates the top of the spectrum exactly:
    tr(A) = tr(T_c) + tr(P_c A P_c), P_c = I − Q_cQ_cᵀ. The remainder is estimated with the other chains'
    start vectors b_s (Rademacher, independent of Q_c): b_sᵀP_cAP_cb_s = b_sᵀAb_s − 2 (Ab_s)ᵀQ_c a + aᵀT_c a
    with a = Q_cᵀb_s, where Ab_s = ‖b_s‖(α₁q₁ + β₁q₂) is chain s's first step. Averaged over c and s ≠ c it
    is unbiased, and its variance is that of the *deflated* spectrum, far below plain Hutchinson's when a
    few eigenvalues carry much of the trace (as for J_iJ_iᵀ)."""
    m, n = lz.steps, lz.n
    Q = lz.Q[..., :m, :]  # (..., p, m, n)
    p = Q.shape[-3]
    a1 = lz.alpha[..., 0]
    rn = math.sqrt(n)  # ‖b‖ of a Rademacher vector
    ab = rn * (a1.unsqueeze(-1) * lz.Q[..., 0, :] + lz.beta[..., 0].unsqueeze(-1) * lz.Q[..., 1, :])
    b = rn * lz.Q[..., 0, :]
    T = lz.tridiagonal()
    a = torch.einsum("...cmn,...sn->...csm", Q, b)
    g = torch.einsum("...cmn,...sn->...csm", Q, ab)
    quad = torch.einsum("...csm,...cmk,...csk->...cs", a, T, a)
    rest = (n * a1).unsqueeze(-2) - 2 * (g * a).sum(-1) + quad  # (..., c, s)
    mask = ~torch.eye(p, dtype=torch.bool, device=Q.device)
    rest_mean = (rest * mask).sum(-1) / (p - 1)
    trT = lz.alpha[..., :m].sum(-1)  # (..., c)
    return (trT + rest_mean).mean(-1)


def cg(apply: Apply, b: Tensor, damping: float, tol: float, maxiter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Conjugate gradients for (A + εI) z = b from z = 0, batched over the leading dims of b (..., n).

    Returns z, the iterations per system, the recursive relative residual, and a breakdown flag (non-positive
    or non-finite curvature pᵀ(A+εI)p: A is not positive definite on the Krylov space, i.e. singular)."""
    z = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1)
    bnorm = rr.sqrt()
    target = tol * bnorm
    active = bnorm > 0
    its = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    broken = torch.zeros(b.shape[:-1], dtype=torch.bool, device=b.device)
    for _ in range(maxiter):
        if not active.any():
            break
        ap = apply(p) + damping * p
        curv = (p * ap).sum(-1)
        bad = active & (~torch.isfinite(curv) | (curv <= 0))
        broken |= bad
        active &= ~bad
        step = torch.where(active, rr / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        z = z + step.unsqueeze(-1) * p
        r = r - step.unsqueeze(-1) * ap
        rr_new = (r * r).sum(-1)
        its += active.long()
        still = active & (rr_new.sqrt() > target)
        coef = torch.where(still, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(still.unsqueeze(-1), r + coef.unsqueeze(-1) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = still
    rel = rr.sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return z, its, rel, broken
