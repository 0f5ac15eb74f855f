"""The spectrum of JJᵀ (d_x × d_x, the input side): extreme eigenpairs by Lanczos, the dense matrix for small
d_x, and J's right singular vectors (θ-space directions), by Lanczos or densely (:func:`row_space`, which the
anisotropic defense uses)."""

from __future__ import annotations

import torch
from torch import Tensor

from pl_i2f.influence.krylov import (
    Lanczos,
    check_ritz_now,
    check_stop,
    last_block_converged,
    ritz_converged,
    select_ritz,
    stopping_error,
)
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.results import ConvergenceWarning, InfluenceWarning, Spectrum, warn_caller
from pl_i2f.influence.settings import (
    DEFAULT_ROW_SPACE_RCOND,
    GRAM_CHUNK,
    LAMBDA_SCALE_TOL,
    SPECTRUM_MIN_STEPS,
    SPECTRUM_STEPS_PER_EIGENVALUE,
    TINY,
    default_rcond,
)
from pl_i2f.rng import analysis_generator, randn

WHICH = ("largest", "smallest")


def check_operator(op: GradientJacobian) -> None:
    for attr in ("_apply_flat", "d_x", "x_shape", "dtype", "device"):
        if not hasattr(op, attr):
            raise TypeError(f"expected a GradientJacobian (or an object with its interface), got {type(op).__name__}")


def spectrum(
    op: GradientJacobian,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    stop: str = "residual",
) -> Spectrum:
    """The k largest or smallest eigenvalues λᵢ of JJᵀ (d_x × d_x) and their x-side eigenvectors uᵢ.

    Lanczos with full reorthogonalisation on the input-side operator, started from a Gaussian vector drawn
    from ``generator``. With ``stop="residual"`` (default) a Ritz pair is converged when ‖JJᵀu − λu‖ ≤ tol·|λ|
    (ARPACK's criterion; it bounds the relative error of λ by tol, and of u by tol·|λ|/gap). The error of λ
    itself is ~ residual²/gap, far smaller: when only the eigenvalues matter, ``stop="eigenvalue"`` stops once
    the estimated error min(‖r‖, ‖r‖²/gap) ≤ tol·|λ|, with the gap to the nearest other Ritz value (Parlett's
    gap theorem) — fewer products for the same accuracy of λ, but the eigenvectors are then only as good as
    the residual. ``maxiter`` caps the JJᵀ products (default min(d_x, max(300, 20k))); at d_x steps the result
    is exact. Not meeting the tolerance gives a :class:`ConvergenceWarning` (unless ``warn=False``)
    and ``converged=False``.

    Limitation of single-vector Lanczos: a Krylov space holds one copy of each distinct eigenvalue, so a
    repeated eigenvalue is found as many times as the run breaks down and restarts (exact for d_x steps);
    before that, multiplicities can be under-counted — e.g. the (d_x − d_θ)-fold zero eigenvalue of a
    rank-deficient JJᵀ shows up once among the smallest. Extreme *values* are unaffected.
    """
    check_operator(op)
    if which not in WHICH:
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not isinstance(k, int) or k < 1 or k > op.d_x:
        raise ValueError(f"k must be an integer in [1, d_x = {op.d_x}], got {k}")
    n = op.d_x
    maxiter = min(n, max(SPECTRUM_MIN_STEPS, SPECTRUM_STEPS_PER_EIGENVALUE * k)) if maxiter is None else int(maxiter)
    if maxiter < k:
        raise ValueError(f"maxiter = {maxiter} < k = {k}")
    check_stop(stop)
    gen = analysis_generator(generator, op.device)
    v0 = randn((n,), gen, torch.empty(0, dtype=op.dtype, device=op.device))
    lz = Lanczos(op._apply_flat, v0, maxiter, gen)
    top = which == "largest"

    def is_converged(theta: Tensor, resid: Tensor) -> bool:
        idx = select_ritz(theta, k, which)
        err = stopping_error(theta, resid, stop)
        return bool(ritz_converged(theta[idx], err[idx], theta[-1], tol, n, top).all()) and last_block_converged(
            lz, which, tol, theta[-1]
        )

    converged = False
    while not lz.done:
        lz.step()
        if lz.steps < k or not (check_ritz_now(lz.steps) or lz.done):
            continue
        theta, S, resid = lz.ritz()
        if is_converged(theta, resid):
            converged = True
            break
    theta, S, resid = lz.ritz()
    idx = select_ritz(theta, k, which)
    converged = converged or is_converged(theta, resid)
    vecs = lz.vectors(S[:, idx])
    if not converged and warn:
        warn_caller(
            f"Lanczos did not converge to tol={tol:g} for the {k} {which} eigenvalue(s) of JJᵀ in {lz.steps} "
            f"steps (max residual/|λ| = {float((resid[idx] / theta[idx].abs().clamp_min(TINY)).max()):.2e}); "
            "raise maxiter or tol",
            ConvergenceWarning,
        )
    return Spectrum(
        eigenvalues=theta[idx],
        eigenvectors=vecs.reshape(k, *op.x_shape),
        residuals=resid[idx],
        converged=converged,
        iterations=lz.steps,
        which=which,
    )


def top_eigenvalue(
    op: GradientJacobian,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    stop: str = "eigenvalue",
) -> Tensor:
    """λ_max(JJᵀ) = ‖J‖₂² (0-dim tensor) by Lanczos to relative error ~tol. Only the value is returned, so the
    default stops on the eigenvalue's error estimate (``stop="eigenvalue"``); ``stop="residual"`` is ARPACK's
    stricter criterion. See :func:`spectrum` for both and for the warnings."""
    return spectrum(op, 1, "largest", tol=tol, maxiter=maxiter, generator=generator, stop=stop).eigenvalues[0]


def lambda_max_scale(op: GradientJacobian, generator: torch.Generator | None) -> float:
    """λ_max to ``LAMBDA_SCALE_TOL`` relative accuracy: only a scale for rank thresholds and fallback damping."""
    return float(spectrum(op, 1, "largest", tol=LAMBDA_SCALE_TOL, generator=generator,
                          warn=False).eigenvalues[0])


def right_singular_vectors(
    op: GradientJacobian,
    k: int,
    which: str = "smallest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Singular values sᵢ = √λᵢ of J and its θ-space right singular vectors vᵢ = Jᵀuᵢ / sᵢ as a (k, d_θ)
    tensor (rows orthonormal, ordered like ``spectrum``'s ``which``).

    Noise of size α along vᵢ moves the attacker's reconstruction by α/sᵢ (to first order): the ``smallest``
    directions protect the most per unit of noise. Only the row space of J is reachable this way; noise in
    the null space of J (dimension ≥ d_θ − d_x) buys no first-order privacy at all. A zero singular value
    (rank-deficient JJᵀ) has no right singular vector: its row is returned as zeros, with a warning.
    """
    spec = spectrum(op, k, which, tol=tol, maxiter=maxiter, generator=generator)
    lam = spec.eigenvalues
    lam_max = float(lam[0]) if which == "largest" else lambda_max_scale(op, generator)
    floor = default_rcond(op.d_x, op.dtype) * lam_max
    s = lam.clamp_min(0).sqrt()
    v = op.rmatvec_batch(spec.eigenvectors.reshape(k, -1))
    zero = lam <= floor
    if zero.any():
        warn_caller(
            f"{int(zero.sum())} of the requested singular values of J are numerically zero (JJᵀ is "
            "rank-deficient); their θ-space rows are returned as zeros",
            InfluenceWarning,
        )
    v = torch.where(zero.unsqueeze(-1), torch.zeros_like(v), v / torch.where(zero, torch.ones_like(s), s).unsqueeze(-1))
    return s, v


def _identity_blocks(op: GradientJacobian, chunk: int) -> list[Tensor]:
    eye = torch.eye(op.d_x, dtype=op.dtype, device=op.device)
    return [eye[i : i + chunk] for i in range(0, op.d_x, chunk)]


def gram_matrix(op: GradientJacobian, chunk_size: int | None = GRAM_CHUNK) -> Tensor:
    """The dense d_x × d_x matrix JJᵀ from d_x products (``vmap`` over the identity, ``chunk_size`` columns
    at a time), symmetrised. For small d_x only: it costs d_x products and d_x² memory."""
    check_operator(op)
    chunk = op.d_x if chunk_size is None else max(1, int(chunk_size))
    a = torch.cat([op._apply_flat(block) for block in _identity_blocks(op, chunk)])
    return (a + a.T) / 2


def row_space(op: GradientJacobian, k: int | None = None, which: str = "smallest", *,
              rcond: float = DEFAULT_ROW_SPACE_RCOND, dense_max_dim: int = 2048,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues λᵢ of JJᵀ (ascending, float64) and J's θ-space right singular vectors vᵢ = Jᵀuᵢ/√λᵢ as rows,
    keeping λᵢ > rcond·λ_max, then the k ``which`` ones (all kept ones when k is None).

    Small d_x (≤ ``dense_max_dim``): Jᵀ is formed explicitly from d_x products Jᵀeⱼ, JJᵀ = (Jᵀ)ᵀJᵀ is
    diagonalised densely in float64 and vᵢ read off Jᵀ directly — one pass over the x-basis instead of the
    2·d_x products of :func:`gram_matrix`; the rows are re-orthonormalised (QR) against float error in tiny-λ
    directions. Larger d_x: Lanczos (:func:`right_singular_vectors`); k must then be given.
    """
    check_operator(op)
    if which not in WHICH:
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if op.d_x > dense_max_dim:
        if k is None:
            raise ValueError(f"k must be given when d_x = {op.d_x} > dense_max_dim = {dense_max_dim} (Lanczos "
                             "finds k directions)")
        s, v = right_singular_vectors(op, int(k), which, generator=generator)
        keep = s > 0
        lam, v = s[keep].double().pow(2), v[keep]
        order = torch.argsort(lam)
        return lam[order], v[order]
    jt = torch.cat([op.rmatvec_batch(block) for block in _identity_blocks(op, GRAM_CHUNK)]).T  # (d_θ, d_x)
    jt64 = jt.double()
    lam, u = torch.linalg.eigh(jt64.T @ jt64)  # ascending
    keep = lam > rcond * lam[-1].clamp_min(0)
    lam, u = lam[keep], u[:, keep]
    v = (jt64 @ u / lam.sqrt()).T
    if k is not None and k < lam.numel():
        sel = slice(0, k) if which == "smallest" else slice(lam.numel() - k, lam.numel())
        lam, v = lam[sel], v[sel]
    q, _ = torch.linalg.qr(v.T)  # re-orthonormalise the rows, keeping their span and order
    return lam, q.T.to(op.dtype)
