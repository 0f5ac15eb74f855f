"""The engine's numerical settings in one place: tolerances, iteration limits and rounding floors.

Thresholds counted in ``*_ULPS`` are multiples of the working dtype's machine epsilon (:func:`machine_eps`,
written "u" below), never the damping ε of (JJᵀ + εI)⁻¹ (:mod:`pl_i2f.influence.damping`).
"""

from __future__ import annotations

import torch

# --- Lanczos ---------------------------------------------------------------------------------------
BREAKDOWN_ULPS = 16
"""A Lanczos step breaks down (invariant subspace: restart from a fresh vector) when β ≤ this·u·√n·‖T‖."""
RITZ_FLOOR_ULPS = 64
"""Convergence floor of a Ritz value: ‖r‖ ≤ this·u·√n·|θ_max| is all the rounding of the products allows."""
TOP_RITZ_FLOOR_ULPS = 8
"""For the largest eigenvalues the floor above is capped at max(tol, this·u), so tol is honoured (float32)."""
RITZ_CHECK_EVERY_STEP_UNTIL = 30
"""Ritz values are computed after every step up to this many, then about ``RITZ_CHECKS_PER_RUN`` times a run."""
RITZ_CHECKS_PER_RUN = 20
LANCZOS_INITIAL_BASIS = 16
"""Rows allocated for the Krylov basis before it grows by doubling (most runs stop after a handful of steps)."""
SPECTRUM_MIN_STEPS = 300
SPECTRUM_STEPS_PER_EIGENVALUE = 20
"""``spectrum``'s default step cap: min(d_x, max(SPECTRUM_MIN_STEPS, SPECTRUM_STEPS_PER_EIGENVALUE·k))."""
SLQ_MAX_STEPS = 300
"""``expected_i2f``'s default Lanczos step cap for stochastic Lanczos quadrature: min(d_x, this)."""
LAMBDA_SCALE_TOL = 1e-3
"""Relative accuracy of λ_max when it only sets a scale (rank thresholds, fallback damping, SLQ's λ_max)."""

# --- conjugate gradients ---------------------------------------------------------------------------
CG_MIN_ITERATIONS = 50
CG_MAX_ITERATIONS = 2000
DRAW_CG_TOL = 1e-6
"""Relative residual of the per-draw CG solves of the Monte Carlo expected I²F."""

# --- dense paths -----------------------------------------------------------------------------------
GRAM_CHUNK = 256
"""Columns of the identity pushed through the operator per call when a dense matrix is formed."""
EXACT_BLOCK_NUMBERS = 1 << 25
"""Per-sample exact path: columns per call are bounded so (samples × columns × d_θ) stays about this many numbers."""
CHAIN_PRODUCTS = True
"""Per-sample Jacobians of chain networks (convolutions, linear layers, elementwise activations) by batched
matrix products (:mod:`pl_i2f.influence.chain`) instead of ``vmap`` over ``torch.func``; False: always the
latter (same columns to float32 rounding)."""
CHAIN_MAX_OPERATOR_NUMBERS = 1 << 22
"""Largest dense operator a convolution of the chain route may use (its matrix, or its unfolding operator): beyond
it the feature maps are too large for dense products to pay off, and the generic route is taken."""
DEFAULT_ROW_SPACE_RCOND = 1e-10
"""``row_space``: eigen-directions with λ ≤ this·λ_max are dropped (float64 eigen-decomposition)."""

TINY = 1e-300
"""Guards divisions by a norm or an eigenvalue that may be exactly zero (float64's smallest normal is 2e-308)."""


def machine_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (float32: 1.2e-7, float64: 2.2e-16)."""
    return torch.finfo(dtype).eps


def default_rcond(n: int, dtype: torch.dtype) -> float:
    """Numerical rank threshold, as in numpy's ``matrix_rank``: eigenvalues of an n × n JJᵀ below n·u·λ_max are
    indistinguishable from zero given the rounding of the products themselves."""
    return n * machine_eps(dtype)


def cg_maxiter(n: int) -> int:
    """CG's default iteration cap for an n × n system: 2n (enough in exact arithmetic twice over), within
    [CG_MIN_ITERATIONS, CG_MAX_ITERATIONS]."""
    return min(max(2 * n, CG_MIN_ITERATIONS), CG_MAX_ITERATIONS)
