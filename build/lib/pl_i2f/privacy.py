"""DP-SGD's guarantee in reconstruction terms.

Hayes, Mahloujifar & Balle (2023, "Bounding training data reconstruction in DP-SGD") show that for a
mechanism whose privacy is described by a trade-off function f, any reconstruction attack whose success
probability without seeing the model is κ (the *baseline*: e.g. 1/n for a target drawn uniformly from n
candidates) succeeds with probability at most 1 − f(κ). For μ-Gaussian DP, f(α) = Φ(Φ⁻¹(1 − α) − μ), so

    P[reconstruction succeeds] ≤ Φ(Φ⁻¹(κ) + μ).

The μ of a DP-SGD run comes from the central-limit view of Bu et al. (2020), which Opacus implements for
one constant (σ, q) segment (``opacus.accountants.analysis.gdp``); a run with a noise schedule is a sequence
of segments, and μ-GDP composes as μ = √(Σ μ_seg²). The CLT view is an approximation that is accurate for
many steps at small sampling rates and can underestimate the privacy cost for few steps (Opacus warns
about this too); ε from the RDP/PRV accountant remains the rigorous guarantee, and the bound is reported
beside it, not instead of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from opacus.accountants.analysis.gdp import compute_mu_poisson, compute_mu_uniform
from scipy.stats import norm

from .errors import ConfigError

#: Default baseline κ: an attacker who must single out the right one of 100 equally likely candidates.
DEFAULT_RECONSTRUCTION_BASELINE = 0.01


def smallest_sigma(fits: Callable[[float], bool], rtol: float = 1e-4, ceiling: float = 1e6) -> float:
    """The smallest noise level σ (to ``rtol``, rounded up) with ``fits(σ)``, for a ``fits`` that holds from some
    σ on (ε falls as σ grows): doubling from 1, then bisection keeping the fitting end. ``inf`` when not even
    ``ceiling`` fits. Serves DP-SGD's calibration of σ₀ to a target ε and the autopilot's ε-cap floor."""
    low, high = 0.0, 1.0
    while not fits(high):
        low, high = high, 2.0 * high
        if high > ceiling:
            return math.inf
    while high - low > rtol * high:
        mid = (low + high) / 2.0
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def check_baseline(baseline: float) -> float:
    """``baseline`` (κ) as a float in (0, 1), or a one-line :class:`ConfigError`."""
    if not (isinstance(baseline, int | float) and 0.0 < float(baseline) < 1.0):
        raise ConfigError(f"reconstruction baseline κ must be a probability in (0, 1), got {baseline!r}")
    return float(baseline)


def _segment_mu(noise_multiplier: float, sample_rate: float, steps: int, poisson: bool) -> float:
    if steps <= 0 or sample_rate <= 0:
        return 0.0
    if noise_multiplier <= 0 or 1.0 / noise_multiplier**2 > 700:  # exp overflows: no privacy left
        return math.inf
    compute = compute_mu_poisson if poisson else compute_mu_uniform
    return float(compute(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate))


def gdp_mu(history: Iterable[tuple[float, float, int]], poisson: bool = True) -> float:
    """μ of the whole run under the CLT view, from Opacus' accountant history.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` segments (``accountant.history`` of Opacus'
    RDP, PRV and GDP accountants has exactly this form); segments compose as μ = √(Σ μ_seg²).
    """
    total = 0.0
    for noise_multiplier, sample_rate, steps in history:
        mu = _segment_mu(float(noise_multiplier), float(sample_rate), int(steps), poisson)
        if math.isinf(mu):
            return math.inf
        total += mu * mu
    return math.sqrt(total)


def reconstruction_bound(mu: float, baseline: float = DEFAULT_RECONSTRUCTION_BASELINE) -> float:
    """Upper bound Φ(Φ⁻¹(κ) + μ) on the success probability of any reconstruction attack under μ-GDP.

    ``baseline`` is κ, the attack's success probability without access to the model. μ = 0 gives κ (the
    model reveals nothing), μ → ∞ gives 1.
    """
    kappa = check_baseline(baseline)
    if not mu >= 0:
        raise ValueError(f"μ must be non-negative, got {mu}")
    if math.isinf(mu):
        return 1.0
    return float(norm.cdf(norm.ppf(kappa) + mu))


def reconstruction_bound_from_history(history: Iterable[tuple[float, float, int]],
                                      baseline: float = DEFAULT_RECONSTRUCTION_BASELINE,
                                      poisson: bool = True) -> float:
    """:func:`reconstruction_bound` for the μ of an Opacus accountant ``history`` (see :func:`gdp_mu`)."""
    return reconstruction_bound(gdp_mu(history, poisson), baseline)


__all__ = [
    "DEFAULT_RECONSTRUCTION_BASELINE",
    "check_baseline",
    "gdp_mu",
    "reconstruction_bound",
    "reconstruction_bound_from_history",
]
